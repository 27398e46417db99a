"""Why a stale gradient hurts Adam-style training so much: the largest stable step, with a delay.

On a quadratic with curvature h, a module that applies an EMA-momentum update (Adam's first
moment, beta1) of a gradient d steps old follows

    m(t) = beta1 m(t-1) + (1 - beta1) h w(t - d)        w(t+1) = w(t) - lr m(t)

whose characteristic polynomial is (z - 1)(z - beta1) z^d + a (1 - beta1) z, with a = lr h. It is
stable while every root lies inside the unit circle. Without delay the edge is the well-known
a = 2 (1 + beta1) / (1 - beta1) (38 at beta1 = 0.9: the "edge of stability" Adam trains at);
one step of delay moves it to about 1, whatever beta1: the period-2 oscillation that momentum
damps is exactly what a one-step delay turns around. This prints the edge for a grid of delays.

--compensation c adds a delay-compensated gradient, ``h w(t-d) + c h (w(t) - w(t-d))`` (c = 1:
the exact first-order correction, as if there were no delay), to show how much of the curvature
term a correction (DC-ASGD's ``lambda g*g``, a Hessian-vector estimate) must get right to help.

--prediction s takes the gradient at weights predicted s updates ahead along the last update,
``w(t-d) + s (w(t-d) - w(t-d-1))`` (``--weight-prediction H`` of train.py is s = H x d): the
characteristic polynomial becomes (z - 1)(z - beta1) z^d + a (1 - beta1) ((1 + s) z - s).

  python experiments/delay_stability.py
  python experiments/delay_stability.py --beta1 0.9 --delays 1 2 --compensation 0 0.5 0.75 0.9 1
  python experiments/delay_stability.py --beta1 0.9 --delays 1 2 --prediction-factor 0 1 1.5
"""
from __future__ import annotations

import argparse

import numpy as np


def max_stable_step(beta1: float, delay: int, compensation: float = 0.0, hi: float = 1e3,
                    prediction: float = 0.0) -> float:
    """Largest a = lr x h below which the delayed EMA-momentum iteration is stable for every step.
    The gradient is h ((1 - c) w_hat + c w(t)), w_hat = w(t-d) + s (w(t-d) - w(t-d-1))."""
    c, s = compensation, prediction

    def stable(a: float) -> bool:
        # (z - 1)(z - beta1) z^d + a (1 - beta1) ((1 - c)((1 + s) z - s) + c z^(d+1)), highest power first
        poly = np.zeros(delay + 3)
        poly[:3] = [1.0, -(1.0 + beta1), beta1]
        poly[-2] += a * (1.0 - beta1) * (1.0 - c) * (1.0 + s)
        poly[-1] -= a * (1.0 - beta1) * (1.0 - c) * s
        poly[-(delay + 2)] += a * (1.0 - beta1) * c
        return bool(np.all(np.abs(np.roots(poly)) < 1.0 - 1e-12))

    # The stable set need not be an interval (with a correction it can come back at larger a), so
    # find the first unstable step on a fine grid, then bisect between it and the last stable one.
    grid = np.geomspace(1e-3, hi, 3000)
    first = next((i for i, a in enumerate(grid) if not stable(a)), None)
    if first is None:
        return float(hi)
    lo, hi = (grid[first - 1] if first else 0.0), grid[first]
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return float(lo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--beta1", type=float, nargs="+", default=[0.0, 0.9, 0.99])
    p.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--compensation", type=float, nargs="+", default=[0.0],
                   help="fractions c of the curvature term a delay correction gets right")
    p.add_argument("--prediction-factor", type=float, nargs="+", default=[0.0],
                   help="weight prediction H: the gradient at weights predicted s = H x delay last updates ahead")
    args = p.parse_args(argv)
    print("| beta1 | compensation | prediction H | " + " | ".join(f"delay {d}" for d in args.delays) + " |")
    print("|---|---|---|" + "---|" * len(args.delays))
    for b in args.beta1:
        for c in args.compensation:
            for f in args.prediction_factor:
                edges = [max_stable_step(b, d, c, prediction=f * d) for d in args.delays]
                print(f"| {b} | {c} | {f} | " + " | ".join(f"{e:.3f}" for e in edges) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
