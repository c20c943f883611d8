"""The training loader alone (no model): real tokens/s it delivers per num_workers setting, on the bundled data.

    python scripts/loader_speed.py --workers 0,1,2,4 --seconds 20                     # packed 64 x 1024 rows
    python scripts/loader_speed.py --workers 0,2 --set data.packing=false data.max_tokens=16384

A GPU step that trains N tokens/s needs a loader above N with room to spare (esm2_150m at 28% MFU on an H200:
~280k real tokens/s). Each setting runs in this process after one untimed epoch-start batch; prints one JSON line
per setting: workers, batches, real tokens/s, and the main-process rate that bounds `num_workers=0`.
"""

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(workers: int, seconds: float, overrides: list[str]) -> dict:
    """Iterate the training loader for `seconds` after its first batch; count real tokens."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from protein_mlm.data.masking import COUNTS_KEY
    from protein_mlm.preflight import check_config
    from protein_mlm.train import build_datamodule

    defaults = ["data.packing=true", "data.max_tokens=65536", f"paths.cache_dir={ROOT / '.cache' / 'data'}"]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*defaults, "trainer.accelerator=cpu", *overrides])
    with open_dict(cfg):
        cfg.data.num_workers = workers
    datamodule = build_datamodule(cfg, check_config(cfg))
    datamodule.setup()
    batches = iter(datamodule.train_dataloader())
    next(batches)
    tokens, count, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            batch = next(batches)
        except StopIteration:  # the epoch ended: keep timing the next one
            batches = iter(datamodule.train_dataloader())
            continue
        tokens += batch[COUNTS_KEY].tokens
        count += 1
    elapsed = time.perf_counter() - start
    return {"workers": workers, "batches": count, "real_tokens_per_s": round(tokens / elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="0,2,4", help="comma-separated num_workers settings")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per setting")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (data.*)")
    args = parser.parse_args()
    for workers in map(int, args.workers.split(",")):
        print(json.dumps({**measure(workers, args.seconds, args.set), "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
