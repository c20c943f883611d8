"""FastEsmLayer on a GPU: bf16 agreement with transformers' EsmLayer (padded and varlen-packed batches) and
forward + backward time of both, eager and compiled. Needs only torch, transformers and numpy (no Hydra).

    PYTHONPATH=src python scripts/fast_layer_gpu_check.py --out OUT_DIR [--layers 6] [--skip-compile]

Model: esm2_150m's layer shape (640 hidden, 20 heads, FFN 2560), --layers of them. Batches: packed 64 x 1024
tokens (sequences 60-700 long), padded 128 x up to 512 (lengths 400-512). Results: OUT_DIR/fast_layer_gpu.json.
"""

import argparse
import copy
import json
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from protein_mlm.data.masking import IGNORE_INDEX, collate, mask_tokens
from protein_mlm.data.packing import best_fit_rows, collate_packed
from protein_mlm.model.esm import build_model
from protein_mlm.model.fast_layer import use_fast_layers
from protein_mlm.model.packed import packed_logits

ESM2_150M_LAYER = dict(hidden_size=640, num_attention_heads=20, intermediate_size=2560)
ESM2 = dict(
    position_embedding_type="rotary",
    max_position_embeddings=1026,
    emb_layer_norm_before=False,
    token_dropout=True,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-5,
)


def packed_batch(rows: int, rng: np.random.Generator) -> dict:
    """`rows` x 1024 packed tokens of sequences 60-700 long (what fits of a generous draw)."""
    examples = [mask_tokens(rng.integers(4, 24, size=n), rng) for n in rng.integers(60, 700, size=rows * 4)]
    placed = sorted(p for row in best_fit_rows([len(e[0]) for e in examples], rows, 1024) for p in row)
    return collate_packed([examples[p] for p in placed], rows=rows, row_tokens=1024)


def padded_batch(size: int, rng: np.random.Generator) -> dict:
    """`size` sequences 400-512 tokens long, padded to the longest (a token-budget batch of similar lengths)."""
    return collate([mask_tokens(rng.integers(4, 24, size=n), rng) for n in rng.integers(398, 510, size=size)])


def to_device(batch: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def logits(model, batch: dict) -> torch.Tensor:
    if "cu_seqlens" in batch:
        return packed_logits(model, batch)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def loss_and_grads(model, batch: dict, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, summed masked-LM loss, flat gradient) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = logits(model, batch)
    loss = F.cross_entropy(out.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.detach().float(), loss.detach(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def agreement(plain, fast, batch: dict) -> dict:
    """bf16 fast vs bf16 plain, and both vs fp32 plain: relative L2 of logits and gradients, loss values."""
    reference = loss_and_grads(plain, batch, bf16=False)
    runs = {"plain_bf16": loss_and_grads(plain, batch, bf16=True), "fast_bf16": loss_and_grads(fast, batch, True)}
    result = {"loss_fp32": float(reference[1])}
    for name, (out, loss, grads) in runs.items():
        result[name] = dict(
            loss=float(loss),
            logits_rel_to_fp32=relative(out, reference[0]),
            grads_rel_to_fp32=relative(grads, reference[2]),
        )
    result["fast_vs_plain_bf16"] = dict(
        logits_rel=relative(runs["fast_bf16"][0], runs["plain_bf16"][0]),
        grads_rel=relative(runs["fast_bf16"][2], runs["plain_bf16"][2]),
    )
    return result


def step_ms(model, batch: dict, steps: int = 10, warmup: int = 3) -> float:
    """Milliseconds per bf16 forward + backward (autocast), after warm-up steps."""
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss_and_grads(model, batch, bf16=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def section(results: dict, name: str, out: Path, fn) -> None:
    """Run one part; a failure is recorded and the rest still runs. Results are written after every part."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception:  # noqa: BLE001 - a GPU check reports every failure it meets
        results[name] = {"error": traceback.format_exc(limit=6)}
    print(f"{name} ({time.perf_counter() - start:.0f} s): {json.dumps(results[name], indent=1)}", flush=True)
    (out / "fast_layer_gpu.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    plain = build_model({**ESM2, **ESM2_150M_LAYER, "num_hidden_layers": args.layers}).cuda()
    fast = copy.deepcopy(plain)
    use_fast_layers(fast)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers}
    import transformers

    results["transformers"] = transformers.__version__
    small = {"packed": to_device(packed_batch(8, rng)), "padded": to_device(padded_batch(16, rng))}
    big = {"packed": to_device(packed_batch(64, rng)), "padded": to_device(padded_batch(128, rng))}
    for kind, batch in small.items():
        section(results, f"agreement_{kind}", args.out, lambda b=batch: agreement(plain, fast, b))
    for kind, batch in big.items():
        section(
            results,
            f"eager_ms_{kind}",
            args.out,
            lambda b=batch: {"plain": step_ms(plain, b), "fast": step_ms(fast, b)},
        )
    if args.skip_compile:
        return
    for kind, dynamic in (("packed", None), ("padded", True)):  # as module.py: static for packed batches

        def compiled(kind=kind, dynamic=dynamic) -> dict:
            torch._dynamo.reset()
            times = {}
            for name, model in (("plain", plain), ("fast", fast)):
                model = copy.deepcopy(model)
                for layer in model.esm.encoder.layer:
                    layer.compile(dynamic=dynamic)
                start = time.perf_counter()
                loss_and_grads(model, big[kind], bf16=True)
                times[f"{name}_compile_s"] = time.perf_counter() - start
                times[name] = step_ms(model, big[kind])
            return times

        section(results, f"compiled_ms_{kind}", args.out, compiled)


if __name__ == "__main__":
    main()
