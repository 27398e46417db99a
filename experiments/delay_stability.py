"""Why a stale gradient hurts Adam-style training so much: the largest stable step, with a delay.

On a quadratic with curvature h, a module that applies an EMA-momentum update (Adam's first
moment, beta1) of a gradient d steps old follows

    m(t) = beta1 m(t-1) + (1 - beta1) h w(t - d)        w(t+1) = w(t) - lr m(t)

whose characteristic polynomial is (z - 1)(z - beta1) z^d + a (1 - beta1) z, with a = lr h. It is
stable while every root lies inside the unit circle. Without delay the edge is the well-known
a = 2 (1 + beta1) / (1 - beta1) (38 at beta1 = 0.9: the "edge of stability" Adam trains at);
one step of delay moves it to about 1, whatever beta1: the period-2 oscillation that momentum
damps is exactly what a one-step delay turns around. This prints the edge for a grid of delays.

  python experiments/delay_stability.py
"""
from __future__ import annotations

import argparse

import numpy as np


def max_stable_step(beta1: float, delay: int, hi: float = 1e3) -> float:
    """Largest a = lr x h for which the delayed EMA-momentum iteration is stable (bisection)."""
    def stable(a: float) -> bool:
        # (z - 1)(z - beta1) z^delay + a (1 - beta1) z, highest power first
        poly = np.zeros(delay + 3)
        poly[:3] = [1.0, -(1.0 + beta1), beta1]
        poly[-2] += a * (1.0 - beta1)
        return bool(np.all(np.abs(np.roots(poly)) < 1.0 - 1e-12))

    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return lo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--beta1", type=float, nargs="+", default=[0.0, 0.9, 0.99])
    p.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 3])
    args = p.parse_args(argv)
    print("| beta1 | " + " | ".join(f"delay {d}" for d in args.delays) + " |")
    print("|---|" + "---|" * len(args.delays))
    for b in args.beta1:
        print(f"| {b} | " + " | ".join(f"{max_stable_step(b, d):.3f}" for d in args.delays) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
