"""Shared fixtures: configs composed with Hydra's compose API, shrunk to tiny CPU runs."""

import gzip
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

TINY = [
    "model=tiny",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.num_sanity_val_steps=0",
    "data.max_length=64",
    "data.max_tokens=512",
    "scheduler.warmup_steps=4",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "print_config=false",
]


def pytest_report_header(config) -> str:
    """The versions the suite ran with, first thing in its output (the lock is constraints.txt)."""
    from importlib.metadata import version

    names = ("torch", "transformers", "pytorch-lightning", "hydra-core", "datasets", "numpy", "pyarrow")
    return "versions: " + ", ".join(f"{name} {version(name)}" for name in names)


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One Arrow cache for the whole session: the bundled data is tokenized once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_cfg(tmp_path, cache_dir):
    """Factory: a tiny-model training config writing into tmp_path, with extra overrides."""

    def make(*overrides: str) -> DictConfig:
        cfg = compose_config(*TINY, f"paths.cache_dir={cache_dir}", *overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    return make


def run_cli(*args: str, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def small_fasta(tmp_path_factory) -> list[str]:
    """Overrides for a 60-sequence training FASTA and a 15-sequence validation FASTA cut from the bundled sample:
    with data.max_length=128 and data.max_tokens=1024 an epoch is 7 batches, so short runs span several epochs."""
    folder = tmp_path_factory.mktemp("small")
    records, name, residues = [], None, []
    with gzip.open(ROOT / "src/protein_mlm/assets/swissprot_sample.fasta.gz", "rt") as f:
        for line in f:
            if line.startswith(">"):
                if name:
                    records.append((name, "".join(residues)))
                name, residues = line[1:].split()[0], []
            else:
                residues.append(line.strip())
    picked = [r for r in records if 30 < len(r[1]) < 400][:75]
    for path, part in ((folder / "train.fasta", picked[:60]), (folder / "val.fasta", picked[60:])):
        path.write_text("".join(f">{n}\n{s}\n" for n, s in part))
    return [
        f"data.train_path={folder / 'train.fasta'}",
        f"data.val_path={folder / 'val.fasta'}",
        f"paths.cache_dir={folder / 'cache'}",
    ]
