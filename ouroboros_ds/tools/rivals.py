"""DeepSpeed's own schedules, simulated from their instruction lists: stock 1F1B
(``TrainSchedule``, with or without activation checkpointing) and DualPipeV (``DualPipeVSchedule``).

No formula: each rank runs the ``PipeInstruction`` lists that DeepSpeed's schedule yields for it,
in order, one step (both schedules flush at the end of a step):

- ``ForwardPass`` / ``BackwardPass`` / ``OptimizerStep`` take their cost on the rank (``Costs``, per
  rank and phase); everything else is free.
- A receive waits for the matching send (the n-th ``SendActivation`` from rank a to rank b of a
  phase pairs with the n-th ``RecvActivation`` on b from a; the same for gradients).
  ``TrainSchedule``: a send's message is available when the send runs. ``DualPipeVSchedule``:
  sends and receives are queued and launched by the next ``CommitP2P`` (``batch_isend_irecv``), so
  a message is available when its sender reaches that commit, and the receiver waits at its commit.
- Activation memory: a forward keeps ``Memory.kept`` bytes until its backward; a backward holds
  ``Memory.transient`` more while it runs (the recompute of activation checkpointing).

Unlike the rest of the simulator this module imports DeepSpeed (its schedules), not torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from deepspeed.runtime.pipe import schedule as ds


@dataclass
class RivalCosts:
    """Seconds per instruction: ``forward[rank][phase]``, ``backward[rank][phase]`` (1F1B: phase 0
    only), ``step[rank]``; ``latency`` a message's flight time."""

    forward: list
    backward: list
    step: list
    latency: float = 0.0


@dataclass
class RivalMemory:
    """Bytes per micro-batch: ``kept[rank][phase]`` from a forward to its backward, ``transient``
    during the backward."""

    kept: list
    transient: list | None = None


@dataclass
class RivalResult:
    step_time: float
    busy: list = field(default_factory=list)
    peak: list = field(default_factory=list)

    @property
    def utilization(self) -> list[float]:
        return [b / self.step_time for b in self.busy]


def train_schedules(G: int, M: int) -> list:
    """Stock 1F1B, as ``PipelineEngine`` runs it (``_train_schedule``)."""
    return [ds.TrainSchedule(micro_batches=M, stages=G, stage_id=s) for s in range(G)]


def dualpipev_schedules(G: int, M: int) -> list:
    """DualPipeV, as ``DualPipeVEngine`` runs it (DeepSpeed raises ValueError when M < 2G)."""
    return [ds.DualPipeVSchedule(micro_batches=M, stages=G, stage_id=s) for s in range(G)]


def _peer(cmd, rank: int, G: int, send: bool) -> tuple:
    """(channel, src, dst) of a send or receive: activations flow downstream in their phase."""
    phase = getattr(cmd, "phase", 0)
    grad = isinstance(cmd, (ds.SendGrad, ds.RecvGrad))
    down = rank + 1 if phase == 0 else rank - 1
    up = rank - 1 if phase == 0 else rank + 1
    if grad:  # gradients flow upstream: a send goes up, a receive comes from downstream
        other = up if send else down
    else:
        other = down if send else up
    src, dst = (rank, other) if send else (other, rank)
    return ("grad" if grad else "act", phase, src, dst), src, dst


def simulate_rival(schedules: list, costs: RivalCosts, memory: RivalMemory | None = None) -> RivalResult:
    """One step of ``schedules`` (one per rank). Raises RuntimeError on a deadlock."""
    G = len(schedules)
    cmds = [[c for step in sch.steps() for c in step] for sch in schedules]
    batched = any(isinstance(c, ds.CommitP2P) for cs in cmds for c in cs)
    sent: dict = {}      # channel -> list of available times, in send order
    recvd: dict = {}     # channel -> receives consumed so far
    queued = [[] for _ in range(G)]   # (is_send, channel) queued until the next CommitP2P
    pos, clock, busy = [0] * G, [0.0] * G, [0.0] * G
    live, peak = [0.0] * G, [0.0] * G
    alive: list[dict] = [{} for _ in range(G)]  # buffer -> bytes kept
    published = [False] * G

    def phase_of(c):
        return getattr(c, "phase", 0)

    while any(pos[r] < len(cmds[r]) for r in range(G)):
        moved = False
        for r in range(G):
            while pos[r] < len(cmds[r]):
                c = cmds[r][pos[r]]
                if isinstance(c, (ds.SendActivation, ds.SendGrad)):
                    ch = _peer(c, r, G, True)[0]
                    if batched:
                        queued[r].append((True, ch))
                    else:
                        sent.setdefault(ch, []).append(clock[r] + costs.latency)
                elif isinstance(c, (ds.RecvActivation, ds.RecvGrad)):
                    ch = _peer(c, r, G, False)[0]
                    if batched:
                        queued[r].append((False, ch))
                    else:
                        n = recvd.get(ch, 0)
                        if len(sent.get(ch, [])) <= n:
                            break
                        clock[r] = max(clock[r], sent[ch][n])
                        recvd[ch] = n + 1
                elif isinstance(c, ds.CommitP2P):
                    if not published[r]:  # every op of the batch is launched at once
                        for is_send, ch in queued[r]:
                            if is_send:
                                sent.setdefault(ch, []).append(clock[r] + costs.latency)
                        published[r] = True
                    need = [ch for is_send, ch in queued[r] if not is_send]
                    counts: dict = {}
                    ready, t = True, clock[r]
                    for ch in need:
                        n = recvd.get(ch, 0) + counts.get(ch, 0)
                        counts[ch] = counts.get(ch, 0) + 1
                        if len(sent.get(ch, [])) <= n:
                            ready = False
                            break
                        t = max(t, sent[ch][n])
                    if not ready:
                        break
                    for ch, k in counts.items():
                        recvd[ch] = recvd.get(ch, 0) + k
                    clock[r], queued[r], published[r] = t, [], False
                elif isinstance(c, ds.ForwardPass):
                    dt = costs.forward[r][phase_of(c)]
                    if memory is not None:
                        alive[r][c.buffer_id] = memory.kept[r][phase_of(c)]
                        live[r] += alive[r][c.buffer_id]
                        peak[r] = max(peak[r], live[r])
                    clock[r] += dt
                    busy[r] += dt
                elif isinstance(c, ds.BackwardPass):
                    dt = costs.backward[r][phase_of(c)]
                    if memory is not None:
                        extra = memory.transient[r][phase_of(c)] if memory.transient else 0.0
                        peak[r] = max(peak[r], live[r] + extra)
                        live[r] -= alive[r].pop(c.buffer_id, 0.0)
                    clock[r] += dt
                    busy[r] += dt
                elif isinstance(c, ds.OptimizerStep):
                    clock[r] += costs.step[r]
                    busy[r] += costs.step[r]
                pos[r] += 1
                moved = True
        if not moved:
            stuck = {r: cmds[r][pos[r]] for r in range(G) if pos[r] < len(cmds[r])}
            raise RuntimeError(f"deadlock in the simulated DeepSpeed schedule: {stuck}")
    return RivalResult(step_time=max(clock), busy=busy, peak=peak)
