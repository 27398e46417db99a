"""Discrete-event simulation of a per-stage schedule: timeline, utilization, deadlocks.

Pure Python, no torch. Each stage runs its action list in order, the same list every step,
steps back to back with no barrier between them (as the engine does). An action starts when
its stage is free and what it waits for has arrived:

- ``kFj`` (k > 1) waits for ``(k-1)SEND_Fj`` of the same step; ``KLj`` likewise for module K-1
  (for G = 1 the hand-off is local: the same stage's ``1Fj``).
- ``kBj`` waits for the error gradient that module k + 1 sent for micro-batch j *one step
  earlier* (``(k+1)SEND_Bj`` or ``KSEND_Bj``; for G = 1 the local ``2Lj``). In step 0 none
  exists and the replay is free (the engine skips it during warm-up). In a synchronous plan
  (``synchronous=True``, delay 0) it waits for the same step's.
- sends and receives cost nothing on the stage (they are asynchronous), and travel as on NCCL
  (:mod:`ouroboros_ds.core.nccl`): matched by posting order, each pair of stages on one stream in
  issue order, a send complete only together with its receive, ``latency`` after both ends
  reached it. So a receive posted early can hold up a later send to the same peer.

If no stage can move and some have work left, the schedule deadlocks (or a receive would get
another message than its own): :class:`ScheduleError` names the stage, the step, the action,
what it waits for, and prints the grid.

Also here: :func:`balanced_costs` (1.0 of work per micro-batch on every stage),
:func:`steady_steps` (the steady-state window, steps 2K..2K+3: warm-up replays are charged in full,
so the timeline is periodic after about K steps), the 1F1B model :func:`onef1b_step_time` and
:func:`bubble_bound`, :func:`draw` (a Gantt chart, PNG), and a CLI:
``python -m ouroboros_ds.core.simulate --stages G --micro-batches M [--forward 1 --replay 3 --loss 4
--balanced --png out.png]``; several values of G and M print a utilization table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import nccl as N
from .schedule import B, F, L, LOAD, RECV_B, RECV_F, STEP, Action, format_schedule, num_modules, stage_of


class ScheduleError(Exception):
    """A schedule that cannot run: says where and why, with the grid and the bad row marked."""

    def __init__(self, plan, stage: int, index: int, step: int, reason: str):
        self.stage, self.index, self.step, self.reason = stage, index, step, reason
        row = plan[stage] if 0 <= stage < len(plan) else []
        action = row[index] if 0 <= index < len(row) else "<end>"
        super().__init__(f"stage {stage}, step {step}, action {index} ({action}): {reason}\n"
                         + format_schedule(plan, mark=(stage, index)))


@dataclass
class Costs:
    """Seconds per action kind. ``forward``/``replay``: one value for every module, or a dict per
    module or per ``(module, micro-batch)`` (a module missing from the dict costs 0); ``loss`` is module K's forward + loss +
    backward; ``step`` the optimizer; ``latency`` a message's flight time."""

    forward: float | dict = 1.0
    replay: float | dict = 3.0
    loss: float = 4.0
    step: float = 0.0
    latency: float = 0.0

    def of(self, a: Action) -> float:
        def pick(v):  # a dict may also price one micro-batch of a module: {(k, mb): seconds}
            return v.get((a.k, a.mb), v.get(a.k, 0.0)) if isinstance(v, dict) else v

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
        if not sel:
            raise ValueError(f"no events in steps {steps}: simulate at least {steps.stop} steps")
        return min(s for s, _ in sel), max(e for _, e in sel)

    def utilization(self, steps: range | None = None) -> list[float]:
        """Per-stage busy fraction over the window spanned by ``steps`` (default: all)."""
        steps = steps if steps is not None else range(10**9)
        t0, t1 = self.window(steps)
        return [self.busy(s, steps) / (t1 - t0) if t1 > t0 else 1.0 for s in range(self.stages)]

    def step_time(self, steps: range) -> float:
        t0, t1 = self.window(steps)
        return (t1 - t0) / len(steps)

    def period(self, stage: int, steps: range) -> float:
        """Stage ``stage``'s steady-state step time: from the end of its step ``steps.start - 1`` to
        the end of its step ``steps.stop - 1``, per step. Unlike :meth:`step_time` this leaves out
        the skew between stages (stage s runs behind stage 0), which a window over all stages adds."""
        ends = {t: e for t, _, _, e in self.events[stage] if t in (steps.start - 1, steps.stop - 1)}
        prev = ends.get(steps.start - 1, min(s for t, _, s, _ in self.events[stage] if t == steps.start))
        return (ends[steps.stop - 1] - prev) / len(steps)

    def steady_utilization(self, steps: range) -> list[float]:
        """Per-stage busy fraction of the stage's own steady-state period (:meth:`period`)."""
        return [self.busy(s, steps) / (len(steps) * self.period(s, steps)) for s in range(self.stages)]


def simulate(plan: list[list[Action]], costs: Costs | None = None, steps: int = 4,
             synchronous: bool = False) -> Timeline:
    """Run ``plan`` for ``steps`` consecutive steps; raise :class:`ScheduleError` on deadlock or on a
    receive that would get another message than its own. ``synchronous``: every step is a
    synchronous one (each replay waits for its own step's error gradient), as
    :func:`~ouroboros_ds.core.schedule.ouroboros_schedule` ``(..., synchronous=True)`` runs.

    The messages travel as on NCCL (:mod:`ouroboros_ds.core.nccl`): matched by posting order, each pair
    of stages on one stream in issue order, a send complete only with its receive, ``latency``
    after both ends reached it. Sends and receives cost the stage nothing; a compute action waits
    for the receives it uses."""
    costs = costs or Costs()
    G = len(plan)
    M = 1 + max((a.mb for acts in plan for a in acts if a.kind != STEP), default=0)
    progs = N.ring_programs(G, M, steps, sync_steps=steps if synchronous else 0, plan_of=lambda t, sync: plan,
                            cost_of=lambda a, t, sync: costs.of(a), shape_messages=False)
    try:
        run = N.run(progs, latency=costs.latency)
    except N.TransportError as e:
        raise ScheduleError(plan, e.rank, e.at[1], e.at[0], f"{e.what}: {e.reason}") from None
    tl = Timeline(G, [[] for _ in range(G)])
    for s, events in enumerate(run.events):
        for op, start, end in events:
            t, i = op.at
            tl.events[s].append((t, plan[s][i], start, end))
    return tl


def synchronous_cost(stages: int, micro_batches: int, costs: Costs | None = None) -> tuple[float, float]:
    """(ring step time, synchronous step time) in the steady state (:func:`steady_steps`, the
    slowest stage's period): what a step of the ``sync_steps`` warm-up costs against a ring step.
    A synchronous step's replays wait for the error gradient of their own step, which comes back
    only after the forwards have gone around the ring and through the losses: the stages take
    turns rather than overlap."""
    from .schedule import ouroboros_schedule

    costs = costs or Costs()
    window = steady_steps(stages)
    out = []
    for sync in (False, True):
        tl = simulate(ouroboros_schedule(stages, micro_batches, synchronous=sync), costs, steps=window.stop,
                      synchronous=sync)
        out.append(max(tl.period(s, window) for s in range(stages)))
    return out[0], out[1]


def stage_costs(stages: int, forward: dict, replay: dict, loss: float, step: float = 0.0) -> list[float]:
    """Per-stage work of one micro-batch: a quick check of the partition's balance."""
    K = num_modules(stages)
    out = [0.0] * stages
    for k in range(1, K):
        out[stage_of(k, stages)] += forward.get(k, 0.0) + replay.get(k, 0.0)
    out[0] += loss
    return out


# ---------------------------------------------------------------- models, picture, CLI
def balanced_costs(stages: int) -> Costs:
    """Costs with the same work, 1.0 per micro-batch, on every stage. A middle module forwards in
    0.25 and replays (recompute + backward) in 0.75. Stage 0 holds 8/7 of a middle stage's blocks,
    half in module 1 (forward 1/7, replay 3/7) and half in module K, whose loss action (forward +
    backward, no recompute) takes 3/7."""
    K = num_modules(stages)
    forward = {k: 0.25 for k in range(2, K)}
    replay = {k: 0.75 for k in range(2, K)}
    forward[1], replay[1] = 1 / 7, 3 / 7
    return Costs(forward=forward, replay=replay, loss=3 / 7)


def steady_steps(stages: int, n: int = 4) -> range:
    """The steps whose timeline we call steady state: ``2K .. 2K + n - 1``. The simulator charges
    warm-up replays in full, so the timeline is periodic once the first batch has been around the
    ring (K steps); starting at 2K leaves a margin. Simulate at least ``2K + n`` steps."""
    K = num_modules(stages)
    return range(2 * K, 2 * K + n)


def onef1b_step_time(stages: int, micro_batches: int, f: float, b: float) -> float:
    """DeepSpeed's synchronous 1F1B (``TrainSchedule``) with a flush at the end of every step:
    ``(M + G - 1)(f + b)`` for per-stage, per-micro-batch forward ``f`` and backward ``b`` (with
    the same recompute setting as the Ouroboros replay it is compared with)."""
    return (micro_batches + stages - 1) * (f + b)


def bubble_bound(stages: int, micro_batches: int) -> float:
    """The most a bubble-free schedule gains over 1F1B at equal per-micro-batch cost: (M+G-1)/M."""
    return (micro_batches + stages - 1) / micro_batches


def cycle_bound(stages: int, micro_batches: int, costs: Costs) -> tuple[float, float]:
    """A lower bound on the Ouroboros step time that no order of work inside the stages can beat,
    and the utilization of the most loaded stage it allows: ``(period, utilization)``.

    Two limits. Work: a stage cannot finish a step faster than its own work, M (forward + replay
    [+ loss]) + step. The tied weight: ``F1(t+1, 0)`` needs the embedding after ``STEP(t)``, which
    needs all M losses of batch t, the first of which needs micro-batch 0's forward through every
    module; so a step lasts at least ``f_1 + ... + f_{K-1} + M * loss + step``. At M = 1 (the
    paper's algorithm) that chain is the whole model's forward plus module K's backward while each
    stage only has about 1/G of the work: utilization <= (f + b) / (G f + l) whatever the schedule.
    """
    G, M, K = stages, micro_batches, num_modules(stages)
    work = [M * (f + b) + costs.step for f, b in _stage_fb(G, costs)]
    chain = sum(costs.of(Action(F, k)) for k in range(1, K)) + M * costs.loss + costs.step
    period = max(max(work), chain)
    return period, max(work) / period


def _stage_fb(stages: int, costs: Costs) -> list[tuple[float, float]]:
    """Per stage, per micro-batch: (forward work, backward work); the loss counts as backward."""
    K = num_modules(stages)
    out = [[0.0, 0.0] for _ in range(stages)]
    for k in range(1, K):
        out[stage_of(k, stages)][0] += costs.of(Action(F, k))
        out[stage_of(k, stages)][1] += costs.of(Action(B, k))
    out[stage_of(K, stages)][1] += costs.loss
    return [tuple(x) for x in out]


_COLORS = {F: "#4c9be8", B: "#f5a742", L: "#d9534f", STEP: "#222222"}


def draw(timeline: Timeline, path: str, title: str | None = None, steps: range | None = None) -> None:
    """Gantt chart of ``timeline`` into ``path`` (PNG): one row per stage, one box per action
    coloured by kind (F, B, L, STEP) and labelled with its text where it fits, a vertical bar at
    each stage's STEP (the step boundary), the step number in the middle of each step's span.
    ``steps``: draw only the time those steps span (with whatever overlaps it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    G = timeline.stages
    t0, t1 = timeline.window(steps) if steps is not None else (0.0, timeline.makespan)
    span = (t1 - t0) or 1.0
    shown = [[e for e in timeline.events[s] if e[3] >= t0 and e[2] <= t1] for s in range(G)]
    n = max((len(ev) for ev in shown), default=1)
    width, height = min(max(10.0, 0.32 * n), 22.0), 1.4 + 0.95 * G
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    char = span / (width * 0.85) * (7 * 0.6 / 72)  # data units per character at 7 pt
    for s, ev in enumerate(shown):
        y = G - 1 - s
        first, ends = {}, {}
        for step, a, start, end in ev:
            first.setdefault(step, start)
            if a.kind == STEP:
                ends[step] = end
                ax.plot([end, end], [y - 0.45, y + 0.45], color=_COLORS[STEP], lw=2.5, solid_capstyle="butt")
                if end > start:
                    ax.broken_barh([(start, end - start)], (y - 0.3, 0.6), color=_COLORS[STEP])
                continue
            ax.broken_barh([(start, end - start)], (y - 0.3, 0.6), facecolor=_COLORS[a.kind],
                           edgecolor="white", linewidth=0.8, alpha=1.0 if step % 2 == 0 else 0.65)
            lo, hi = max(start, t0), min(end, t1)  # the visible part
            if hi - lo >= (len(str(a)) + 0.5) * char:
                ax.text((lo + hi) / 2, y, str(a), ha="center", va="center", fontsize=7)
        for step, start in first.items():
            lo, hi = max(start, t0), min(ends.get(step, t1), t1)
            if hi - lo >= 8 * char:
                ax.text((lo + hi) / 2, y + 0.33, f"step {step}", ha="center", va="bottom", fontsize=6.5,
                        color="#444444")
    ax.set_xlim(t0, t1)
    ax.set_ylim(-0.55, G - 0.4)
    ax.set_yticks(range(G))
    K = num_modules(G)
    ax.set_yticklabels([f"stage {s}\n(module{'s 1, %d' % K if s == 0 else ' %d' % (s + 1)})"
                        for s in reversed(range(G))], fontsize=8)
    ax.set_xlabel("time")
    fig.legend(handles=[Patch(color=_COLORS[F], label="F forward"), Patch(color=_COLORS[B], label="B replay"),
                        Patch(color=_COLORS[L], label="L loss (module K)"),
                        Patch(color=_COLORS[STEP], label="STEP: end of the stage's step")],
               loc="lower center", ncol=4, fontsize=8, frameon=False, borderaxespad=0.2)
    ax.set_title(title or f"Ouroboros schedule, G={G}", fontsize=10)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    fig.savefig(path, dpi=130)


def scale_table(stage_values, costs_of) -> str:
    """Markdown: for each G and M = 1, 2, 4, ..., 4G, the simulated Ouroboros step time and slowest
    stage's utilization (per-stage steady-state period, :meth:`Timeline.steady_utilization`), the
    1F1B model's step time, the speed-up, the bubble bound (M+G-1)/M, and :func:`cycle_bound`'s
    utilization limit, over the steady-state window :func:`steady_steps`."""
    from .schedule import ouroboros_schedule

    rows = ["| G | M | Ouroboros step | util (slowest stage) | util bound (cycle) | 1F1B step | speed-up "
            "| bubble bound (M+G-1)/M |", "|---|---|---|---|---|---|---|---|"]
    for G in stage_values:
        Ms, m = [], 1
        while m <= 4 * G:
            Ms.append(m)
            m *= 2
        for M in Ms:
            costs = costs_of(G)
            window = steady_steps(G)
            tl = simulate(ouroboros_schedule(G, M), costs, steps=window.stop)
            st = max(tl.period(s, window) for s in range(G))
            util = min(tl.steady_utilization(window))
            f, b = max(_stage_fb(G, costs), key=sum)
            ref = onef1b_step_time(G, M, f, b) + costs.step
            rows.append(f"| {G} | {M} | {st:.3f} | {util:.3f} | {cycle_bound(G, M, costs)[1]:.3f} | {ref:.3f} "
                        f"| {ref / st:.3f} | {bubble_bound(G, M):.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .schedule import ouroboros_schedule

    p = argparse.ArgumentParser(
        prog="python -m ouroboros_ds.core.simulate",
        description="Simulate the Ouroboros schedule: per-stage utilization and steady-state step time "
                    "(steps 2K..2K+3, after warm-up), next to DeepSpeed 1F1B's (M+G-1)(f+b). "
                    "Several --stages/--micro-batches values print a table of the slowest stage's utilization.")
    p.add_argument("--stages", "-G", type=int, nargs="+", required=True)
    p.add_argument("--micro-batches", "-M", type=int, nargs="+", required=True)
    p.add_argument("--forward", type=float, default=1.0, help="forward cost of each module k < K")
    p.add_argument("--replay", type=float, default=3.0, help="replay (recompute + backward) cost of each module k < K")
    p.add_argument("--loss", type=float, default=4.0, help="module K: forward + loss + backward")
    p.add_argument("--step", type=float, default=0.0, help="optimizer step")
    p.add_argument("--latency", type=float, default=0.0, help="point-to-point message latency")
    p.add_argument("--balanced", action="store_true",
                   help="ignore the costs above: every stage does 1.0 per micro-batch (balanced_costs)")
    p.add_argument("--scale", action="store_true",
                   help="print the at-scale table: every --stages value x M in 1, 2, 4, ..., 4G (--micro-batches ignored)")
    p.add_argument("--synchronous", action="store_true",
                   help="simulate synchronous steps (every delay 0: the sync_steps warm-up) and print their step "
                        "time against the ring's")
    p.add_argument("--png", help="draw the timeline of the first --draw-steps steady-state steps")
    p.add_argument("--draw-steps", type=int, default=3)
    args = p.parse_args(argv)

    def run(G, M):
        costs = balanced_costs(G) if args.balanced else Costs(args.forward, args.replay, args.loss, args.step,
                                                              args.latency)
        window = steady_steps(G)
        tl = simulate(ouroboros_schedule(G, M, synchronous=args.synchronous), costs, steps=window.stop,
                      synchronous=args.synchronous)
        fb = _stage_fb(G, costs)
        f, b = max(fb, key=sum)
        return costs, tl, window, tl.utilization(window), tl.step_time(window), onef1b_step_time(G, M, f, b)

    if args.scale:
        print(scale_table(args.stages, lambda G: balanced_costs(G) if args.balanced else Costs(
            args.forward, args.replay, args.loss, args.step, args.latency)))
        return 0
    if len(args.stages) == 1 and len(args.micro_batches) == 1:
        G, M = args.stages[0], args.micro_batches[0]
        costs, tl, window, util, st, ref = run(G, M)
        work = [sum(x) for x in _stage_fb(G, costs)]
        print(f"G={G} M={M} K={G + 1}; per-micro-batch work by stage: " + ", ".join(f"{w:.4g}" for w in work))
        print(f"steady state: steps {window.start}..{window.stop - 1} (2K..2K+3, warm-up skipped)")
        for s, u in enumerate(util):
            print(f"  stage {s}: utilization {u:.3f}")
        periods = [tl.period(s, window) for s in range(G)]
        print("per-stage steady-state period (no stage skew; Timeline.steady_utilization): "
              + ", ".join(f"stage {s} {p:.4g} util {u:.3f}" for s, (p, u) in
                          enumerate(zip(periods, tl.steady_utilization(window))))
              + f"; cycle bound {cycle_bound(G, M, costs)[0]:.4g}")
        print(f"step time {st:.4g}; 1F1B model (M+G-1)(f+b) with the slowest stage's f, b: {ref:.4g} "
              f"(ratio {ref / st:.3f}; bubble bound (M+G-1)/M = {bubble_bound(G, M):.3f})")
        if args.synchronous:
            ring, sync = synchronous_cost(G, M, costs)
            print(f"synchronous step {sync:.4g} vs ring step {ring:.4g} (slowest stage's period): "
                  f"{sync / ring:.3f}x")
        if args.png:
            draw(tl, args.png, title=f"Ouroboros G={G} M={M}: steps {window.start}.."
                 f"{window.start + args.draw_steps - 1} (steady state)",
                 steps=range(window.start, window.start + args.draw_steps))
            print(f"wrote {args.png}")
        return 0
    print("| G \\ M | " + " | ".join(str(M) for M in args.micro_batches) + " |")
    print("|---|" + "---|" * len(args.micro_batches))
    for G in args.stages:
        cells = []
        for M in args.micro_batches:
            _, _, _, util, st, ref = run(G, M)
            cells.append(f"{min(util):.3f} ({ref / st:.2f}x)")
        print(f"| {G} | " + " | ".join(cells) + " |")
    print("cells: the slowest stage's steady-state utilization (Ouroboros speed-up over the 1F1B model; "
          "bound (M+G-1)/M)")
    return 0


__all__ = ["Costs", "Timeline", "ScheduleError", "simulate", "synchronous_cost", "stage_costs", "balanced_costs", "steady_steps",
           "onef1b_step_time", "bubble_bound", "cycle_bound", "scale_table", "draw", "LOAD", "RECV_B", "RECV_F"]


if __name__ == "__main__":
    raise SystemExit(main())
