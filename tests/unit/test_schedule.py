"""The schedule as data, its validator and its simulator: pure Python, no torch, a few seconds.

Golden schedules live in tests/golden/g{G}_m{M}.txt (format_schedule's text; sync_g{G}_m{M}.txt the
synchronous step's list). After an intended schedule change, regenerate them and review the diff:

    REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_schedule.py -q
    # or: .venv/bin/python tests/unit/test_schedule.py --regen
    git diff tests/golden/
"""
from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ouroboros_ds.core.schedule import (B, F, KINDS, L, LOAD, RECV_B, RECV_F, SEND_B, SEND_F, STEP, Action, delay,
                                   format_schedule, modules_of, num_modules, ouroboros_schedule, parse_schedule,
                                   stage_of, stash_depth)
from ouroboros_ds.core.simulate import (Costs, ScheduleError, balanced_costs, bubble_bound, draw, onef1b_step_time,
                                   simulate, stage_costs, steady_steps, synchronous_cost)
from ouroboros_ds.core.validate import delay_table, validate

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
GOLDEN_CASES = [(1, 1), (1, 4), (2, 1), (2, 4), (3, 2), (4, 3)]
SYNC_GOLDEN_CASES = [(2, 2), (3, 2)]
GRID = [(G, M) for G in range(1, 7) for M in range(1, 9)]


def steady(G, M, costs=None, plan=None):
    """(per-stage utilization, step time) over the steady-state window (steps 2K..2K+3)."""
    window = steady_steps(G)
    tl = simulate(plan or ouroboros_schedule(G, M), costs or balanced_costs(G), steps=window.stop)
    return tl.utilization(window), tl.step_time(window)


# ---------------------------------------------------------------- no torch
def test_pure_python_modules_do_not_import_torch():
    code = ("import sys, ouroboros_ds.core.schedule, ouroboros_ds.core.simulate, ouroboros_ds.core.validate; "
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------- invariants over the grid
@pytest.mark.parametrize("G,M", GRID)
def test_grid_validates_and_round_trips(G, M):
    plan = ouroboros_schedule(G, M)
    validate(plan, G, M)
    validate(plan)  # stages and micro-batches read off the plan
    for acts in plan:
        for a in acts:
            assert Action.parse(str(a)) == a
    assert parse_schedule(format_schedule(plan)) == plan


def test_actions_hashable_and_immutable():
    plan = ouroboros_schedule(3, 4)
    actions = [a for acts in plan for a in acts]
    assert len(set(actions)) == len(actions) - 2  # all distinct but the 3 STEPs
    assert {Action(F, 2, 1): "x"}[Action.parse("2F1")] == "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        actions[0].mb = 7
    with pytest.raises(ValueError):
        Action("X", 1, 0)
    for bad in ("F0", "1F", "1Q0", "STEP0", ""):
        with pytest.raises(ValueError):
            Action.parse(bad)
    assert set(KINDS) == {LOAD, F, B, L, SEND_F, RECV_F, SEND_B, RECV_B, STEP}


@pytest.mark.parametrize("G", range(1, 7))
def test_placement_ring(G):
    K = num_modules(G)
    assert K == G + 1
    assert modules_of(0, G) == [1, K] and stage_of(1, G) == stage_of(K, G) == 0
    for s in range(1, G):
        assert modules_of(s, G) == [s + 1] and stage_of(s + 1, G) == s
    assert sorted(k for s in range(G) for k in modules_of(s, G)) == list(range(1, K + 1))


def test_delays_and_stash_depth():
    # G = 3, K = 4: module 1 is the stalest (delay G), module K is fresh; stash K - k + 1, none for K.
    assert [delay(k, 3) for k in (1, 2, 3, 4)] == [3, 2, 1, 0]
    assert [stash_depth(k, 3) for k in (1, 2, 3, 4)] == [4, 3, 2, 0]
    assert delay_table(3) == [(1, 0, 3, 4), (2, 1, 2, 3), (3, 2, 1, 2), (4, 0, 0, 0)]
    for G in range(1, 7):
        K = num_modules(G)
        assert delay(1, G) == G and delay(K, G) == 0
        for k, s, d, depth in delay_table(G):
            assert (s, d, depth) == (stage_of(k, G), delay(k, G), stash_depth(k, G))


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "2"])
def test_schedule_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        ouroboros_schedule(bad, 2)
    with pytest.raises(ValueError):
        ouroboros_schedule(2, bad)


@pytest.mark.parametrize("G", range(1, 7))
def test_m1_is_the_papers_step(G):
    """M = 1: each stage forwards batch t, replays its delayed batch, steps; stage 0 also runs the loss."""
    K = num_modules(G)
    compute = [[str(a) for a in acts if a.kind in (F, B, L, STEP)] for acts in ouroboros_schedule(G, 1)]
    assert compute[0] == ["1F0", "1B0", f"{K}L0", "STEP"]
    assert all(compute[s] == [f"{s + 1}F0", f"{s + 1}B0", "STEP"] for s in range(1, G))


# ---------------------------------------------------------------- golden schedules
def golden_path(G, M, synchronous=False):
    return GOLDEN / f"{'sync_' if synchronous else ''}g{G}_m{M}.txt"


def regen_golden():
    GOLDEN.mkdir(exist_ok=True)
    for G, M in GOLDEN_CASES:
        golden_path(G, M).write_text(format_schedule(ouroboros_schedule(G, M)) + "\n")
    for G, M in SYNC_GOLDEN_CASES:
        golden_path(G, M, True).write_text(format_schedule(ouroboros_schedule(G, M, synchronous=True)) + "\n")


@pytest.mark.parametrize("G,M", GOLDEN_CASES)
def test_golden(G, M):
    text = format_schedule(ouroboros_schedule(G, M)) + "\n"
    if os.environ.get("REGEN_GOLDEN"):
        golden_path(G, M).write_text(text)
    assert text == golden_path(G, M).read_text(), f"schedule changed; regenerate: see {__file__}'s docstring"
    validate(parse_schedule(golden_path(G, M).read_text()), G, M)


@pytest.mark.parametrize("G,M", SYNC_GOLDEN_CASES)
def test_golden_synchronous(G, M):
    text = format_schedule(ouroboros_schedule(G, M, synchronous=True)) + "\n"
    if os.environ.get("REGEN_GOLDEN"):
        golden_path(G, M, True).write_text(text)
    assert text == golden_path(G, M, True).read_text(), f"schedule changed; regenerate: see {__file__}'s docstring"
    validate(parse_schedule(golden_path(G, M, True).read_text()), G, M, synchronous=True)


# ---------------------------------------------------------------- the validator catches broken schedules
def moved(plan, stage, action, before=None, to_stage=None):
    """A copy of plan with ``action`` removed from ``stage`` and, if ``before`` is given, reinserted
    before that action on ``to_stage`` (default the same stage); before="END" appends before STEP."""
    plan = copy.deepcopy(plan)
    a = Action.parse(action)
    plan[stage].remove(a)
    if before is not None:
        row = plan[stage if to_stage is None else to_stage]
        row.insert(len(row) - 1 if before == "END" else row.index(Action.parse(before)), a)
    return plan


def swapped(plan, stage, x, y):
    plan = copy.deepcopy(plan)
    row = plan[stage]
    i, j = row.index(Action.parse(x)), row.index(Action.parse(y))
    row[i], row[j] = row[j], row[i]
    return plan


def inserted(plan, stage, action, before):
    plan = copy.deepcopy(plan)
    plan[stage].insert(plan[stage].index(Action.parse(before)), Action.parse(action))
    return plan


def duplicated(plan, stage, action):
    plan = copy.deepcopy(plan)
    i = plan[stage].index(Action.parse(action))
    plan[stage].insert(i + 1, Action.parse(action))
    return plan


def deadlocked(G, M):
    """The order the ring used before its messages were ordered for NCCL (tests/golden/legacy/):
    statically fine, and it runs where tags match messages, but it deadlocks when each pair of
    stages' ops run in issue order and a send waits for its receive. G = 3: stage 2 interleaves
    "send activation j, receive gradient j" toward stage 0, which receives every activation first;
    G = 2: stage 0 posts module K's receives before sending stage 1 its inputs."""
    return parse_schedule((GOLDEN / "legacy" / f"g{G}_m{M}.txt").read_text())


def no_step(G, M):
    plan = copy.deepcopy(ouroboros_schedule(G, M))
    plan[G - 1].pop()
    return plan


BASE = ouroboros_schedule(3, 2)
BROKEN = {
    # name: (plan, stage, marked action, words in the reason)
    "removed RECV_F": (moved(BASE, 1, "2RECV_F0"), 1, "2F0", "2RECV_F0"),
    "removed RECV_B": (moved(BASE, 1, "2RECV_B1"), 1, "2B1", "2RECV_B1"),
    "removed SEND_B": (moved(BASE, 2, "3SEND_B1"), 1, "2RECV_B1", "no matching 3SEND_B1"),
    "duplicate forward": (duplicated(BASE, 1, "2F1"), 1, "2F1", "duplicate"),
    "SEND before its compute": (swapped(BASE, 1, "2F0", "2SEND_F0"), 1, "2SEND_F0", "comes after it"),
    "loss SEND before the loss": (swapped(BASE, 0, "4L1", "4SEND_B1"), 0, "4SEND_B1", "4L1"),
    "RECV after its consumer": (swapped(BASE, 2, "3RECV_F1", "3F1"), 2, "3F1", "3RECV_F1"),
    "LOAD after forward": (swapped(BASE, 0, "1LOAD1", "1F1"), 0, "1F1", "1LOAD1"),
    "B on the wrong stage": (moved(BASE, 1, "2B1", before="END", to_stage=2), 2, "2B1", "belongs on stage 1"),
    "no STEP": (no_step(3, 2), 2, "3SEND_B1", "no STEP"),
    "STEP not last": (moved(BASE, 1, "STEP", before="2B1"), 1, "STEP", "last"),
    "receives out of order": (swapped(BASE, 1, "2RECV_F0", "2RECV_F1"), 1, "2RECV_F1", "out of order"),
    "forward missing": (moved(BASE, 2, "3F1"), 2, "STEP", "never forwards micro-batch 1"),
    "loss on a middle stage": (moved(BASE, 0, "4L0", before="END", to_stage=1), 1, "4L0", "belongs on stage 0"),
    "G=1 local hand-off sent": (inserted(ouroboros_schedule(1, 2), 0, "1SEND_F0", before="1LOAD1"),
                                0, "1SEND_F0", "local"),
    "deadlock": (deadlocked(3, 2), 0, "4L1", "deadlock"),
    "deadlock G=2": (deadlocked(2, 4), 0, "3L0", "deadlock"),
}


def assert_caught(plan, stage, action, words, synchronous=False):
    with pytest.raises(ScheduleError) as info:
        validate(plan, synchronous=synchronous)
    e, msg = info.value, str(info.value)
    assert e.stage == stage and plan[stage][e.index] == Action.parse(action), msg
    assert msg.startswith(f"stage {stage}, step {e.step}, action {e.index} ({action}): "), msg
    assert words in msg, msg
    assert f"[{action}]" in msg and f"> stage {stage}: " in msg, msg  # the grid, bad action marked
    assert format_schedule(plan, mark=(stage, e.index)) in msg


@pytest.mark.parametrize("name", BROKEN)
def test_validator_catches(name):
    assert_caught(*BROKEN[name])


def test_validator_checks_sizes():
    with pytest.raises(ScheduleError, match="3 stage rows, expected 4"):
        validate(BASE, stages=4)
    with pytest.raises(ScheduleError, match="never loaded"):
        validate(BASE, micro_batches=3)
    with pytest.raises(ScheduleError, match="out of range"):
        validate(BASE, micro_batches=1)
    with pytest.raises(ScheduleError, match="empty"):
        validate([])


def test_simulator_reports_the_deadlock_step():
    """The simulator, not the static checks, finds this one; it names the step where it blocks."""
    with pytest.raises(ScheduleError, match=r"^stage 0, step 0, action 14 \(4L1\): deadlock: 4L1 waits for "
                                            r"F\(k=4, batch=0, mb=1\)"):
        simulate(deadlocked(3, 2))


# ---------------------------------------------------------------- synchronous steps (sync_steps)
SYNC_GRID = [(G, M) for G in range(1, 6) for M in range(1, 7)]


@pytest.mark.parametrize("G,M", SYNC_GRID)
def test_synchronous_grid_validates(G, M):
    plan = ouroboros_schedule(G, M, synchronous=True)
    validate(plan, synchronous=True)
    validate(plan, G, M, synchronous=True)
    assert parse_schedule(format_schedule(plan)) == plan
    # the same actions as a ring step; the ring step's list is no synchronous step (its replays
    # run before the error gradient of their own step exists)
    ring = ouroboros_schedule(G, M)
    assert sorted(map(str, sum(plan, []))) == sorted(map(str, sum(ring, [])))
    with pytest.raises(ScheduleError):
        validate(ring, synchronous=True)


@pytest.mark.parametrize("G,M", [(1, 1), (1, 3), (2, 2), (3, 4), (5, 2)])
def test_synchronous_list(G, M):
    """Stage 0: forwards, then module K's losses, then module 1's replays; the other stages' lists
    are the ring step's; G = 1 has no SEND/RECV."""
    K = num_modules(G)
    plan, ring = ouroboros_schedule(G, M, synchronous=True), ouroboros_schedule(G, M)
    assert plan[1:] == ring[1:]
    compute = [str(a) for a in plan[0] if a.kind in (F, B, L, STEP)]
    assert compute == ([f"1F{j}" for j in range(M)] + [f"{K}L{j}" for j in range(M)] + [f"1B{j}" for j in range(M)]
                       + ["STEP"])
    if G == 1:
        assert all(a.kind not in (SEND_F, RECV_F, SEND_B, RECV_B) for a in plan[0])
    else:
        row = plan[0]
        for j in range(M):  # the replay's gradient is received in this step, posted before it and
            # after the losses' gradients went out (one pair's order at G = 2: docs/ring.md#transport)
            assert row.index(Action(SEND_B, K, M - 1)) < row.index(Action(RECV_B, 1, j)) < row.index(Action(B, 1, j))


def test_synchronous_delays():
    for G in range(1, 7):
        K = num_modules(G)
        assert [delay(k, G, synchronous=True) for k in range(1, K + 1)] == [0] * K
        assert [stash_depth(k, G, synchronous=True) for k in range(1, K + 1)] == [1] * G + [0]
        assert [d for _, _, d, _ in delay_table(G, synchronous=True)] == [0] * K
        assert [depth for *_, depth in delay_table(G, synchronous=True)] == [1] * G + [0]


SYNC = ouroboros_schedule(3, 2, synchronous=True)
BROKEN_SYNC = {
    # name: (plan, stage, marked action, words in the reason)
    "RECV_B after its replay": (swapped(SYNC, 1, "2RECV_B1", "2B1"), 1, "2B1", "2RECV_B1 comes after it"),
    "RECV_B removed": (moved(SYNC, 2, "3RECV_B0"), 2, "3B0", "never posts 3RECV_B0"),
    "G=1 replay before the loss": (moved(ouroboros_schedule(1, 2, synchronous=True), 0, "1B0", before="2L0"),
                                   0, "1B0", "2L0 comes after it"),
    "replay before the losses": (moved(SYNC, 0, "1B0", before="4L0"), 0, "1B0", "1RECV_B0 comes after it"),
    "the ring step's list": (ouroboros_schedule(3, 2), 0, "1B0", "1RECV_B0 comes after it"),
}


@pytest.mark.parametrize("name", BROKEN_SYNC)
def test_validator_catches_a_broken_synchronous_list(name):
    assert_caught(*BROKEN_SYNC[name], synchronous=True)


def test_synchronous_replays_wait_for_their_own_step():
    G, M = 3, 2
    K = num_modules(G)
    tl = simulate(ouroboros_schedule(G, M, synchronous=True), Costs(), steps=4, synchronous=True)
    end = {(t, str(a)): e for ev in tl.events for t, a, _, e in ev}
    for ev in tl.events:
        for t, a, start, _ in ev:
            if a.kind == B:  # after its own step's loss of the micro-batch, and after module k+1's replay
                assert start >= end[(t, f"{K}L{a.mb}")]
                if a.k + 1 < K:
                    assert start >= end[(t, f"{a.k + 1}B{a.mb}")]


# A synchronous step against a ring step (the slowest stage's steady-state period). Costs()'s
# stage 0 (module 1 + module K's loss) has twice the others' work and hides the synchronous
# step's waits from M >= 2 on at G = 2, 4; with balanced stages they show. docs/ring.md cites these.
SYNC_COST = {  # (G, M): (Costs() ring, Costs() synchronous, balanced ring, balanced synchronous)
    (2, 4): (32.0, 32.0, 4.0, 4.571),
    (4, 8): (64.0, 64.0, 8.0, 10.571),
    (4, 1): (8.0, 20.0, 1.321, 4.0),
    (8, 4): (32.0, 48.0, 4.0, 10.571),
}


@pytest.mark.parametrize("G,M", SYNC_COST)
def test_synchronous_step_cost(G, M):
    got = (*synchronous_cost(G, M), *synchronous_cost(G, M, balanced_costs(G)))
    assert tuple(round(x, 3) for x in got) == SYNC_COST[(G, M)]
    for ring, sync in (got[:2], got[2:]):
        assert sync >= ring - 1e-9  # never faster than the ring
    window = steady_steps(G)
    tl = simulate(ouroboros_schedule(G, M, synchronous=True), balanced_costs(G), steps=window.stop, synchronous=True)
    assert all(0 < u <= 1 + 1e-9 for u in tl.steady_utilization(window))


# ---------------------------------------------------------------- simulator
@pytest.mark.parametrize("M", [1, 3, 8])
def test_single_stage_is_always_busy(M):
    for costs in (Costs(), balanced_costs(1), Costs(forward=2.0, replay=5.0, loss=1.0, step=0.5)):
        util, _ = steady(1, M, costs)
        assert util == [pytest.approx(1.0)]


def test_balanced_costs_are_balanced():
    for G in (1, 2, 3, 8):
        c = balanced_costs(G)
        fw = c.forward if isinstance(c.forward, dict) else {}
        rp = c.replay if isinstance(c.replay, dict) else {}
        assert stage_costs(G, fw, rp, c.loss) == pytest.approx([1.0] * G)


@pytest.mark.parametrize("G,M", [(2, 2), (2, 4), (2, 8), (8, 8), (8, 16)])
def test_steady_state_utilization_balanced(G, M):
    util, step = steady(G, M)
    assert min(util) >= 0.95, util
    assert step >= M  # never faster than the work itself: 1.0 per micro-batch per stage


# The slowest stage's steady-state utilization with balanced costs; docs/schedule.md shows the
# same table (python -m ouroboros_ds.core.simulate --stages 2 3 4 8 --micro-batches 1 2 4 8 16 --balanced).
UTILIZATION = {
    2: [0.966, 0.982, 0.991, 0.996, 0.998],
    3: [0.868, 0.953, 0.976, 0.988, 0.994],
    4: [0.713, 0.926, 0.961, 0.980, 0.990],
    8: [0.416, 0.673, 0.907, 0.951, 0.975],
}


def test_utilization_table():
    for G, row in UTILIZATION.items():
        got = [round(min(steady(G, M)[0]), 3) for M in (1, 2, 4, 8, 16)]
        assert got == row, (G, got)


@pytest.mark.parametrize("G", range(2, 9))
def test_m1_bounded_by_the_sequential_forward(G):
    # With M = 1 (the paper's algorithm) one batch at a time travels the ring: module k + 1 forwards
    # batch t only after module k has, stage 0's loss needs module K - 1's output, and module 1
    # forwards batch t + 1 only after stage 0's STEP of step t, which follows the loss. So each step
    # contains the chain F1 -> F2 -> ... -> FG -> L: no backward locking, but the forward is still
    # sequential (docs/ring.md#micro-batches). Step time >= sum of forwards + loss, and a stage
    # with work w per step is busy at most w / that.
    costs = balanced_costs(G)
    K = num_modules(G)
    bound = sum(costs.forward[k] for k in range(1, K)) + costs.loss
    util, step = steady(G, 1, costs)
    assert step >= bound - 1e-9
    assert max(util) <= 1.0 / bound + 1e-9  # each stage does 1.0 of work per step
    if G >= 3:
        assert max(util) < 0.95  # the headroom that M > 1 recovers
        assert min(steady(G, 4, costs)[0]) > max(util)


def test_beats_1f1b_model():
    """G=2, M=4, per stage f=1, b=2 (b: the backward under the same recompute setting as the replay).
    Stage 0 splits its work between module 1 and module K=3 (whose loss action is forward + backward)."""
    G, M = 2, 4
    costs = Costs(forward={1: 0.5, 2: 1.0}, replay={1: 1.0, 2: 2.0}, loss=1.5)
    assert stage_costs(G, costs.forward, costs.replay, costs.loss) == [3.0, 3.0]
    _, step = steady(G, M, costs)
    ref = onef1b_step_time(G, M, 1.0, 2.0)
    assert ref == 15.0 and bubble_bound(G, M) == 1.25
    assert step < ref
    assert ref / step <= bubble_bound(G, M) + 1e-9  # never more than a bubble-free schedule


def reordered(G, M, how):
    """Alternative orders of the same actions, for the comparison that schedule.py's docstring cites:
    'interleaved' runs each forward's replay right after it (1F1B-like inside the step), with each
    pair's messages alternating (activation j, gradient j) on both sides; 'loss first' puts stage
    0's losses before its replays."""
    K = num_modules(G)
    plan = []
    for s, acts in enumerate(ouroboros_schedule(G, M)):
        if how == "loss first":
            if s == 0:
                body = [a for a in acts if a.kind != STEP and a.kind not in (B, RECV_B)]
                body += [a for a in acts if a.kind == B] + [a for a in acts if a.kind == RECV_B]
                acts = body + [Action(STEP)]
            plan.append(acts)
            continue
        k, row = s + 1, []
        for j in range(M):
            if s == 0:
                row.append(Action(LOAD, 1, j))
            else:
                row.append(Action(RECV_F, k, j))
            row += [Action(F, k, j), Action(SEND_F, k, j), Action(RECV_B, k, j), Action(B, k, j)]
            if s > 0:
                row.append(Action(SEND_B, k, j))
        if s == 0:
            for j in range(M):
                row += [Action(RECV_F, K, j), Action(L, K, j), Action(SEND_B, K, j)]
        plan.append(row + [Action(STEP)])
    return plan


@pytest.mark.parametrize("how", ["interleaved", "loss first"])
@pytest.mark.parametrize("G,M", [(3, 2), (4, 4), (8, 4), (8, 8)])
def test_forward_first_order_beats_alternatives(how, G, M):
    other = reordered(G, M, how)
    validate(other, G, M)
    assert sorted(map(str, sum(other, []))) == sorted(map(str, sum(ouroboros_schedule(G, M), [])))
    assert steady(G, M)[1] < steady(G, M, plan=other)[1]


# ---------------------------------------------------------------- CLIs and the picture
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_validate_cli():
    ok = run_cli("ouroboros_ds.core.validate", "--stages", "3", "--micro-batches", "2")
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("ok") and "stage 2:" in ok.stdout
    gold = run_cli("ouroboros_ds.core.validate", "--file", str(golden_path(4, 3)))
    assert gold.returncode == 0, gold.stdout


def test_synchronous_clis():
    ok = run_cli("ouroboros_ds.core.validate", "--stages", "2", "--micro-batches", "2", "--synchronous")
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("ok"), ok.stdout
    assert "3L1 3SEND_B1 1RECV_B0 1RECV_B1 1B0 1B1 STEP" in ok.stdout
    gold = run_cli("ouroboros_ds.core.validate", "--file", str(golden_path(2, 2, True)), "--synchronous")
    assert gold.returncode == 0, gold.stdout
    sim = run_cli("ouroboros_ds.core.simulate", "--stages", "2", "--micro-batches", "4", "--balanced", "--synchronous")
    assert sim.returncode == 0, sim.stderr
    assert "synchronous step 4.571 vs ring step 4 (slowest stage's period): 1.143x" in sim.stdout, sim.stdout


def test_validate_cli_reports_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text(format_schedule(deadlocked(3, 2)) + "\n")
    out = run_cli("ouroboros_ds.core.validate", "--file", str(bad))
    assert out.returncode == 1 and "deadlock" in out.stdout and "[4L1]" in out.stdout


def test_simulate_cli_and_draw(tmp_path):
    png = tmp_path / "t.png"
    out = run_cli("ouroboros_ds.core.simulate", "--stages", "3", "--micro-batches", "4", "--balanced", "--png", str(png))
    assert out.returncode == 0, out.stderr
    assert "stage 2: utilization 0.976" in out.stdout and "step time 4.098" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run_cli("ouroboros_ds.core.simulate", "--stages", "2", "8", "--micro-batches", "1", "16", "--balanced")
    assert "| 8 | 0.416 (3.33x) | 0.975 (1.40x) |" in table.stdout, table.stdout
    path = tmp_path / "d.png"
    draw(simulate(ouroboros_schedule(2, 2), Costs(step=0.5), steps=3), str(path), title="G=2 M=2")
    assert path.stat().st_size > 1000


if __name__ == "__main__":
    if "--regen" in sys.argv[1:]:
        regen_golden()
        print(f"wrote {len(GOLDEN_CASES)} golden schedules under {GOLDEN}")
    else:
        print("usage: python tests/unit/test_schedule.py --regen")
