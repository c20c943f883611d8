"""The kill window on this machine: how fast a full training checkpoint is made durable, and how long a run takes
from a stop signal to a durable last.ckpt.

    .venv/bin/python scripts/kill_window.py --model esm2_35m --dir /scratch/me   # write speed where runs write
    .venv/bin/python scripts/kill_window.py --model esm2_35m --stop-runs        # ... and signal -> last.ckpt

Write speed: the model preset's weights and AdamW state (what last.ckpt holds, 12 bytes per parameter in fp32)
saved through the runs' own AtomicCheckpointIO (temporary file, fsync, rename) into --dir; the best of --repeats.
Stop runs (`--stop-runs`): a tiny run of 1 process and one of 2 DDP processes (gloo), sent SIGUSR2 from this
process at update 3 (debug.callbacks.AwaitSignal); the seconds from the signal to the rename of last.ckpt and to
the exit of the last process. Prints one JSON line, with the stop time projected for the ESM-2 650M and 3B
presets at the measured speed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from protein_mlm.model.esm import build_model
from protein_mlm.training.checkpoint import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
PARAMETERS = {"esm2_650m": 651_043_254, "esm2_3b": 2_839_005_634}  # docs/scaling.md's memory table
BYTES_PER_PARAMETER = 12  # fp32 weights + AdamW's two fp32 moments


def architecture(preset: str) -> dict:
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={preset}"])
    return OmegaConf.to_container(cfg.model.architecture, resolve=True)


def write_speed(preset: str, folder: Path, repeats: int) -> tuple[int, float]:
    """(bytes, best seconds) of saving the preset's training state durably."""
    model = build_model(architecture(preset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates both moments
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    path, best = folder / "last.ckpt", float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
        best = min(best, time.perf_counter() - started)
    size = path.stat().st_size
    path.unlink()
    return size, best


def stop_run(folder: Path, ranks: int) -> dict[str, float]:
    """Seconds from SIGUSR2 (sent at update 3 to the last rank) to last.ckpt's rename and to the processes' exit."""
    run_dir, pid_file = folder / f"stop{ranks}", folder / f"pid{ranks}"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=tiny",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_steps=40",
        "trainer.num_sanity_val_steps=0",
        "data.max_length=64",
        "data.max_tokens=512",
        "callbacks.progress_bar=null",
        "callbacks.resume_checkpoint.every_n_train_steps=1000",
        "print_config=false",
        "+callbacks.await_signal._target_=protein_mlm.training.debug.callbacks.AwaitSignal",
        "+callbacks.await_signal.at_step=3",
        f"+callbacks.await_signal.rank={ranks - 1}",
        f"+callbacks.await_signal.pid_file={pid_file}",
        f"hydra.run.dir={run_dir}",
        *(["trainer=ddp", "trainer.devices=2", "num_threads=1"] if ranks > 1 else []),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (pid_file.is_file() and pid_file.read_text()):
        if process.poll() is not None:
            raise SystemExit(f"the {ranks}-rank run ended before update 3")
        time.sleep(0.01)
    sent = time.time()
    os.kill(int(pid_file.read_text()), signal.SIGUSR2)
    process.wait()
    exited = time.time()
    saved = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime
    return {"to_last_ckpt_s": saved - sent, "to_exit_s": exited - sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="esm2_35m", help="preset whose training state is written")
    parser.add_argument("--dir", default=None, help="folder to write to (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stop-runs", action="store_true", help="also time signal -> last.ckpt of tiny runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        size, seconds = write_speed(args.model, Path(tmp), args.repeats)
        speed = size / seconds
        result = {"model": args.model, "checkpoint_bytes": size, "write_s": round(seconds, 3)}
        result["write_bytes_per_s"] = round(speed)
        for preset, count in PARAMETERS.items():
            result[f"{preset}_write_s"] = round(count * BYTES_PER_PARAMETER / speed, 1)
        if args.stop_runs:
            for ranks in (1, 2):
                result[f"stop_{ranks}_rank"] = {k: round(v, 2) for k, v in stop_run(Path(tmp), ranks).items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
