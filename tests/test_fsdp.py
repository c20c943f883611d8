"""FSDP without GPUs: Lightning refuses FSDP on the CPU, so these test the objects the strategy builds and the
preflight refusals of what has not run under FSDP (fp16, sharded checkpoints, compile)."""

import pytest
import torch
from hydra.utils import instantiate
from pytorch_lightning.plugins.precision import FSDPPrecision
from transformers.models.esm.modeling_esm import EsmRotaryEmbedding

from protein_mlm.errors import ConfigError
from protein_mlm.model.esm import build_model
from protein_mlm.model.parallel import fsdp_strategy
from protein_mlm.preflight import check_config

from .conftest import compose_config

FSDP = ("experiment=esm2_8m", "trainer=fsdp", "plan_only=true")  # plan_only: no GPU check on this machine


def built_policy(*overrides: str):
    """The mixed-precision policy FSDP wraps the model with: the strategy's, after Lightning gives it its plugin."""
    cfg = compose_config(*FSDP, *overrides)
    strategy = instantiate(cfg.trainer.strategy)
    strategy.precision_plugin = FSDPPrecision(cfg.trainer.precision)  # what Lightning's connector passes it
    return strategy.mixed_precision_config


def test_fsdp_keeps_buffers_such_as_rotary_inv_freq_in_fp32():
    policy = built_policy()
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    assert policy.buffer_dtype == torch.float32  # Lightning's own policy: bf16
    architecture = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
    model = build_model({**architecture, "position_embedding_type": "rotary"})
    buffers = [b for m in model.modules() if isinstance(m, EsmRotaryEmbedding) for b in m.buffers()]
    assert buffers and all(torch.equal(b.to(policy.buffer_dtype), b) for b in buffers)  # exact, as DDP and export
    assert built_policy("trainer.precision=32-true").buffer_dtype == torch.float32  # Lightning's fp32 policy


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.precision=16-mixed"], r"trainer=fsdp with precision 16-mixed is not supported"),
        (["trainer.precision=16-mixed", "trainer.gradient_clip_val=1.0"], r"use trainer.precision=bf16-mixed"),
        (["trainer.strategy.state_dict_type=sharded"], r"state_dict_type=sharded is not supported.*=full$"),
        (["model.compile=true"], r"trainer=fsdp with model.compile=true has not been run yet"),
    ],
)
def test_what_has_not_run_under_fsdp_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_config(compose_config(*FSDP, *overrides))
    assert "\n" not in str(info.value)


def test_compile_auto_resolves_off_under_fsdp(monkeypatch):
    monkeypatch.setattr("protein_mlm.plan.can_compile", lambda *a, **k: True)  # as on a GPU node with Triton
    assert check_config(compose_config("experiment=esm2_8m", "plan_only=true")).compile
    assert not check_config(compose_config(*FSDP)).compile


def test_sharded_state_dicts_are_refused_below_the_cli_too():
    with pytest.raises(ConfigError, match="state_dict_type=sharded"):
        fsdp_strategy(state_dict_type="sharded")
