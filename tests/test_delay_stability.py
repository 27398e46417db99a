"""experiments/delay_stability.py: the stability edges it reports match the closed forms."""
from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
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
