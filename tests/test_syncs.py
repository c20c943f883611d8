"""Host syncs on the training hot path, counted on CPU: on a GPU each one stalls the host until the device drains.

A `TorchDispatchMode` sees the ops that force a sync on a GPU (a tensor read into Python, boolean-mask indexing
with its hidden `nonzero`, `masked_select`); patched `Tensor` methods see reads that never reach the dispatcher
on CPU (`.cpu()`, `.numpy()`, `.tolist()`). Batches are made in a worker process, as in a real run, so collate
work (host-side by design) is not counted.
"""

import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from torch.utils._python_dispatch import TorchDispatchMode

from protein_mlm.train import train

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
