"""experiments/delay_stability.py: the stability edges it reports match the closed forms."""
from __future__ import annotations

import math
import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
from delay_stability import max_stable_step  # noqa: E402


def test_edges_match_closed_forms():
    # no delay: plain gradient descent 2, EMA momentum 2 (1 + beta1) / (1 - beta1)
    assert max_stable_step(0.0, 0) == pytest.approx(2.0, rel=1e-6)
    assert max_stable_step(0.9, 0) == pytest.approx(38.0, rel=1e-6)
    # delayed gradient descent: 2 sin(pi / (2 (2d + 1)))
    for d in (1, 2, 3):
        assert max_stable_step(0.0, d) == pytest.approx(2 * math.sin(math.pi / (2 * (2 * d + 1))), rel=1e-6)
    # one step of delay with momentum: the product of the two non-zero roots is beta1 + a (1 - beta1) = 1
    assert max_stable_step(0.9, 1) == pytest.approx(1.0, rel=1e-6)


def test_exact_compensation_removes_the_delay():
    for d in (1, 2):
        assert max_stable_step(0.9, d, compensation=1.0) == pytest.approx(38.0, rel=1e-6)
    # half a correction helps, but little: 1 -> 2 at delay 1
    assert max_stable_step(0.9, 1, compensation=0.5) == pytest.approx(2.0, rel=1e-6)
    # 90% of it at delay 2: unstable from a ~ 8 although stable again at 20-37 (the first edge counts)
    assert 7 < max_stable_step(0.9, 2, compensation=0.9) < 9


def _bounded(a: float, beta1: float, d: int, s: float, steps: int = 4000) -> bool:
    """Run the update itself (not its polynomial): m, w with a gradient at predicted stale weights."""
    w, m = [1.0] * (d + 2), 0.0
    for _ in range(steps):
        stale, before = w[-1 - d], w[-2 - d]
        m = beta1 * m + (1 - beta1) * (stale + s * (stale - before))  # curvature h = 1, a = lr
        w.append(w[-1] - a * m)
        if abs(w[-1]) > 1e6:
            return False
    return abs(w[-1]) < 1e-3


def test_prediction_edge_matches_the_update_it_models():
    assert max_stable_step(0.9, 1, prediction=0.0) == pytest.approx(max_stable_step(0.9, 1), rel=1e-9)
    for d, s in ((1, 1.0), (2, 2.0), (1, 1.5)):
        edge = max_stable_step(0.9, d, prediction=s)
        assert _bounded(0.97 * edge, 0.9, d, s) and not _bounded(1.03 * edge, 0.9, d, s), (d, s, edge)
    # it helps with momentum: ~2.7x at delay 1, ~2.4x at delay 2 (H = 1)
    assert 2.5 < max_stable_step(0.9, 1, prediction=1.0) < 2.9
    assert 1.1 < max_stable_step(0.9, 2, prediction=2.0) < 1.3


def test_steps_to_tenth():
    from delay_stability import steps_to_tenth

    # no momentum, no delay: w(t+1) = (1 - a) w(t)
    assert steps_to_tenth(0.1, 0.0, 0) == pytest.approx(math.log(0.1) / math.log(0.9))
    assert steps_to_tenth(2.5, 0.0, 0) == float("inf")  # past the edge (2)
    # a delay with the lr divided by 1 + delay slows a flat direction about (1 + delay)-fold
    assert steps_to_tenth(0.01 / 8, 0.9, 7, prediction=7) / steps_to_tenth(0.01, 0.9, 0) > 7
