"""FastEsmLayer computes transformers' EsmLayer: fp32 outputs and gradients within 1e-5, padded and packed."""

import copy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import EsmForMaskedLM
from transformers.models.esm.modeling_esm import EsmLayer

from protein_mlm.data.masking import collate, mask_tokens
from protein_mlm.data.packing import collate_packed
from protein_mlm.errors import ConfigError
from protein_mlm.model.esm import build_model, esm_config
from protein_mlm.model.fast_layer import FastEsmLayer, make_fast
from protein_mlm.model.packed import packed_logits
from protein_mlm.training.module import MaskedLMModule
from tests.conftest import compose_config

TINY_ARCH = OmegaConf.to_container(compose_config("model=tiny").model.architecture, resolve=True)
ARCHS = {
    "rotary": TINY_ARCH,
    "absolute": {**TINY_ARCH, "position_embedding_type": "absolute"},
}
LENGTHS = [5, 30, 3, 24, 17]


def examples(lengths=LENGTHS, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [mask_tokens(rng.integers(4, 24, size=n), rng) for n in lengths]


def batches() -> dict:
    """A padded batch (real padding in every row but the longest) and a packed one (2 rows with tail padding)."""
    batch = examples()
    return {"padded": collate(batch), "packed": collate_packed(batch, rows=2, row_tokens=48)}


def logits(model, batch: dict) -> torch.Tensor:
    if "cu_seqlens" in batch:
        return packed_logits(model, batch)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def real_tokens(batch: dict) -> torch.Tensor:
    """Positions whose logits count: padded rows' real tokens; every packed token (the tail is a segment too)."""
    return batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(batch["input_ids"]).bool()


def fast_copy(model):
    """A deep copy of `model` with every layer made fast (the same weights)."""
    fast = copy.deepcopy(model)
    for layer in fast.esm.encoder.layer:
        make_fast(layer)
    return fast


def layer_inputs(model, batch: dict) -> tuple[tuple, dict]:
    """The arguments EsmEncoder passes to layer 0 for `batch` (the mask, rotary tables and packing kwargs)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(args=args, kwargs=kwargs)

    handle = model.esm.encoder.layer[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        logits(model, batch)
    handle.remove()
    return seen["args"], seen["kwargs"]


def assert_gradients_equal(ours: torch.nn.Module, theirs: torch.nn.Module, tolerance: float = 1e-5) -> None:
    """Every parameter that got a gradient in `theirs` got the same one in `ours` (names must match too)."""
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert ours_grads.keys() == theirs_grads.keys() and theirs_grads
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=tolerance, rtol=tolerance, msg=name)


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("position", ["rotary", "absolute"])
def test_layer_output_and_gradients_match_esm_layer(kind, position):
    torch.manual_seed(0)
    model = build_model(ARCHS[position])
    batch = batches()[kind]
    (hidden,), kwargs = layer_inputs(model, batch)
    assert (kwargs["attention_mask"] is not None) == (kind == "padded")
    assert ("cu_seq_lens_q" in kwargs) == (kind == "packed")
    reference = model.esm.encoder.layer[0]
    fast = make_fast(copy.deepcopy(reference))
    assert type(reference) is EsmLayer and isinstance(fast, FastEsmLayer)
    hidden = torch.randn_like(hidden)  # not the embeddings: every feature of the input matters
    probe = torch.randn(*hidden.shape[:-1], hidden.shape[-1])
    outputs, input_grads = [], []
    for layer in (reference, fast):
        x = hidden.clone().requires_grad_()
        out = layer(x, **kwargs)
        (out * probe).sum().backward()
        outputs.append(out)
        input_grads.append(x.grad)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(input_grads[1], input_grads[0], atol=1e-5, rtol=1e-5)
    assert_gradients_equal(fast, reference)


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("position", ["rotary", "absolute"])
def test_model_logits_and_gradients_match_with_fast_layers_off(kind, position):
    torch.manual_seed(0)
    model = build_model(ARCHS[position])
    fast = fast_copy(model)
    batch = batches()[kind]
    real = real_tokens(batch)
    outputs = []
    for m in (model, fast):
        out = logits(m, batch)
        out[real].square().sum().backward()
        outputs.append(out[real])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    assert_gradients_equal(fast, model)


def test_build_model_switch_keeps_parameters_and_state_dict_keys():
    torch.manual_seed(0)
    plain = build_model(TINY_ARCH)
    torch.manual_seed(0)
    fast = build_model(TINY_ARCH, fast_layers=True)
    assert all(type(layer) is FastEsmLayer for layer in fast.esm.encoder.layer)
    assert not any(isinstance(layer, FastEsmLayer) for layer in plain.esm.encoder.layer)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    for (name, ours), theirs in zip(fast.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0, msg=name)  # the same initialisation, untouched


def test_export_of_a_fast_model_loads_into_plain_esm(tmp_path):
    torch.manual_seed(0)
    fast = build_model(TINY_ARCH, fast_layers=True)
    fast.save_pretrained(tmp_path)
    plain = EsmForMaskedLM.from_pretrained(tmp_path)
    assert all(type(layer) is EsmLayer for layer in plain.esm.encoder.layer)
    assert plain.state_dict().keys() == fast.state_dict().keys()
    batch = batches()["padded"]
    real = real_tokens(batch)
    with torch.no_grad():
        torch.testing.assert_close(logits(fast, batch)[real], logits(plain, batch)[real], atol=1e-5, rtol=1e-5)


def test_hidden_states_are_captured_and_attention_weights_refused():
    torch.manual_seed(0)
    model = build_model(TINY_ARCH)
    fast = fast_copy(model)
    batch = batches()["padded"]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    theirs, ours = (m(**inputs, output_hidden_states=True).hidden_states for m in (model, fast))
    assert len(ours) == len(theirs) == TINY_ARCH["num_hidden_layers"] + 1
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no attention weights"):
        fast(**inputs, output_attentions=True)


def test_dropout_in_training_matches_esm_layer_draw_for_draw():
    """With dropout on, the same seed gives the same masks: the RNG is drawn in HF's order and shapes."""
    architecture = {**TINY_ARCH, "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2}
    torch.manual_seed(0)
    model = build_model(architecture).train()
    fast = fast_copy(model)
    batch = batches()["padded"]
    real = real_tokens(batch)
    outputs = []
    for m in (model, fast):
        torch.manual_seed(1)
        outputs.append(logits(m, batch)[real])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.manual_seed(2)
    assert not torch.allclose(logits(fast, batch)[real], outputs[0], atol=1e-3)  # dropout did draw


def test_activation_checkpointing_with_fast_layers_keeps_gradients():
    torch.manual_seed(0)
    model = build_model(TINY_ARCH)
    checkpointed = build_model(TINY_ARCH, activation_checkpointing=True, fast_layers=True).train()
    checkpointed.load_state_dict(model.state_dict())
    batch = batches()["packed"]
    for m in (model, checkpointed):
        logits(m, batch).square().sum().backward()
    assert_gradients_equal(checkpointed, model)


def test_bf16_autocast_runs_close_to_fp32():
    """Smoke: under CPU bf16 autocast the fast model trains (finite gradients) and stays near the fp32 logits."""
    torch.manual_seed(0)
    fast = build_model(TINY_ARCH, fast_layers=True)
    for kind, batch in batches().items():
        real = real_tokens(batch)
        reference = logits(fast, batch)[real].detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = logits(fast, batch)[real]
        out.float().square().sum().backward()
        assert all(p.grad.isfinite().all() for p in fast.parameters() if p.grad is not None), kind
        assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max(), kind


def test_compiled_fast_layers_match_eager():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(TINY_ARCH, fast_layers=True)
    compiled = copy.deepcopy(eager)
    for layer in compiled.esm.encoder.layer:
        layer.compile(backend="aot_eager", dynamic=True)
    for batch in batches().values():
        real = real_tokens(batch)
        outputs = []
        for m in (eager, compiled):
            m.zero_grad()
            out = logits(m, batch)
            out[real].square().sum().backward()
            outputs.append(out[real])
        torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=1e-6)
        assert_gradients_equal(compiled, eager, tolerance=1e-6)


def test_switch_flows_from_the_config_and_refuses_what_it_cannot_compute():
    assert compose_config("model=esm2_8m").model.fast_layers is False  # off unless asked
    assert compose_config("model=esm1b").model.fast_layers is False
    module = MaskedLMModule(architecture=TINY_ARCH, fast_layers=True)
    assert all(isinstance(layer, FastEsmLayer) for layer in module.model.esm.encoder.layer)
    with pytest.raises(ConfigError, match="attn_implementation: sdpa"):
        build_model({**TINY_ARCH, "attn_implementation": "eager"}, fast_layers=True)
    with pytest.raises(ConfigError, match="attn_implementation: sdpa"):
        FastEsmLayer(esm_config({**TINY_ARCH, "attn_implementation": "eager"}))
    assert (
        FastEsmLayer(esm_config(TINY_ARCH)).state_dict().keys() == EsmLayer(esm_config(TINY_ARCH)).state_dict().keys()
    )
