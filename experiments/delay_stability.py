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

--rates prints, instead of the edges, how fast a direction of curvature h trains (steps to shrink
its error 10x) against lr x h, synchronous and at each delay with the delay-scaled lr.

--prediction s takes the gradient at weights predicted s updates ahead along the last update,
``w(t-d) + s (w(t-d) - w(t-d-1))`` (``--weight-prediction H`` of train.py is s = H x d): the
characteristic polynomial becomes (z - 1)(z - beta1) z^d + a (1 - beta1) ((1 + s) z - s).

  python experiments/delay_stability.py
  python experiments/delay_stability.py --beta1 0.9 --delays 1 2 --compensation 0 0.5 0.75 0.9 1
  python experiments/delay_stability.py --beta1 0.9 --delays 1 2 --prediction-factor 0 1 1.5
  python experiments/delay_stability.py --rates --beta1 0.9 --prediction-factor 1 --delays 1 3 7 --stale-lr-scale 0 1
"""
from __future__ import annotations

import argparse

import numpy as np


def char_poly(a: float, beta1: float, delay: int, compensation: float = 0.0, prediction: float = 0.0):
    """Coefficients (highest power first) of the iteration's characteristic polynomial, a = lr x h:
    (z - 1)(z - beta1) z^d + a (1 - beta1) ((1 - c)((1 + s) z - s) + c z^(d+1))."""
    c, s = compensation, prediction
    poly = np.zeros(delay + 3)
    poly[:3] = [1.0, -(1.0 + beta1), beta1]
    poly[-2] += a * (1.0 - beta1) * (1.0 - c) * (1.0 + s)
    poly[-1] -= a * (1.0 - beta1) * (1.0 - c) * s
    poly[-(delay + 2)] += a * (1.0 - beta1) * c
    return poly


def max_stable_step(beta1: float, delay: int, compensation: float = 0.0, hi: float = 1e3,
                    prediction: float = 0.0) -> float:
    """Largest a = lr x h below which the delayed EMA-momentum iteration is stable for every step.
    The gradient is h ((1 - c) w_hat + c w(t)), w_hat = w(t-d) + s (w(t-d) - w(t-d-1))."""

    def stable(a: float) -> bool:
        return bool(np.all(np.abs(np.roots(char_poly(a, beta1, delay, compensation, prediction))) < 1.0 - 1e-12))

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


def steps_to_tenth(a: float, beta1: float, delay: int, compensation: float = 0.0, prediction: float = 0.0) -> float:
    """Steps the iteration needs to shrink the distance to the minimum 10x (its slowest mode;
    inf where it is unstable): how fast a direction of curvature h trains at lr = a / h."""
    rho = float(np.max(np.abs(np.roots(char_poly(a, beta1, delay, compensation, prediction)))))
    return float(np.log(0.1) / np.log(rho)) if rho < 1.0 else float("inf")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--beta1", type=float, nargs="+", default=[0.0, 0.9, 0.99])
    p.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--compensation", type=float, nargs="+", default=[0.0],
                   help="fractions c of the curvature term a delay correction gets right")
    p.add_argument("--prediction-factor", type=float, nargs="+", default=[0.0],
                   help="weight prediction H: the gradient at weights predicted s = H x delay last updates ahead")
    p.add_argument("--rates", action="store_true",
                   help="instead of the edges: steps to shrink the error 10x against a = lr x h (at the schedule's "
                        "lr), synchronous and at each delay with the lr divided by 1 + C x delay (--stale-lr-scale) "
                        "and weight prediction H (the first --prediction-factor), first --beta1 and --compensation")
    p.add_argument("--stale-lr-scale", type=float, nargs="+", default=[1.0])
    p.add_argument("--curvatures", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    args = p.parse_args(argv)
    if args.rates:
        b, c, f = args.beta1[0], args.compensation[0], args.prediction_factor[0]
        cols = [(d, C) for d in args.delays if d for C in args.stale_lr_scale]
        print(f"beta1 {b}, prediction H {f}, compensation {c}: steps to shrink the error 10x (inf: unstable)")
        print("| a = lr x h | synchronous | " + " | ".join(f"delay {d}, C {C:g}" for d, C in cols) + " |")
        print("|---|---|" + "---|" * len(cols))
        for a in args.curvatures:
            row = [steps_to_tenth(a / (1 + C * d), b, d, c, f * d) for d, C in cols]
            print(f"| {a:g} | {steps_to_tenth(a, b, 0):.0f} | " + " | ".join(f"{x:.0f}" for x in row) + " |")
        return 0
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
