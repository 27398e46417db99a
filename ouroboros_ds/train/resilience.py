"""What keeps a multi-rank run from hanging or losing work when a rank is told to stop, dies or hangs.

- ``StopAgreement``: a preemption signal (Slurm's SIGUSR1, SIGTERM) reaches ranks at different
  steps; a checkpoint needs every rank to stop after the same step, so the ranks agree on it.
- ``Watchdog``: the process-group timeout only covers waits inside communication; a rank stuck
  anywhere else in a step would hold the job forever, so a thread ends it.
- ``PeerFailure``: a failed or timed-out process-group operation means a peer is gone; the job
  should end with one line saying so, not a stack trace per rank (see ``trainer.cli``).
"""
from __future__ import annotations

import os
import sys
import threading
import time


class StopAgreement:
    """SIGTERM/SIGUSR1 (Slurm's warning) ask for a clean stop; ranks may get it at different steps.

    After step t every rank starts a one-element all-reduce (max) of its stop flag on a gloo
    group of its own, outside ``train_batch``, and reads it after step t + 1: all ranks read the
    same value there, so all stop after the same step, at most two steps after the first signal.
    Cost: one 4-byte all-reduce per step, in flight while the next step computes.
    """

    def __init__(self, world: int):
        import torch.distributed as tdist

        self.signal = None
        self.group = tdist.new_group(backend="gloo") if world > 1 else None
        self.pending = None

    def handler(self, signum, frame):
        import signal
        self.signal = signal.Signals(signum).name

    def after_step(self) -> bool:
        import torch
        import torch.distributed as tdist

        if self.group is None:
            return self.signal is not None
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([int(self.signal is not None)])
        self.pending = (tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop

    def close(self):
        if self.pending is not None:  # every rank started the same reduces: waiting is local
            self.pending[0].wait()
            self.pending = None


class Watchdog:
    """Ends the process when one step takes longer than --comm-timeout: the process-group timeout
    covers waits inside communication, this covers a rank stuck anywhere else in a step.

    Set ``started`` to ``time.monotonic()`` when a step starts and to None when it ends."""

    def __init__(self, limit: float, rank: int):
        self.limit, self.rank, self.started = limit, rank, None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            time.sleep(min(1.0, self.limit / 4))
            started = self.started
            if started is not None and time.monotonic() - started > self.limit:
                print(f"error: rank {self.rank}: a training step made no progress for {self.limit:.0f} s "
                      "(--comm-timeout): a peer rank died or hung; exiting", file=sys.stderr, flush=True)
                os._exit(3)


class PeerFailure(RuntimeError):
    """A process-group operation failed or timed out: another rank died or hung. The process
    group cannot be torn down cleanly after this (its peers are gone), so ``trainer.cli`` prints
    one line and exits without waiting on them."""
