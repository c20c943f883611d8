"""Several processes, several "nodes": what each rank may touch before Lightning gives it its GPU, one run dir
for all nodes, and a two-node torchrun run (gloo on localhost) that trains and resumes exactly."""

import pytest
import torch

from protein_mlm.preflight import check_config
from tests.conftest import compose_config


def refuse(*args, **kwargs):
    raise AssertionError("a CUDA query that creates a context or reads the current device")


@pytest.mark.parametrize("rank", [1, 3])
def test_preflight_on_a_nonzero_rank_creates_no_cuda_context(monkeypatch, rank):
    """A DDP rank checks its config before Lightning sets its device: it asks only context-free device queries,
    of its own GPU (LOCAL_RANK), never the free memory of GPU 0."""
    monkeypatch.setattr("protein_mlm.preflight._last_checked", None)  # check afresh, not the memo of a test before
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
        torch.cuda, "get_device_properties", lambda d: asked.append(d) or type("P", (), {"name": "H200"})
    )
    cfg = compose_config("model=tiny", "trainer=ddp", "trainer.accelerator=gpu", "trainer.precision=auto")
    plan = check_config(cfg)
    assert plan.precision == "bf16-mixed" and plan.peak_tflops == 989.0 and plan.on_gpu
    assert asked and set(asked) == {rank % 2}  # its own GPU, not GPU 0 for every rank
