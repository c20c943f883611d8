"""Several processes, several "nodes": what each rank may touch before Lightning gives it its GPU, one run dir
for all nodes, and a two-node torchrun run (gloo on localhost) that trains and resumes exactly."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protein_mlm.cli import make_run_dir, prepare_run
from protein_mlm.errors import ConfigError
from protein_mlm.plan import build_schedule
from protein_mlm.preflight import check_config
from protein_mlm.reporting.lr_plan import planned_lrs
from protein_mlm.reporting.tblog import read_scalars
from tests.conftest import ROOT, TINY, compose_config, run_cli


def refuse(*args, **kwargs):
    raise AssertionError("a CUDA query that creates a context or reads the current device")


@pytest.mark.parametrize("rank", [1, 3])
def test_preflight_on_a_nonzero_rank_creates_no_cuda_context(monkeypatch, rank):
    """A DDP rank checks its config before Lightning sets its device: it asks only context-free device queries,
    of its own GPU (LOCAL_RANK), never the free memory of GPU 0."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank % 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("mem_get_info", "get_device_name", "current_device", "is_bf16_supported", "set_device", "init"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    asked = []

    def capability(device):
        asked.append(device)
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: asked.append(d) or type("P", (), {"name": "NVIDIA H200"})
    )
    cfg = compose_config("model=tiny", "trainer=ddp", "trainer.accelerator=gpu", "trainer.precision=auto")
    plan = check_config(cfg)
    assert plan.precision == "bf16-mixed" and plan.peak_tflops == 989.0 and plan.on_gpu
    assert asked and set(asked) == {rank % 2}  # its own GPU, not GPU 0 for every rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(run_dir: Path, cwd: Path, *overrides: str) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes=2 --nproc-per-node=1` twice on localhost, one per "node", sharing one run dir."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    env.setdefault("PROTEIN_MLM_CONFIGS", str(ROOT / "configs"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    nodes = [
        subprocess.Popen(
            [
                *torchrun,
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(ROOT / "train.py"),
                *overrides,
                f"hydra.run.dir={run_dir}",
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return results


TWO_NODES = [
    *[o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval", "trainer.accel"))],
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=2",
    "trainer.val_check_interval=10",
    "num_threads=1",
]


@pytest.mark.slow
def test_two_torchrun_nodes_train_resume_exactly_and_write_one_run_dir(tmp_path, cache_dir):
    """Two "nodes" of one gloo process each: the LR of the schedule at every step, checkpoints written once by
    global rank 0, and 20 steps resumed to 30 equal to 30 steps straight."""
    common = [*TWO_NODES, f"paths.cache_dir={cache_dir}"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    for result in two_nodes(resumed, tmp_path, *common, "trainer.max_steps=20"):
        assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.startswith("last")) == ["last.ckpt"]
    assert len(list(resumed.rglob("events.out.tfevents.*"))) == 1 and (resumed / "train_ddp_process_1.log").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["resumed"]  # no ${now} dir of another node

    schedule = build_schedule(compose_config(*common, "trainer.max_steps=30"))
    lr = read_scalars(resumed)["lr-inverse_sqrt"]
    assert [s for s, _ in lr] == list(range(20))
    assert [v for _, v in lr] == pytest.approx(planned_lrs(schedule, 1e-3, 20), rel=1e-6)

    for result in two_nodes(resumed, tmp_path, f"resume={resumed}", "trainer.max_steps=30"):
        assert result.returncode == 0, result.stderr[-3000:]
    for result in two_nodes(straight, tmp_path, *common, "trainer.max_steps=30"):
        assert result.returncode == 0, result.stderr[-3000:]
    ours = {tag: dict(points) for tag, points in read_scalars(resumed).items()}
    theirs = {tag: dict(points) for tag, points in read_scalars(straight).items()}
    assert sorted(ours["train/loss"]) == list(range(30)) == sorted(theirs["train/loss"])
    assert ours["lr-inverse_sqrt"] == theirs["lr-inverse_sqrt"]
    assert [ours["train/loss"][s] for s in range(30)] == pytest.approx([theirs["train/loss"][s] for s in range(30)])
    assert ours["train/tokens_seen"] == theirs["train/tokens_seen"]


def test_a_multi_node_launch_without_a_shared_run_dir_is_one_line(tmp_path, monkeypatch):
    """torchrun without --rdzv-id or hydra.run.dir: each process would resolve ${now} to a dir of its own."""
    monkeypatch.chdir(tmp_path)
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "RANK": "1", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "none"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="need one run dir for all of them"):
        prepare_run("train", ["model=tiny"], check_config)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    cfg, _ = prepare_run("train", ["model=tiny"], check_config)
    assert cfg.hydra.run.dir == "outputs/torchrun-job7" and cfg.hydra.job.name == "train_ddp_process_1"
    assert not (tmp_path / "outputs").exists()  # a rank > 0 creates no run dir


def test_rank_zero_accepts_a_run_dir_holding_only_other_ranks_logs(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train_ddp_process_1.log").write_text("node 1 started first\n")
    assert make_run_dir(str(run_dir), explicit=True) == str(run_dir)
    (run_dir / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="already holds files"):
        make_run_dir(str(run_dir), explicit=True)


@pytest.mark.slow
def test_a_sigterm_stops_all_ddp_ranks_at_one_update_and_the_run_resumes(tmp_path, cache_dir):
    """2 gloo processes, each sent SIGTERM at the start of update 3: the votes travel with update 3's all-reduce and
    both ranks stop at the boundary two updates on, after saving last.ckpt there; `resume=` then finishes the run."""
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("trainer.accelerator")]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "num_threads=1"]
    interrupt = [
        "+callbacks.interrupt._target_=protein_mlm.training.debug.callbacks.Interrupt",
        "+callbacks.interrupt.at_step=3",
        "+callbacks.interrupt.signal_name=TERM",
    ]
    result = run_cli(
        *overrides, *ddp, *interrupt, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "stopped by SIGTERM after step 5" in result.stderr.strip().splitlines()[-1]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 5
    result = run_cli(f"resume={run_dir}", "callbacks.interrupt=null", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(dict(read_scalars(run_dir)["train/loss"])) == list(range(12))


@pytest.mark.parametrize(
    ("devices", "local_rank", "gpu"), [("[2,3]", 0, 2), ("[2,3]", 1, 3), ("2", 1, 1), ("[5]", 0, 5)]
)
def test_each_rank_reads_the_gpu_it_trains_on_from_a_list_of_device_ids(monkeypatch, devices, local_rank, gpu):
    """trainer.devices=[2,3]: local rank 1 trains on GPU 3, so its precision, packing and MFU peak are GPU 3's,
    and rank 0's memory check reads GPU 2's free memory, never GPU 0's (no context on a GPU the run does not use)."""
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse)
    names = {i: ("Tesla T4", (7, 5)) if i == gpu else ("NVIDIA H100 80GB HBM3", (9, 0)) for i in range(8)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: names[d][1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"name": names[d][0]}))
    free = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: free.append(d) or (15 * 2**30, 16 * 2**30))
    cfg = compose_config("model=tiny", "trainer=ddp", "trainer.accelerator=gpu", f"trainer.devices={devices}")
    plan = check_config(cfg)
    assert (plan.gpu.index, plan.gpu.name, plan.precision, plan.packing) == (gpu, "Tesla T4", "16-mixed", False)
    assert plan.peak_tflops == 65.0
    assert free == ([gpu] if local_rank == 0 else [])  # only rank 0 checks memory, of its own GPU


@pytest.mark.parametrize(("launcher", "cores", "expected"), [("srun", 8, 4), ("srun", 2, 1), ("torchrun", 64, 4)])
def test_auto_workers_under_srun_use_the_tasks_own_cores(monkeypatch, launcher, cores, expected):
    """srun --cpus-per-task=8 with 8 tasks per node: each task's affinity is its own 8 cores, not to be divided by
    the 8 devices again (that gave 0 workers); torchrun's processes share the node's cores and split them."""
    from protein_mlm import launch
    from protein_mlm.plan import resolve_num_workers

    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(cores)))
    if launcher == "srun":
        monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")  # 2 nodes x 8 tasks
    else:
        monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert resolve_num_workers("auto", on_gpu=True, devices=8) == expected
