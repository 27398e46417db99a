"""Static and dynamic checks of a per-stage Ouroboros schedule: pure Python, no torch.

:func:`validate` raises :class:`~ouroboros_ds.core.simulate.ScheduleError` (stage, step, action
index, reason, and the grid with the bad action bracketed) at the first of these that fails:

1. *placement*: every action names a module of its own stage (``schedule.stage_of``), a kind that
   module can do (LOAD: module 1; F, B: k < K; L: module K), a micro-batch in 0..M-1; no action
   twice; no SEND/RECV across a hand-off whose two ends share a stage (G = 1);
2. *STEP*: exactly one per stage, last;
3. *coverage*: every micro-batch is loaded once, forwarded once (F) and replayed once (B) by each
   module k < K, and goes through the loss (KL) once;
4. *order on a stage*: ``1LOADj`` before ``1Fj``; ``kRECV_Fj`` posted before its consumer ``kFj``
   or ``KLj`` (or, for G = 1, ``1Fj`` before ``2Lj``); ``kSEND_Fj`` after ``kFj``; ``kSEND_Bj``
   after ``kBj`` / ``KLj``; a replay ``kBj`` whose upstream error gradient comes from another
   stage has its ``kRECV_Bj`` in the list (it receives next step's gradient; in a synchronous
   step this step's, so it must be posted before ``kBj``, and for G = 1 ``2Lj`` must come
   before ``1Bj``);
5. *pairing*: ``kSEND_Fj`` <-> ``(k+1)RECV_Fj`` on ``stage_of(k+1)``, ``kSEND_Bj`` <->
   ``(k-1)RECV_Bj`` on ``stage_of(k-1)``, in the same step list, both ways;
6. *channel order*: between two stages, the receiver posts its receives in the order the sender
   sends (point-to-point messages between two ranks match in posting order: NCCL has no tags),
   so no message lands in the wrong buffer;
7. *delays*: the module of every replay has ``schedule.delay(k) == K - k`` as the ring placement
   gives it (:func:`delay_table`), or 0 in a synchronous step, and module K has delay 0;
8. *no deadlock under NCCL's rules*: ``simulate(plan, Costs(), steps=K + 2)`` runs to the end,
   its messages travelling as on NCCL (:mod:`ouroboros_ds.core.nccl`: each pair of stages' ops in
   issue order on one stream, a send complete only with its receive).

:func:`validate_transport` checks the engine's whole op streams (:func:`ouroboros_ds.core.nccl.
ring_programs`: synchronous steps, the switch to the ring, the ring's warm-up and steady state,
evaluations in between, the shape messages) under the same rules.

``synchronous=True`` checks the list of a synchronous step (``ouroboros_schedule(G, M,
synchronous=True)``): each replay backprops its own step's error gradient.

The list is the same in every step, so a static error is reported at step 0 (where it first
happens). CLI: ``python -m ouroboros_ds.core.validate --stages G --micro-batches M`` prints the grid
and ``ok``, or the error and exit status 1; ``--file F`` checks a text schedule instead;
``--synchronous`` the synchronous step's list; ``--transport G_MAX M_MAX`` runs
:func:`validate_transport` for every G <= G_MAX and M <= M_MAX and prints the coverage.
"""
from __future__ import annotations

import argparse
import sys

from .schedule import (B, F, L, LOAD, RECV_B, RECV_F, SEND_B, SEND_F, STEP, Action, delay,
                       format_schedule, modules_of, num_modules, ouroboros_schedule, parse_schedule,
                       stage_of, stash_depth)
from .simulate import Costs, ScheduleError, simulate

__all__ = ["validate", "validate_transport", "delay_table", "ScheduleError"]


def delay_table(stages: int, synchronous: bool = False) -> list[tuple[int, int, int, int]]:
    """(module, stage, delay, stash depth) for modules 1..K, from the ring itself: the error
    gradient of a batch starts at module K (the loss, fresh) and walks back one module per step,
    so module k applies it after as many steps as there are modules after k on the ring. In a
    synchronous step it walks back the whole ring within the step: every delay is 0."""
    K = num_modules(stages)
    ring = [1 + s for s in range(stages)] + [K]  # stage 0 -> 1 -> ... -> G-1 -> stage 0
    rows = []
    for pos, k in enumerate(ring):
        after = 0 if synchronous else len(ring) - 1 - pos
        rows.append((k, stage_of(k, stages), after, after + (1 if k < K else 0)))
    return rows


def _key(a: Action) -> tuple[str, int, int]:
    return (a.kind, a.k, a.mb)


def _text(kind: str, k: int, mb: int) -> str:
    return str(Action(kind, k, mb))


def validate(plan: list[list[Action]], stages: int | None = None, micro_batches: int | None = None,
             synchronous: bool = False) -> None:
    """Raise :class:`ScheduleError` if ``plan`` is not a correct Ouroboros step (a synchronous one
    with ``synchronous=True``); see the module docstring for the checks. ``stages``/``micro_batches``
    default to what the plan shows."""
    def fail(s: int, i: int, reason: str, step: int = 0):
        raise ScheduleError(plan, s, i, step, reason)

    if not isinstance(plan, (list, tuple)) or not plan:
        raise ScheduleError([[]], 0, 0, 0, "empty schedule: expected one action list per stage")
    G = len(plan) if stages is None else stages
    if len(plan) != G:
        fail(min(len(plan), G), 0, f"the schedule has {len(plan)} stage rows, expected {G}")
    for s, acts in enumerate(plan):
        if not acts:
            fail(s, 0, "empty action list: every stage needs at least its STEP")
        for i, a in enumerate(acts):
            if not isinstance(a, Action):
                fail(s, i, f"not an Action: {a!r}")
    K = num_modules(G)
    mbs = [a.mb for acts in plan for a in acts if a.kind != STEP]
    M = micro_batches if micro_batches is not None else (max(mbs) + 1 if mbs else 1)

    # 1. placement, kinds, ranges, duplicates, local hand-offs
    where: dict[tuple[str, int, int], tuple[int, int]] = {}
    for s, acts in enumerate(plan):
        for i, a in enumerate(acts):
            if a.kind == STEP:
                continue
            k = a.k
            if not 1 <= k <= K:
                fail(s, i, f"module {k} out of range 1..{K} (G={G}, K=G+1)")
            if not 0 <= a.mb < M:
                fail(s, i, f"micro-batch {a.mb} out of range 0..{M - 1}")
            if stage_of(k, G) != s:
                fail(s, i, f"{a} belongs on stage {stage_of(k, G)}, which holds module {k}; "
                           f"stage {s} holds modules {modules_of(s, G)}")
            bad_kind = {LOAD: k != 1, F: k == K, B: k == K, L: k != K,
                        SEND_F: k == K, RECV_B: k == K, RECV_F: k == 1, SEND_B: k == 1}[a.kind]
            if bad_kind:
                fail(s, i, {LOAD: "only module 1 loads micro-batches",
                            F: f"module K={K} does not forward: its loss action is {K}L{a.mb}",
                            B: f"module K={K} is fresh (delay 0): it has no replay, its loss action "
                               f"backprops at once",
                            L: f"only module K={K} computes the loss",
                            SEND_F: f"module K={K} has no output to send downstream",
                            RECV_B: f"module K={K} receives no error gradient (it makes them)",
                            RECV_F: "module 1 gets its input from LOAD, not from a receive",
                            SEND_B: "module 1 has no upstream to send dL/dx to"}[a.kind])
            peer = {SEND_F: k + 1, RECV_B: k + 1, RECV_F: k - 1, SEND_B: k - 1}.get(a.kind)
            if peer is not None and stage_of(peer, G) == s:
                fail(s, i, f"modules {min(k, peer)} and {max(k, peer)} are both on stage {s}: "
                           f"the hand-off is local, there is no SEND/RECV")
            if _key(a) in where:
                s0, i0 = where[_key(a)]
                fail(s, i, f"duplicate: {a} already appears at stage {s0}, action {i0}")
            where[_key(a)] = (s, i)

    # 2. exactly one STEP, last
    for s, acts in enumerate(plan):
        steps = [i for i, a in enumerate(acts) if a.kind == STEP]
        if not steps:
            fail(s, len(acts) - 1, "no STEP: the stage never takes its optimizer step "
                                   "(the last action must be STEP)")
        if len(steps) > 1:
            fail(s, steps[1], f"a second STEP (the first is action {steps[0]}): exactly one per step")
        if steps[0] != len(acts) - 1:
            fail(s, steps[0], f"STEP must be the last action, but {len(acts) - 1 - steps[0]} "
                              f"action(s) follow it")

    # 3. coverage: every micro-batch forwarded, replayed, lost exactly once (duplicates: above)
    def need(kind: str, k: int, j: int, what: str):
        if (kind, k, j) not in where:
            s = stage_of(k, G)
            fail(s, len(plan[s]) - 1, f"{what}: no {_text(kind, k, j)} on stage {s} "
                                      f"(micro-batches 0..{M - 1})")

    for j in range(M):
        need(LOAD, 1, j, f"micro-batch {j} is never loaded")
        for k in range(1, K):
            need(F, k, j, f"module {k} never forwards micro-batch {j}")
        for k in range(1, K):
            need(B, k, j, f"module {k} never replays micro-batch {j}")
        need(L, K, j, f"micro-batch {j} never goes through the loss (module K={K})")

    # 4. order on each stage
    def before(s: int, i: int, key: tuple[str, int, int], why: str):
        """``key`` must come before action i on stage s."""
        got = where.get(key)
        if got is None or got[0] != s:
            fail(s, i, f"{why}, but stage {s} has no {_text(*key)}")
        if got[1] > i:
            fail(s, i, f"{why}, but {_text(*key)} comes after it (action {got[1]})")

    for s, acts in enumerate(plan):
        for i, a in enumerate(acts):
            k, j = a.k, a.mb
            if a.kind == F and k == 1:
                before(s, i, (LOAD, 1, j), f"{a} forwards micro-batch {j}'s input, loaded by 1LOAD{j}")
            elif a.kind in (F, L):
                if stage_of(k - 1, G) == s:  # G = 1: module 1 hands its output to module 2 = K
                    before(s, i, (F, k - 1, j), f"{a} consumes {_text(F, k - 1, j)}'s output (local)")
                else:
                    before(s, i, (RECV_F, k, j), f"{a} consumes the input that {_text(RECV_F, k, j)} "
                                                 f"receives, which must be posted first")
            elif a.kind == SEND_F:
                before(s, i, (F, k, j), f"{a} sends the output of {_text(F, k, j)}")
            elif a.kind == SEND_B:
                src = (L, k, j) if k == K else (B, k, j)
                before(s, i, src, f"{a} sends dL/dx, which {_text(*src)} computes")
            elif a.kind == B and stage_of(k + 1, G) != s and (RECV_B, k, j) not in where:
                fail(s, i, f"{a} replays with the error gradient of module {k + 1}, but stage {s} "
                           f"never posts {_text(RECV_B, k, j)} to receive it"
                           + ("" if synchronous else " (for the next step)"))
            elif a.kind == B and synchronous:  # this step's error gradient: received or computed first
                src = (RECV_B, k, j) if stage_of(k + 1, G) != s else (L, k + 1, j)
                before(s, i, src, f"{a} backprops this step's error gradient of module {k + 1} "
                                  f"(synchronous step), which {_text(*src)} "
                                  + ("receives" if src[0] == RECV_B else "computes"))

    # 5. pairing, both ways
    mate = {SEND_F: (RECV_F, +1), RECV_F: (SEND_F, -1), SEND_B: (RECV_B, -1), RECV_B: (SEND_B, +1)}
    for s, acts in enumerate(plan):
        for i, a in enumerate(acts):
            if a.kind not in mate:
                continue
            kind, dk = mate[a.kind]
            other = (kind, a.k + dk, a.mb)
            peer = stage_of(a.k + dk, G)
            if other not in where:
                fail(s, i, f"{a} has no matching {_text(*other)} on stage {peer} in the same step")

    # 6. channel order: per (sender, receiver), receives posted in send order
    def message(a: Action):
        """(sender stage, receiver stage, the SEND's key) of a SEND or RECV."""
        if a.kind == SEND_F:
            return stage_of(a.k, G), stage_of(a.k + 1, G), _key(a)
        if a.kind == SEND_B:
            return stage_of(a.k, G), stage_of(a.k - 1, G), _key(a)
        if a.kind == RECV_F:
            return stage_of(a.k - 1, G), stage_of(a.k, G), (SEND_F, a.k - 1, a.mb)
        return stage_of(a.k + 1, G), stage_of(a.k, G), (SEND_B, a.k + 1, a.mb)

    for src in range(G):
        for dst in range(G):
            if src == dst:
                continue
            sent = [message(a)[2] for a in plan[src] if a.kind in (SEND_F, SEND_B)
                    and message(a)[1] == dst]
            recvs = [(i, a) for i, a in enumerate(plan[dst]) if a.kind in (RECV_F, RECV_B)
                     and message(a)[0] == src]
            for n, (key, (i, a)) in enumerate(zip(sent, recvs)):
                if message(a)[2] != key:
                    fail(dst, i, f"receives out of order: message {n} from stage {src} to stage "
                                 f"{dst} is {_text(*key)}, but stage {dst}'s receive {n} from stage "
                                 f"{src} is {a} (messages between two ranks match in posting order)")

    # 7. delays, against the placement table
    sync = synchronous
    table = {k: (st, d) for k, st, d, _ in delay_table(G, sync)}
    if delay(K, G, sync) != 0 or table[K][1] != 0:
        s = stage_of(K, G)
        fail(s, where[(L, K, 0)][1], f"module K={K} must have delay 0, schedule.delay gives {delay(K, G, sync)}")
    for s, acts in enumerate(plan):
        for i, a in enumerate(acts):
            want = 0 if sync else K - a.k
            if a.kind == B and (delay(a.k, G, sync) != want or table[a.k][1] != want or table[a.k][0] != s):
                fail(s, i, f"{a}: module {a.k} on stage {s} must replay the batch of step "
                           f"t - {want} ({'synchronous: 0' if sync else 'K - k'}), schedule.delay gives "
                           f"{delay(a.k, G, sync)}, the ring placement {table[a.k][1]}")
            if a.kind == B and stash_depth(a.k, G, sync) != want + 1:
                fail(s, i, f"{a}: module {a.k} must stash {want + 1} inputs, "
                           f"schedule.stash_depth gives {stash_depth(a.k, G, sync)}")

    # 8. no deadlock (the simulator names where it blocks)
    try:
        simulate(plan, Costs(), steps=K + 2, synchronous=sync)
    except ScheduleError as e:
        raise ScheduleError(plan, e.stage, e.index, e.step, e.reason) from None


def validate_transport(stages: int, micro_batches: int, sync_steps: int = 2, ring_steps: int | None = None,
                       eval_micro_batches: tuple = (3, 1)) -> int:
    """Run the engine's op streams under NCCL's rules (:mod:`ouroboros_ds.core.nccl`): ``sync_steps``
    synchronous steps, then ``ring_steps`` ring steps (default K + 2: the ring's warm-up and its
    steady state), with an evaluation of ``eval_micro_batches[0]`` micro-batches after the first
    step and one of ``eval_micro_batches[1]`` after the last. Raise :class:`ScheduleError` at the
    first receive that would get another message than its own, or at a deadlock, with the
    step's grid and the bad action marked. Returns the number of ops checked."""
    from . import nccl as N

    G, M = stages, micro_batches
    steps = sync_steps + (num_modules(G) + 2 if ring_steps is None else ring_steps)
    evals = {0: eval_micro_batches[0], steps - 1: eval_micro_batches[1]}
    progs = N.ring_programs(G, M, steps, sync_steps=sync_steps, evals=evals)
    try:
        N.run(progs)
    except N.TransportError as e:
        t, i = e.at
        where = t if t >= 0 else sorted(evals)[-1 - t]  # an evaluation: the step it follows
        reason = f"{e.what} (rank {e.rank}): {e.reason}" + ("" if t >= 0 else f" (in evaluation {-1 - t})")
        raise ScheduleError(ouroboros_schedule(G, M, synchronous=where < sync_steps), e.rank, i if t >= 0 else 0,
                            where, reason) from None
    return sum(map(len, progs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ouroboros_ds.core.validate", description=__doc__.split("\n")[0])
    p.add_argument("--stages", "-G", type=int, help="pipeline stages G")
    p.add_argument("--micro-batches", "-M", type=int, help="micro-batches per step M")
    p.add_argument("--file", help="validate a text schedule (format_schedule's form) instead")
    p.add_argument("--synchronous", action="store_true",
                   help="a synchronous step's list (every delay 0: the sync_steps warm-up)")
    p.add_argument("--transport", type=int, nargs=2, metavar=("G_MAX", "M_MAX"),
                   help="check the engine's op streams under NCCL's rules for every G <= G_MAX, M <= M_MAX "
                        "(synchronous steps, the switch, the ring, evaluations)")
    args = p.parse_args(argv)
    if args.transport:
        n = ops = 0
        for G in range(1, args.transport[0] + 1):
            for M in range(1, args.transport[1] + 1):
                for sync in (0, 2):
                    try:
                        ops += validate_transport(G, M, sync_steps=sync)
                    except ScheduleError as e:
                        print(f"G={G} M={M} sync_steps={sync}: error: {e}")
                        return 1
                    n += 1
        print(f"ok: {n} runs (G 1-{args.transport[0]} x M 1-{args.transport[1]} x sync_steps 0 and 2: synchronous "
              f"steps, the switch, K + 2 ring steps, two evaluations), {ops} ops, no mismatch, no deadlock")
        return 0
    if args.file:
        with open(args.file) as fh:
            plan = parse_schedule(fh.read())
    else:
        if args.stages is None or args.micro_batches is None:
            p.error("give --stages and --micro-batches, or --file")
        plan = ouroboros_schedule(args.stages, args.micro_batches, synchronous=args.synchronous)
    print(format_schedule(plan))
    try:
        validate(plan, args.stages, args.micro_batches, synchronous=args.synchronous)
    except ScheduleError as e:
        print(f"error: {e}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
