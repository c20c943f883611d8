"""Checkpoint files on disk: which one a run dir resolves to, and what an interrupted write or build leaves."""

import os
import subprocess
import sys

import pytest
import torch

from protein_mlm.data import preprocess
from protein_mlm.model.checkpoints import resolve_checkpoint
from protein_mlm.training.checkpoint import AtomicCheckpointIO


def test_a_run_dir_resolves_to_its_lowest_validation_loss_not_its_latest_step(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("best-step000100-val_loss2.1000.ckpt", "best-step000300-val_loss2.3000.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"x")
    assert resolve_checkpoint(tmp_path).name == "best-step000100-val_loss2.1000.ckpt"
    for best in folder.glob("best-*"):
        best.unlink()
    assert resolve_checkpoint(tmp_path).name == "last.ckpt"


def test_a_failed_write_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_temporary_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    (tmp_path / ".last.ckpt.tmp-999999").write_bytes(b"half a checkpoint")  # a process killed mid-write
    io.save_checkpoint({"step": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_cache_build_abandoned_by_a_killed_process_is_removed(tmp_path):
    fasta = tmp_path / "a.fasta"
    fasta.write_text(">a\nMKVLAAGIVG\n>b\nMKTAYIAKQR\n>c\nGSHMLEDPVA\n")
    key = preprocess.cache_key(fasta, None, None, val_fraction=0.5)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / "cache" / f".{key}-{int(dead.stdout)}-xyz"
    abandoned.mkdir(parents=True)
    (abandoned / "train.arrow").write_bytes(b"partial")
    running = tmp_path / "cache" / f".{key}-{os.getpid()}-abc"  # a live process's build is left alone
    running.mkdir()
    preprocess.load_splits(fasta, None, 0.5, tmp_path / "cache")
    assert not abandoned.exists() and running.exists()


def test_a_resume_removes_best_files_from_the_abandoned_continuation(tmp_path):
    """Killed after a best checkpoint at step 8 but before last.ckpt caught up: the resume from step 6 redoes it."""
    from types import SimpleNamespace

    from protein_mlm.training.callbacks import BestCheckpoint

    kept, orphan = tmp_path / "best-step000004-val_loss2.5000.ckpt", tmp_path / "best-step000008-val_loss2.4000.ckpt"
    kept.write_bytes(b"x"), orphan.write_bytes(b"x")
    callback = BestCheckpoint(dirpath=str(tmp_path), monitor="val/loss", save_top_k=1)
    callback.best_k_models, callback.best_model_path = {str(kept): torch.tensor(2.5)}, str(kept)
    trainer = SimpleNamespace(global_step=6, is_global_zero=True)
    callback.on_train_start(trainer, None)
    assert kept.exists() and not orphan.exists()
