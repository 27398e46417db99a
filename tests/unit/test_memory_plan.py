"""The memory-bounded replay's planner (``ouroboros_ds.ring.memory``): the plan keeps the most graphs
whose peak fits the budget, the peak grows with every kept graph, the budget option parses."""
from __future__ import annotations

import pytest

from ouroboros_ds.ring.memory import (ModuleMemory, ReplayPlan, budget_bytes, module_peak, onef1b_peaks, parse_budget,
                                 plan_for_budget, stage_peaks)


@pytest.mark.parametrize("G", (1, 2, 3, 4, 8))
@pytest.mark.parametrize("M", (1, 2, 4, 8))
def test_plan_is_the_most_kept_within_budget(G, M):
    mems = {k: ModuleMemory(graph=10.0 * (k % 3 + 1), inputs=0.5, snapshot=3.0) for k in range(1, G + 1)}
    for budget in (0.0, 40.0, 100.0, 400.0, float("inf")):
        plan = plan_for_budget(G, M, mems, 25.0, budget)
        peaks = stage_peaks(G, M, mems, 25.0, plan)
        for k, n in plan.kept.items():
            assert 0 <= n <= M
            s = 0 if k == 1 else k - 1
            if n > 0:  # what was kept fits
                assert peaks[s] <= budget
            if n < M:  # one more would not
                assert stage_peaks(G, M, mems, 25.0, ReplayPlan({**plan.kept, k: n + 1}))[s] > budget
        if budget == float("inf"):
            assert all(n == M for n in plan.kept.values())
    for k in mems:  # the peak grows with every kept graph; keeping all is (d + 1) M graphs
        peaks = [module_peak(k, G, M, mems[k], n) for n in range(M + 1)]
        assert peaks == sorted(peaks)
        d = G + 1 - k
        assert peaks[-1] == (d + 1) * (3.0 + M * 0.5) + (d + 1) * M * mems[k].graph


def test_budget_option():
    assert parse_budget("1f1b") == ("rel", 1.0)
    assert parse_budget("1.5x") == ("rel", 1.5)
    assert parse_budget("300MB") == ("abs", 300 * 2 ** 20)
    assert budget_bytes("2x", 100.0) == 200.0 and budget_bytes("inf", 1.0) == float("inf")
    for bad in ("", "0x", "-1MB", "lots", "1f1b2"):
        with pytest.raises(ValueError, match="--activation-budget"):
            parse_budget(bad)
    assert onef1b_peaks(4, 2, [1.0, 1.0, 1.0, 1.0]) == [2.0, 2.0, 2.0, 1.0]
    assert str(ReplayPlan.parse("1:2 3:0")) == "1:2 3:0"
    with pytest.raises(ValueError, match="k:n"):
        ReplayPlan.parse("1=2")


@pytest.mark.parametrize("bpm,M,expected", [
    ([0, 3, 5], 4, {1: 4, 2: 2}),        # G = 2: 1F1B's stage 0 holds 2 x 4 blocks; module 2 keeps 2 of 3 blocks each
    ([1, 2, 1], 4, {1: 3, 2: 2}),        # module 1 shares stage 0 with module K's loss graph
    ([0, 8, 8, 8, 8], 4, {1: 4, 2: 4, 3: 4, 4: 4}),  # G = 4, M = G: every graph fits
    ([0, 8, 8, 8, 8], 8, {1: 8, 2: 4, 3: 4, 4: 4}),  # M = 2G: half of them
    ([2, 2], 3, {1: 1}),                 # G = 1: one graph of the whole model, as 1F1B
    ([4, 1, 1, 2], 1, {1: 0, 2: 1, 3: 1}),  # module 1 alone is over 1F1B's peak: it recomputes
])
def test_synchronous_kept_stays_within_1f1b_memory(bpm, M, expected):
    from ouroboros_ds.core.schedule import stage_of
    from ouroboros_ds.ring.memory import synchronous_kept

    kept = synchronous_kept(bpm, M)
    assert kept == expected
    G, L = len(bpm) - 1, sum(bpm)
    budget = min(M, G) * -(-L // G)  # blocks of stock 1F1B's busiest stage's graphs
    for k, n in kept.items():
        assert 0 <= n <= M
        held = n * bpm[k - 1] + (bpm[-1] if stage_of(k, G) == 0 else 0)
        assert held <= budget or n == 0, (k, n)
        if n < M and bpm[k - 1]:  # one more would not fit
            assert held + bpm[k - 1] > budget, (k, n)
