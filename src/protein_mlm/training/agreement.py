"""What the ranks of a DDP run must agree on at each update, in one asynchronous all-reduce per update.

An update's gradient is rescaled by its target count over all ranks and micro-batches, so that count is summed
over the ranks once per update. The same collective carries the loss sum, the update's real tokens (so
`train/tokens_seen` and tok/s count every rank) and each rank's stop vote (a SIGTERM may reach only some ranks): no
barrier, no collective per micro-batch, and no host read of a device value. The totals travel in float64: token
counts stay exact far beyond float32's 2^24 per update.
The vote is read on the host `VOTE_LAG` updates later, from a copy made when the all-reduce finished; by then the
device has long passed it, so the read never stalls the host, and every rank reads the same votes at the same step.
"""

import collections

import torch
import torch.distributed as dist

VOTE_LAG = 2  # updates between a vote's all-reduce and its read on the host


class UpdateAgreement:
    """Launch an update's all-reduce, wait for it where its totals are needed, and keep its stop votes."""

    def __init__(self):
        self._votes: collections.deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = collections.deque()

    def start(
        self, loss_sum: torch.Tensor, targets: torch.Tensor, stop: bool, tokens: int
    ) -> tuple[torch.Tensor, dist.Work]:
        """All-reduce (loss sum, target count, stop votes, real tokens) of this rank's window, asynchronously."""
        # Host numbers enter as fills on the device, not host-to-device copies (each would be a sync on a GPU).
        vote = torch.full_like(loss_sum, float(stop), dtype=torch.float64)
        host_tokens = torch.full_like(loss_sum, float(tokens), dtype=torch.float64)
        totals = torch.stack(
            [loss_sum.detach().double(), targets.to(loss_sum.device, torch.float64), vote, host_tokens]
        )
        return totals, dist.all_reduce(totals, op=dist.ReduceOp.SUM, async_op=True)

    def finish(
        self, pending: tuple[torch.Tensor, dist.Work], step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss sum, target count, real tokens) over all ranks; on a GPU the wait orders the device stream, the
        host goes on."""
        totals, work = pending
        work.wait()
        self._keep_vote(step, totals[2])
        return totals[0], totals[1], totals[3]

    def _keep_vote(self, step: int, votes: torch.Tensor) -> None:
        if votes.device.type != "cuda":
            self._votes.append((step, votes.clone(), None))
            return
        host = torch.empty((), dtype=votes.dtype, pin_memory=True)
        host.copy_(votes, non_blocking=True)  # lands when the device gets there; the event says when
        event = torch.cuda.Event()
        event.record()
        self._votes.append((step, host, event))

    def stop_agreed(self, step: int) -> bool:
        """At the update boundary before update `step`: did any rank vote to stop up to update `step - VOTE_LAG`?

        Every rank calls it at the same boundaries and reads the same all-reduced votes, so all stop together.
        """
        stop = False
        while self._votes and self._votes[0][0] <= step - VOTE_LAG:
            _, host, event = self._votes.popleft()
            if event is not None:
                event.synchronize()  # passed long ago: a wait on that point only, not on the whole stream
            stop = stop or bool(host > 0)
        return stop
