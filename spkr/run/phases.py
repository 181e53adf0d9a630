"""Where a training step's time goes: the phase clock behind the ``phases`` of metrics.jsonl train rows.

    clock = PhaseClock(device)          # on for CPU (cheap: host timestamps, ops are synchronous)
    clock.reset()                       # a window starts (with its TrainWindow)
    clock.lap("data_wait"); clock.lap("forward"); clock.lap_backward(); clock.lap("optimizer")
    row["phases"], row["allreduce_inflight"] = clock.take(steps)   # seconds per optimizer step

Every second of a window's wall time goes to exactly one phase (they sum to the window's wall time):

- ``data_wait``: waiting for the next batch from the loader (``next(batches)``).
- ``forward``: host-to-device copy, SpecAugment, the model's forward and the loss.
- ``backward``: ``backward()`` minus the exposed all-reduce below (under DDP it includes the
  all-reduces that overlap it, which share the cores with it on CPU).
- ``allreduce``: the all-reduce wait that backward could not hide. DDP all-reduces gradient buckets
  from autograd hooks while backward still computes; :func:`timed_allreduce_hook` (DDP's default
  allreduce hook, wrapped) timestamps each bucket's launch, and this phase is the time from the last
  bucket's launch until ``backward()`` returns: that bucket's all-reduce, any earlier bucket still
  queued behind it, waiting for the slower rank to reach the same bucket, and DDP copying the averaged
  gradients back. 0 without DDP and on ``no_sync`` micro-steps (gradient accumulation).
- ``optimizer``: gradient clipping, the (scaled) AdamW step, zeroing the gradients, the schedule.
- ``other``: the rest: loss/accuracy read-out, metrics rows, progress bar, mid-epoch checkpoints.

``allreduce_inflight`` (beside the phases, overlapping ``backward``): per optimizer step, the wall
time during which at least one bucket's all-reduce was in flight (union of launch -> completion of
each bucket's future, completion stamped by a callback on the future).

On CUDA the clock is off by default (``PhaseClock(device, enabled=True)`` turns it on): a phase's GPU
time is only known after ``torch.cuda.synchronize()``, which it then calls at every phase boundary,
and that stalls the pipeline the numbers are meant to describe.
"""

from __future__ import annotations

import time

import torch

PHASES = ("data_wait", "forward", "backward", "allreduce", "optimizer", "other")


class AllReduceTimes:
    """State of :func:`timed_allreduce_hook`: each bucket's (launch, completion) of the current backward."""

    def __init__(self):
        self.launches: list[float] = []
        self.spans: list[tuple[float, float]] = []

    def take(self) -> tuple[float | None, list[tuple[float, float]]]:
        """(last launch, [(launch, completion)]) since the previous take, and start over."""
        last = max(self.launches) if self.launches else None
        spans, self.launches, self.spans = self.spans, [], []
        return last, spans


def timed_allreduce_hook(state: AllReduceTimes, bucket):  # no return annotation: DDP checks it
    """DDP's default all-reduce of a gradient bucket (the mean over ranks: ``default_hooks.allreduce_hook``
    of torch.distributed.algorithms.ddp_comm_hooks), its launch and completion times recorded in
    ``state``; returns the same ``Future[Tensor]``, so the reduced gradients are the default's."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    launch = time.perf_counter()
    state.launches.append(launch)
    fut = default_hooks.allreduce_hook(None, bucket)

    def completed(f: torch.futures.Future) -> torch.Tensor:
        state.spans.append((launch, time.perf_counter()))
        return f.value()

    return fut.then(completed)


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


class PhaseClock:
    """Accumulates a window's wall time per phase (:data:`PHASES`); a no-op when disabled."""

    def __init__(self, device: torch.device = torch.device("cpu"), enabled: bool | None = None):
        self.enabled = device.type == "cpu" if enabled is None else enabled
        self.sync = device.type == "cuda"
        self.comm: AllReduceTimes | None = None  # set by :meth:`hook_ddp`
        self.reset()

    def hook_ddp(self, ddp_model) -> None:
        """Time ``ddp_model``'s gradient all-reduces (call before its first forward)."""
        if self.enabled:
            self.comm = AllReduceTimes()
            ddp_model.register_comm_hook(self.comm, timed_allreduce_hook)

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        """Start a window: every phase at 0, the clock at now."""
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.inflight = 0.0
        self.mark = self._now() if self.enabled else 0.0

    def lap(self, phase: str) -> float:
        """Charge the time since the previous lap to ``phase``; returns it (0.0 when disabled)."""
        if not self.enabled:
            return 0.0
        now = self._now()
        spent, self.mark = now - self.mark, now
        self.seconds[phase] += spent
        return spent

    def lap_backward(self) -> None:
        """Right after ``backward()``: split the time since the previous lap into ``backward`` and the
        exposed ``allreduce`` (from the last bucket's launch on)."""
        if not self.enabled:
            return
        start = self.mark
        spent = self.lap("backward")
        if self.comm is None:
            return
        last_launch, spans = self.comm.take()
        if last_launch is not None:
            exposed = min(spent, max(0.0, self.mark - max(last_launch, start)))
            self.seconds["backward"] -= exposed
            self.seconds["allreduce"] += exposed
        self.inflight += union_length(spans)

    def take(self, steps: int) -> tuple[dict[str, float], float] | None:
        """(seconds per optimizer step of each phase, all-reduce in flight per step) of the window
        that ends now (its remainder charged to ``other``); starts the next window. None if disabled."""
        if not self.enabled:
            return None
        self.lap("other")
        n = max(steps, 1)
        result = {k: v / n for k, v in self.seconds.items()}, self.inflight / n
        self.reset()
        return result
