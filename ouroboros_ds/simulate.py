"""Discrete-event simulation of a per-stage schedule: timeline, utilization, deadlocks.

Pure Python, no torch. Each stage runs its action list in order, the same list every step,
steps back to back with no barrier between them (as the engine does). An action starts when
its stage is free and what it waits for has arrived:

- ``kFj`` (k > 1) waits for ``(k-1)SEND_Fj`` of the same step; ``KLj`` likewise for module K-1
  (for G = 1 the hand-off is local: the same stage's ``1Fj``).
- ``kBj`` waits for the error gradient that module k + 1 sent for micro-batch j *one step
  earlier* (``(k+1)SEND_Bj`` or ``KSEND_Bj``; for G = 1 the local ``2Lj``). In step 0 none
  exists and the replay is free (the engine skips it during warm-up).
- sends and receives cost nothing on the stage (they are asynchronous); a message arrives
  ``latency`` after its send.

If no stage can move and some have work left, the schedule deadlocks: :class:`ScheduleError`
names the stage, the step, the action, what it waits for, and prints the grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .schedule import (B, F, L, LOAD, RECV_B, RECV_F, SEND_B, SEND_F, STEP, Action, format_schedule,
                       num_modules, stage_of)


class ScheduleError(Exception):
    """A schedule that cannot run: says where and why, with the grid and the bad row marked."""

    def __init__(self, plan, stage: int, index: int, step: int, reason: str):
        self.stage, self.index, self.step, self.reason = stage, index, step, reason
        action = plan[stage][index] if index < len(plan[stage]) else "<end>"
        super().__init__(f"stage {stage}, step {step}, action {index} ({action}): {reason}\n"
                         + format_schedule(plan, mark=(stage, index)))


@dataclass
class Costs:
    """Seconds per action kind. ``forward[k]``/``replay[k]`` per module (a missing module gets
    the plain value); ``loss`` is module K's forward + loss + backward; ``step`` the optimizer."""

    forward: float | dict = 1.0
    replay: float | dict = 3.0
    loss: float = 4.0
    step: float = 0.0
    latency: float = 0.0

    def of(self, a: Action) -> float:
        def pick(v):
            return v.get(a.module, 0.0) if isinstance(v, dict) else v

        if a.kind == F:
            return pick(self.forward)
        if a.kind == B:
            return pick(self.replay)
        if a.kind == L:
            return self.loss
        if a.kind == STEP:
            return self.step
        return 0.0


@dataclass
class Timeline:
    """What happened: ``events[s]`` is a list of (step, action, start, end) for stage s."""

    stages: int
    events: list[list[tuple[int, Action, float, float]]] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((e[3] for ev in self.events for e in ev), default=0.0)

    def busy(self, stage: int, steps: range | None = None) -> float:
        return sum(e - s for t, a, s, e in self.events[stage] if steps is None or t in steps)

    def window(self, steps: range) -> tuple[float, float]:
        """Start and end of the given steps over all stages."""
        sel = [(s, e) for ev in self.events for t, _, s, e in ev if t in steps]
        return min(s for s, _ in sel), max(e for _, e in sel)

    def utilization(self, steps: range | None = None) -> list[float]:
        """Per-stage busy fraction over the window spanned by ``steps`` (default: all)."""
        steps = steps if steps is not None else range(10**9)
        t0, t1 = self.window(steps)
        return [self.busy(s, steps) / (t1 - t0) if t1 > t0 else 1.0 for s in range(self.stages)]

    def step_time(self, steps: range) -> float:
        t0, t1 = self.window(steps)
        return (t1 - t0) / len(steps)


def _dependency(a: Action, stages: int, step: int):
    """(kind, module, mb, step) of the event ``a`` waits for, or None."""
    K = num_modules(stages)
    local = stages == 1
    if a.kind == F and a.module > 1:
        return (SEND_F, a.module - 1, a.mb, step)
    if a.kind == L:
        return (F, 1, a.mb, step) if local else (SEND_F, K - 1, a.mb, step)
    if a.kind == B and step > 0:
        if a.module + 1 == K:
            return (L, K, a.mb, step - 1) if local else (SEND_B, K, a.mb, step - 1)
        return (SEND_B, a.module + 1, a.mb, step - 1)
    return None


def simulate(plan: list[list[Action]], costs: Costs | None = None, steps: int = 4) -> Timeline:
    """Run ``plan`` for ``steps`` consecutive steps; raise :class:`ScheduleError` on deadlock."""
    costs = costs or Costs()
    G = len(plan)
    done: dict[tuple, float] = {}  # (kind, module, mb, step) -> time its result is available
    pos = [0] * G  # index into the flattened (step, action) sequence of each stage
    clock = [0.0] * G
    tl = Timeline(G, [[] for _ in range(G)])
    total = [len(acts) * steps for acts in plan]
    while True:
        moved = False
        for s in range(G):
            while pos[s] < total[s]:
                step, i = divmod(pos[s], len(plan[s]))
                a = plan[s][i]
                dep = _dependency(a, G, step)
                if dep is not None and dep not in done:
                    break
                start = max(clock[s], done[dep] if dep is not None else 0.0)
                end = start + costs.of(a)
                avail = end + (costs.latency if a.kind in (SEND_F, SEND_B) else 0.0)
                done[(a.kind, a.module, a.mb, step)] = avail
                if a.kind in (F, B, L, STEP):
                    tl.events[s].append((step, a, start, end))
                clock[s] = end
                pos[s] += 1
                moved = True
        if all(pos[s] == total[s] for s in range(G)):
            return tl
        if not moved:
            s = next(s for s in range(G) if pos[s] < total[s])
            step, i = divmod(pos[s], len(plan[s]))
            dep = _dependency(plan[s][i], G, step)
            what = f"{dep[1]}{dep[0]}{dep[2]}" + (f" of step {dep[3]}" if dep[3] != step else "")
            raise ScheduleError(plan, s, i, step, f"deadlock: waits for {what}, which never happens "
                                f"(every stage is blocked)")


def stage_costs(stages: int, forward: dict, replay: dict, loss: float, step: float = 0.0) -> list[float]:
    """Per-stage work of one micro-batch: a quick check of the partition's balance."""
    K = num_modules(stages)
    out = [0.0] * stages
    for k in range(1, K):
        out[stage_of(k, stages)] += forward.get(k, 0.0) + replay.get(k, 0.0)
    out[0] += loss
    return out


__all__ = ["Costs", "Timeline", "ScheduleError", "simulate", "stage_costs", "LOAD", "RECV_B", "RECV_F"]
