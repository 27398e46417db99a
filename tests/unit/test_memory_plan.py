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
