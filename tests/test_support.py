"""docs/support.md's table, cell by cell: each row on each hardware it names resolves to the plan it states or is
refused with the message it quotes, with the device queries patched and no CUDA context allowed."""

import gzip
import json
import math

import pytest
import torch

from protein_mlm import launch
from protein_mlm import plan as plan_module
from protein_mlm.errors import ConfigError
from protein_mlm.plan import plan_rows
from protein_mlm.preflight import check_config
from protein_mlm.train import train
from tests.conftest import ROOT, TINY, compose_config, run_cli

SUPPORT = ROOT / "docs" / "support.md"
GIB = 2**30
# name, compute capability, memory of the GPUs the table's hardware stands for (as torch reports them)
HARDWARE = {
    "cpu": None,
    "sm70": ("Tesla V100-SXM2-16GB", (7, 0), 16 * GIB),
    "sm75": ("Tesla T4", (7, 5), 15 * GIB),
    "sm80": ("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GIB),
    "sm90": ("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB),
}
LAUNCHERS = {  # the environment each launcher gives the process the row describes
    "python": {},
    "torchrun": {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "t"},
    "srun": {"SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_LOCALID": "3"},
    "submitit": {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SUBMITIT_EXECUTOR": "slurm"},
}
CORES = {"python": 16, "torchrun": 16, "srun": 8, "submitit": 8}  # affinity: the node's, or the task's own share


def cells() -> list[tuple[str, str, str, str]]:
    """(hardware, launcher, overrides, expected) for every hardware every row of the table names."""
    rows = []
    for line in SUPPORT.read_text().split("## Every cell")[1].splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) != 5 or parts[0] in ("hardware", "---"):
            continue
        hardware, launcher, overrides, expected, _ = parts
        names = list(HARDWARE) if hardware == "any" else hardware.split()
        rows += [(name, launcher, overrides.strip("`"), expected) for name in names]
    return rows


CELLS = cells()


def refuse(*args, **kwargs):
    raise AssertionError("a CUDA context (or a query that makes one)")


def use_hardware(monkeypatch, name: str, launcher: str) -> None:
    """Patch the device queries (and the launcher's environment) to describe `name`; creating a context fails."""
    for key in {k for env in LAUNCHERS.values() for k in env} | {"LOCAL_RANK", "RANK", "SLURM_JOB_ID"}:
        monkeypatch.delenv(key, raising=False)
    for key, value in LAUNCHERS[launcher].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(CORES[launcher])))
    monkeypatch.setattr(plan_module, "cpu_supports_bf16", lambda: False)  # the table's CPU: no AVX512-BF16/AMX
    monkeypatch.setattr(plan_module, "can_compile", lambda on_gpu, quiet=False: True)
    monkeypatch.setattr(plan_module, "varlen_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse)
    for query in ("current_device", "set_device", "is_bf16_supported", "get_device_name", "init"):
        monkeypatch.setattr(torch.cuda, query, refuse)
    gpu = HARDWARE[name]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8 if gpu else 0)
    if gpu:
        gpu_name, capability, memory = gpu
        properties = type("Properties", (), {"name": gpu_name, "major": capability[0], "total_memory": memory})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory - GIB, memory))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The table's {fasta}, {val} and {map}: small FASTA files and a cluster map."""
    folder = tmp_path_factory.mktemp("support")
    records = []
    with gzip.open(ROOT / "src/protein_mlm/assets/swissprot_sample.fasta.gz", "rt") as f:
        for block in f.read().split(">")[1:41]:
            header, *lines = block.splitlines()
            records.append((header.split()[0], "".join(lines)))
    for name, part in (("train", records[:30]), ("val", records[30:])):
        (folder / f"{name}.fasta").write_text("".join(f">{i}\n{s}\n" for i, s in part))
    (folder / "clusters.tsv").write_text("".join(f"c{n % 7}\t{i}\n" for n, (i, _) in enumerate(records)))
    return {"fasta": str(folder / "train.fasta"), "val": str(folder / "val.fasta"), "map": str(folder / "clusters.tsv")}


def overrides_of(name: str, overrides: str, files: dict[str, str]) -> list[str]:
    """The row's overrides, with trainer=cpu / trainer=gpu unless the row picks a trainer."""
    given = [] if overrides == "-" else overrides.format(**files).split()
    if not any(o.startswith("trainer=") for o in given):
        given.insert(0, "trainer=cpu" if name == "cpu" else "trainer=gpu")
    return given


def plan_values(plan) -> dict[str, str]:
    """The plan in the table's words."""
    return {
        "precision": str(plan.precision),
        "packing": "on" if plan.packing else "off",
        "workers": str(plan.num_workers),
        "fused": "on" if plan.optimizer.get("fused") else "off",
        "compile": "on" if plan.compile else "off",
        "attention": plan.attention,
        "gpu": str(plan.gpu.index if plan.gpu else None),
    }


def test_the_table_names_every_hardware_launcher_and_attention_implementation():
    assert {name for name, *_ in CELLS} == set(HARDWARE)
    assert {launcher for _, launcher, *_ in CELLS} == set(LAUNCHERS)
    text = SUPPORT.read_text()
    for implementation in ("sdpa", "eager", "flex_attention", "flash_attention_2", "paged_attention"):
        assert f"attn_implementation={implementation}" in text or implementation == "sdpa"
    assert "(docs/support.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(("name", "launcher", "overrides", "expected"), CELLS)
def test_each_cell_resolves_as_the_table_says(monkeypatch, files, name, launcher, overrides, expected):
    use_hardware(monkeypatch, name, launcher)
    cfg = compose_config(*overrides_of(name, overrides, files))
    gpu = HARDWARE[name]
    if expected.startswith("refused: "):
        message = expected.removeprefix("refused: ").strip("`")
        if gpu:
            message = message.replace("{gpu}", f"{gpu[0]} (GPU 0, compute capability {gpu[1][0]}.{gpu[1][1]})")
        with pytest.raises(ConfigError) as refusal:
            check_config(cfg)
        assert str(refusal.value) == message
        return
    plan = check_config(cfg)
    wanted = dict(pair.split("=", 1) for pair in expected.split() if "=" in pair)
    got = plan_values(plan)
    assert {key: got[key] for key in wanted} == wanted
    assert (plan.gpu is None) == (gpu is None) and (plan.gpu is None or plan.gpu.name == gpu[0])


def test_the_plan_table_shows_every_resolved_auto_and_the_gpu(monkeypatch, tmp_path):
    """plan_only=true on a T4: precision, packing, attention, compile, workers, fused step and the GPU, resolved."""
    use_hardware(monkeypatch, "sm75", "python")
    cfg = compose_config(
        "trainer=gpu", "model=tiny", "data.max_length=64", f"paths.output_dir={tmp_path}", "plan_only=true"
    )
    rows = dict(plan_rows(cfg, check_config(cfg), None))
    assert rows["decided for"] == "Tesla T4 (GPU 0, compute capability 7.5)"
    assert (rows["precision"], rows["packing"], rows["attention"]) == ("16-mixed", "off", "sdpa (padded batches)")
    assert (rows["compile"], rows["loader workers per process"], rows["fused optimizer step"]) == (
        "off",
        "4",
        "off",
    )  # model=tiny: compile false
    assert rows["MFU peak"] == "65 TFLOP/s"
    use_hardware(monkeypatch, "sm90", "python")
    printed = []
    monkeypatch.setattr("protein_mlm.train.print_plan", printed.append)
    train(cfg)  # plan_only: builds no model, trains nothing, prints the plan
    rows = dict(printed[0])
    assert rows["decided for"] == "NVIDIA H100 80GB HBM3 (GPU 0, compute capability 9.0)"
    assert (rows["precision"], rows["packing"]) == ("bf16-mixed", "on")
    assert rows["attention"] == "sdpa, packed rows through varlen flash attention"


RUNNABLE = sorted({(o, e) for n, la, o, e in CELLS if n == "cpu" and la == "python" and not e.startswith("refused")})


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "expected"), RUNNABLE)
def test_each_cpu_cell_that_works_trains(monkeypatch, tiny_cfg, cache_dir, files, tmp_path, overrides, expected):
    """A few updates through Trainer.fit for every CPU row the table says works."""
    monkeypatch.setattr(plan_module, "cpu_supports_bf16", lambda: False)
    given = overrides_of("cpu", overrides, files)
    if "data.streaming=true" in given:
        given += ["data.num_workers=0"]
    short = ["trainer.max_steps=3", "trainer.val_check_interval=3", "data.max_length=64"]
    if "trainer.devices=2" in given:  # several processes: Lightning re-runs the command line, so run train.py as a user
        run_dir = tmp_path / "ddp_run"
        args = [*TINY, f"paths.cache_dir={cache_dir}", *given, *short, "num_threads=1", f"hydra.run.dir={run_dir}"]
        result = run_cli(*args, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        metrics = json.loads((run_dir / "status.json").read_text())
    else:
        metrics = train(tiny_cfg(*given, *short))
    assert metrics["steps"] == 3 and math.isfinite(metrics["val/loss"])


def test_a_device_id_this_machine_does_not_have_is_one_line(monkeypatch):
    """Every rank refuses it, rank 0 too (whose own id, 2, exists), before Lightning would fail on rank 1 only."""
    use_hardware(monkeypatch, "sm90", "python")
    with pytest.raises(ConfigError, match=r"trainer.devices=\[2, 9\] names GPU 9, .* use device ids below 8$"):
        check_config(compose_config("trainer=ddp", "trainer.devices=[2,9]"))
