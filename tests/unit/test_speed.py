"""Speed model: the simulator at scale, the tied-weight cycle bound, the balanced and fresh
partitions (the measured numbers are in docs/benchmarks.md)."""
from __future__ import annotations

import pytest

from ouroboros_ds.core.partition import balanced_blocks_per_module, layer_costs, ring_partition, stage_costs_of
from ouroboros_ds.core.schedule import num_modules, ouroboros_schedule
from ouroboros_ds.core.simulate import balanced_costs, cycle_bound, scale_table, simulate, steady_steps


def steady(G, M, costs):
    w = steady_steps(G)
    tl = simulate(ouroboros_schedule(G, M), costs, steps=w.stop)
    return tl, w


@pytest.mark.parametrize("G", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("M", [1, 2, 4, 8])
def test_schedule_meets_the_cycle_bound(G, M):
    """With balanced costs the schedule's steady-state period is exactly the lower bound that no
    order of work can beat (the stage's own work, or the tied-weight chain F1 -> ... -> L -> STEP)."""
    costs = balanced_costs(G)
    tl, w = steady(G, M, costs)
    period, util_bound = cycle_bound(G, M, costs)
    periods = [tl.period(s, w) for s in range(G)]
    assert max(periods) == pytest.approx(period, rel=1e-9)
    assert min(tl.steady_utilization(w)) == pytest.approx(util_bound, rel=1e-9)


def test_g8_utilization_target_and_the_m1_bound():
    """The target is utilization >= 0.95 at G = 8 for every M. It holds from M = 4 on; at M = 1 and
    2 the tied-weight cycle forbids it for any schedule: (f + b) / (sum of forwards + loss)."""
    costs = balanced_costs(8)
    for M in (4, 8, 16, 32):
        tl, w = steady(8, M, costs)
        assert min(tl.steady_utilization(w)) >= 0.95
    K = num_modules(8)
    chain = sum(costs.forward[k] for k in range(1, K)) + costs.loss
    assert cycle_bound(8, 1, costs)[1] == pytest.approx(1.0 / chain)
    assert cycle_bound(8, 1, costs)[1] < 0.44 and cycle_bound(8, 2, costs)[1] < 0.73


def test_period_leaves_out_the_stage_skew():
    """The window over all stages (Timeline.utilization) includes the stagger between stages; the
    per-stage period does not: 2 stages, no bubble, every stage busy all the time."""
    tl, w = steady(2, 4, balanced_costs(2))
    assert min(tl.steady_utilization(w)) == pytest.approx(1.0)
    assert min(tl.utilization(w)) < 1.0


def test_scale_table_rows():
    table = scale_table([2, 8], balanced_costs)
    assert "| 8 | 1 | 2.321 | 0.431 | 0.431 | 8.000 |" in table
    assert "| 8 | 32 | 32.000 | 1.000 | 1.000 | 39.000 | 1.219 | 1.219 |" in table
    assert sum(1 for line in table.splitlines() if line.startswith("| 2 |")) == 4  # M = 1, 2, 4, 8


def test_balanced_partition_lowers_the_most_loaded_stage():
    costs = layer_costs(256, 256, 128)
    for G, L in ((2, 8), (3, 8), (4, 8), (8, 16)):
        for replay in ("recompute", "stash"):
            bpm = balanced_blocks_per_module(L, G, costs, replay)
            bounds = ring_partition(L + 3, list(range(1, L + 1)), G, bpm)  # a valid explicit partition
            assert len(bounds) == G + 1 and sum(bpm) == L
            authors = [b - a for a, b in ring_partition(L + 3, list(range(1, L + 1)), G)]
            authors = [authors[0] - 1] + authors[1:-1] + [authors[-1] - 2]  # blocks only
            assert max(stage_costs_of(bpm, costs, replay)) <= max(stage_costs_of(authors, costs, replay))
    # the head and loss are on stage 0: at G=2 in recompute mode it takes fewer, cheaper blocks
    bpm = balanced_blocks_per_module(8, 2, costs, "recompute")
    assert bpm == [0, 3, 5]
    assert stage_costs_of([0, 3, 5], costs)[0] - 5 * 3 * costs["block"] == pytest.approx(3 * costs["head"])


def test_fresh_partition_moves_stage0_blocks_out_of_the_stalest_module():
    """--partition fresh: the same most-loaded-stage work as balanced, module 1 gets no block that
    module K could take; the other stages' blocks are not moved."""
    for dims in ((64, 256, 128), (256, 256, 128)):
        costs = layer_costs(*dims)
        for G, L in ((2, 4), (2, 8), (3, 8), (4, 8)):
            for replay in ("recompute", "stash"):
                bal = balanced_blocks_per_module(L, G, costs, replay)
                fresh = balanced_blocks_per_module(L, G, costs, replay, fresh=True)
                assert max(stage_costs_of(fresh, costs, replay)) == pytest.approx(max(stage_costs_of(bal, costs, replay)))
                assert fresh[0] == 0 and sum(fresh) == L, (G, L, replay, fresh)
    # the tiny model of docs/staleness.md at G = 2: [1, 2, 1] (one block of delay 2) -> [0, 2, 2]
    tiny = layer_costs(64, 256, 128)
    assert balanced_blocks_per_module(4, 2, tiny, "stash") == [1, 2, 1]
    assert balanced_blocks_per_module(4, 2, tiny, "stash", fresh=True) == [0, 2, 2]
