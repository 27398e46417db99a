"""DeepSpeed's schedules simulated from their own instruction lists (``ouroboros_ds.tools.rivals``):
1F1B reproduces (M + G - 1)(f + b) and keeps min(G - s, M) micro-batches on stage s; DualPipeV
runs without deadlock for every G and M >= 2G, each rank does exactly 2M forwards and 2M
backwards, and it never beats the work bound; the DualPipeV refusal names the fix."""
from __future__ import annotations

import pytest

from ouroboros_ds.tools import rivals


@pytest.mark.parametrize("G", (1, 2, 3, 4, 8))
@pytest.mark.parametrize("M", (1, 2, 3, 4, 8, 16))
def test_1f1b_matches_its_closed_form(G, M):
    f, b = 1.0, 2.0
    res = rivals.simulate_rival(rivals.train_schedules(G, M), rivals.RivalCosts([[f]] * G, [[b]] * G, [0.0] * G),
                                rivals.RivalMemory([[1.0]] * G))
    assert res.step_time == pytest.approx((M + G - 1) * (f + b))
    assert res.peak == [min(G - s, M) for s in range(G)]
    assert res.busy == [pytest.approx(M * (f + b))] * G


@pytest.mark.parametrize("G", (1, 2, 3, 4, 8))
@pytest.mark.parametrize("extra", (0, 1, 5))
def test_dualpipev_runs_and_respects_the_work_bound(G, extra):
    M = 2 * G + extra
    f, b = 0.5, 1.0  # per phase (chunk)
    scheds = rivals.dualpipev_schedules(G, M)
    from deepspeed.runtime.pipe import schedule as ds

    for sch in scheds:  # every micro-batch goes through both phases, forward and backward, once
        cmds = [c for step in sch.steps() for c in step]
        for kind in (ds.ForwardPass, ds.BackwardPass):
            ids = sorted(c.buffer_id for c in cmds if isinstance(c, kind))
            assert ids == list(range(2 * M))
    res = rivals.simulate_rival(scheds, rivals.RivalCosts([[f, f]] * G, [[b, b]] * G, [0.0] * G),
                                rivals.RivalMemory([[1.0, 1.0]] * G))
    assert res.step_time >= 2 * M * (f + b) - 1e-9  # a rank's own work
    if G > 1:  # and it fills part of 1F1B's bubble
        assert res.step_time < (M + G - 1) * 2 * (f + b)
    assert all(p <= 2 * M for p in res.peak)


def test_dualpipev_refusal_names_the_fix():
    from ouroboros_ds.pipe.baseline import check_dualpipev

    check_dualpipev(4, 2)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=3.*at least 2 x pipeline-parallel size = 4.*"
                                         r"raise gradient_accumulation_steps to 4.*--schedule ouroboros"):
        check_dualpipev(3, 2)
