"""What the ranks of a DDP run must agree on at each update, in one asynchronous all-reduce per update.

An update's gradient is rescaled by its target count over all ranks and micro-batches, so that count is summed
over the ranks once per update. The same collective carries the loss sum, the update's real tokens (so
`train/tokens_seen` and tok/s count every rank) and each rank's stop vote, one count per stop signal (a signal may
reach only some ranks, and which one it was decides whether the job is requeued): no barrier, no collective per
micro-batch, and no host read of a device value. The totals travel in float64: token counts stay exact far beyond
float32's 2^24 per update.
The vote is read on the host `VOTE_LAG` updates later, from a copy made when the all-reduce finished; by then the
device has long passed it, so the read never stalls the host, and every rank reads the same votes at the same step.
"""

import collections

import torch
import torch.distributed as dist

from protein_mlm.training.stopping import REQUEUE_SIGNALS, STOP_SIGNALS

VOTE_LAG = 2  # updates between a vote's all-reduce and its read on the host


class UpdateAgreement:
    """Launch an update's all-reduce, wait for it where its totals are needed, and keep its stop votes."""

    def __init__(self):
        self._votes: collections.deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = collections.deque()

    def start(
        self, loss_sum: torch.Tensor, targets: torch.Tensor, signum: int | None, tokens: int
    ) -> tuple[torch.Tensor, dist.Work]:
        """All-reduce (loss sum, target count, real tokens, a vote per stop signal) of this rank's window,
        asynchronously."""
        # Host numbers enter as fills on the device, not host-to-device copies (each would be a sync on a GPU).
        host = [float(tokens)] + [float(signum == sig) for sig in STOP_SIGNALS]
        filled = [torch.full_like(loss_sum, value, dtype=torch.float64) for value in host]
        totals = torch.stack([loss_sum.detach().double(), targets.to(loss_sum.device, torch.float64), *filled])
        return totals, dist.all_reduce(totals, op=dist.ReduceOp.SUM, async_op=True)

    def finish(
        self, pending: tuple[torch.Tensor, dist.Work], step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss sum, target count, real tokens) over all ranks; on a GPU the wait orders the device stream, the
        host goes on."""
        totals, work = pending
        work.wait()
        self._keep_vote(step, totals[3:])
        return totals[0], totals[1], totals[2]

    def _keep_vote(self, step: int, votes: torch.Tensor) -> None:
        if votes.device.type != "cuda":
            self._votes.append((step, votes.clone(), None))
            return
        host = torch.empty(votes.shape, dtype=votes.dtype, pin_memory=True)
        host.copy_(votes, non_blocking=True)  # lands when the device gets there; the event says when
        event = torch.cuda.Event()
        event.record()
        self._votes.append((step, host, event))

    def stop_agreed(self, step: int) -> int | None:
        """At the update boundary before update `step`: the stop signal any rank voted for up to update
        `step - VOTE_LAG` (a requeue signal over SIGTERM), or None to go on.

        Every rank calls it at the same boundaries and reads the same all-reduced votes, so all stop together, and
        alike: rank 0 requeues the job where any rank got a requeue signal.
        """
        counts = torch.zeros(len(STOP_SIGNALS), dtype=torch.float64)
        while self._votes and self._votes[0][0] <= step - VOTE_LAG:
            _, host, event = self._votes.popleft()
            if event is not None:
                event.synchronize()  # passed long ago: a wait on that point only, not on the whole stream
            counts += host.cpu()
        return _agreed(counts)

    def agree_now(self, signum: int | None, device: torch.device) -> int | None:
        """The stop signal any rank got so far, by one blocking all-reduce (once, before the first update)."""
        votes = torch.tensor([float(signum == sig) for sig in STOP_SIGNALS], device=device)
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)
        return _agreed(votes.cpu())


def _agreed(counts: torch.Tensor) -> int | None:
    """The signal the ranks stop for, from the vote counts per stop signal: a requeue signal over SIGTERM."""
    voted = [sig for sig, count in zip(STOP_SIGNALS, counts.tolist(), strict=True) if count > 0]
    return next((sig for sig in voted if sig in REQUEUE_SIGNALS), voted[0] if voted else None)
