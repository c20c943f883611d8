"""Host syncs on the training hot path, counted on CPU: on a GPU each one stalls the host until the device drains.

A `TorchDispatchMode` sees the ops that force a sync on a GPU (a tensor read into Python, boolean-mask indexing
with its hidden `nonzero`, `masked_select`); patched `Tensor` methods see reads that never reach the dispatcher
on CPU (`.cpu()`, `.numpy()`, `.tolist()`). Batches are made in a worker process, as in a real run, so collate
work (host-side by design) is not counted.
"""

import collections
import json
import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from torch.utils._python_dispatch import TorchDispatchMode

from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.train import train
from tests.conftest import TINY, run_cli

SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}
PYTHON_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__", "__index__")
STEPS, LOG_EVERY = 20, 10


def _caller() -> str:
    """The first frame outside torch: who asked for the value."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not any(s in frame.filename for s in ("/torch/", "test_syncs", "apply_func", "lightning_fabric/utilities")):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "?"


class SyncCounter(TorchDispatchMode, pl.Callback):
    """Records every host sync between the start and the end of training, with the code that caused it."""

    instances: list["SyncCounter"] = []

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._inside_read = 0
        self._saved: dict[str, object] = {}
        SyncCounter.instances.append(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or []
        )
        if not self._inside_read and (name in SYNC_OPS or bool_index):
            self.events.append(f"{name} from {_caller()}")
        return func(*args, **kwargs)

    def _patch(self) -> None:
        for method in PYTHON_READS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def read(tensor, *args, _original=original, _method=method, **kwargs):
                if not self._inside_read:
                    self.events.append(f"Tensor.{_method} from {_caller()}")
                self._inside_read += 1
                try:
                    return _original(tensor, *args, **kwargs)
                finally:
                    self._inside_read -= 1

            setattr(torch.Tensor, method, read)

    def _unpatch(self) -> None:
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)

    def on_train_start(self, trainer, pl_module):
        self._patch()
        self.__enter__()

    def on_train_end(self, trainer, pl_module):
        self.__exit__(None, None, None)
        self._unpatch()


@pytest.mark.parametrize("packing", [False, True])
def test_training_step_is_sync_free_between_log_intervals(tiny_cfg, packing):
    """20 updates of 2 micro-batches, logging every 10: at most two host syncs per logging interval."""
    cfg = tiny_cfg(
        f"data.packing={packing}",
        f"trainer.max_steps={STEPS}",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        "+trainer.limit_val_batches=0",
        "trainer.accumulate_grad_batches=2",
        "data.num_workers=1",
        "callbacks.resume_checkpoint=null",
        "callbacks.plain_progress.every_seconds=100000",
    )
    with open_dict(cfg):
        cfg.callbacks.sync_counter = {"_target_": f"{__name__}.SyncCounter"}
    SyncCounter.instances.clear()
    try:
        train(cfg)
    finally:
        for counter in SyncCounter.instances:
            counter._unpatch()
    (counter,) = SyncCounter.instances
    allowed = 2 * (STEPS // LOG_EVERY)
    assert len(counter.events) <= allowed, f"{len(counter.events)} host syncs:\n" + "\n".join(counter.events)


COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "barrier", "broadcast",
    "broadcast_object_list", "gather", "monitored_barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "scatter",
)  # fmt: skip


class CollectiveCounter(pl.Callback):
    """In every DDP process: the `torch.distributed` calls made inside each training micro-batch (its hooks,
    step, backward and optimizer step; DDP's gradient buckets run in C++ and are not calls of these functions)."""

    def __init__(self, out_dir: str):
        self.out_dir, self.calls, self.batches = Path(out_dir), None, []

    def setup(self, trainer, pl_module, stage):
        for name in COLLECTIVES:
            original = getattr(torch.distributed, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                if self.calls is not None:
                    self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(torch.distributed, name, counted)

    def on_train_start(self, trainer, pl_module):
        self.calls = []  # a batch's calls: from the end of the one before it (so every batch-start hook counts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((batch_idx, self.calls))
        self.calls = []

    def on_validation_start(self, trainer, pl_module):
        self.calls = None  # validation's own reductions are not the training step's

    def on_validation_end(self, trainer, pl_module):
        self.calls = []

    def on_train_end(self, trainer, pl_module):
        record = {"world": trainer.world_size, "batches": self.batches}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_makes_one_collective_per_update_and_none_per_micro_batch(tmp_path, cache_dir):
    """2 gloo ranks x 2 micro-batches per update: one all-reduce per update (the target count, the loss sum and
    the stop votes together), in the update's last micro-batch; no barrier, nothing in the others."""
    out = tmp_path / "calls"
    out.mkdir()
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    result = run_cli(
        *overrides,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "num_threads=1",
        "trainer.max_steps=8",
        "trainer.val_check_interval=8",
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=3",  # reads of the updates inside the window: no collective either
        "callbacks.resume_checkpoint.every_n_train_steps=1000",  # a save's barrier is the checkpoint's, not a step's
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.counter._target_=tests.test_syncs.CollectiveCounter",
        f"+callbacks.counter.out_dir={out}",
        "+callbacks.recorder._target_=protein_mlm.training.debug.callbacks.BatchRecorder",
        f"+callbacks.recorder.path={out / 'batches.jsonl'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((out / f"rank{rank}.json").read_text())
        assert record["world"] == 2 and len(record["batches"]) == 16
        for batch_idx, calls in record["batches"]:
            assert calls == ([] if batch_idx % 2 == 0 else ["all_reduce"]), (rank, batch_idx, calls)
    # That one all-reduce also sums the update's real tokens: train/tokens_seen and tok/s count both ranks.
    per_update = collections.Counter()
    for name in ("batches.rank0.jsonl", "batches.rank1.jsonl"):
        for line in (out / name).read_text().splitlines():
            per_update[json.loads(line)["step"]] += json.loads(line)["tokens"]
    assert len(per_update) == 8
    seen = dict(read_scalars(tmp_path / "run")["train/tokens_seen"])
    assert seen == {step: sum(per_update[s] for s in range(step + 1)) for step in range(8)}
    speed = read_scalars(tmp_path / "run")["perf/tokens_per_sec"]
    assert speed and all(v > 0 for _, v in speed)
