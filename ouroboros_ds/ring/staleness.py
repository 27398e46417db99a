"""Staleness mitigation beyond the paper (off by default): learning rate scaled down by delay.

Module k applies a gradient that is ``delay(k) = K - k`` steps old. With Adam every weight moves
by about ``lr`` per step whatever the gradient's size, so a stale gradient's error grows with
``lr x delay``; the cure that costs nothing is a smaller step for the stale modules:

    lr_k = lr / (1 + c * delay(k))          (c = 0: the paper's update, unchanged)

Module K (delay 0) keeps ``lr``. The tied embedding keeps ``lr`` too: it sits in module 1 (the
stalest) *and* in module K, and most of its gradient is module K's fresh output-projection
gradient; scaling it with module 1 slows the whole model down (measured: docs/staleness.md).

The rule is a list of optimizer parameter groups, so DeepSpeed's optimizer and its LR schedules
apply it unchanged (``WarmupCosineLR`` scales each group's own initial ``lr``). The engine
(``train.py --stale-lr-scale c``) and :class:`ouroboros_ds.ring.reference.Reference` build their groups
with the same two functions (:func:`ouroboros_ds.ring.warmup.stage_param_groups`, :func:`scaled_by_delay`),
so they stay equal.
"""
from __future__ import annotations

from .warmup import FIRST_STEP, ring_param_groups


def scaled_by_delay(groups: list[tuple[int, list]], lr: float, c: float) -> list[dict]:
    """``[{"params", "lr": lr / (1 + c * step)}]`` for ``[(first-gradient step, params)]`` groups."""
    if c < 0:
        raise ValueError(f"stale_lr_scale: must be >= 0 (0 turns the mitigation off), got {c}")
    return [{"params": params, "lr": lr / (1.0 + c * step)} for step, params in groups]


def pipeline_groups(model, lr: float, c: float) -> list[dict]:
    """The rule for this rank's stage of an ``OuroborosPipelineModule``: the engine's own param
    groups (:func:`ouroboros_ds.ring.warmup.ring_param_groups`, one per first-gradient step) with their lrs scaled."""
    groups = ring_param_groups(model)
    return [{**g, **s} for g, s in zip(groups, scaled_by_delay([(g[FIRST_STEP], g["params"]) for g in groups], lr, c))]


def stale_momentum(groups: list[tuple[int, list]], betas, beta1: float) -> list[dict]:
    """Delay-aware momentum (0: off): the stale groups (first gradient at step > 0, i.e. delay > 0)
    get Adam's ``beta1`` instead of the config's; ``[{"params", "betas"}]`` per group.

    With weight prediction, a slower-turning first moment makes the last update a better forecast
    of the next ones, so the delayed modules' stable step grows (``experiments/delay_stability.py``
    ``--beta1 0.95 --prediction-factor 1``: the stable lr x curvature at delay 1 goes from 2.7 to
    4.0, at delay 2 from 1.2 to 1.8); the fresh groups keep the config's betas."""
    if not 0 <= beta1 < 1:
        raise ValueError(f"stale_beta1: must be in [0, 1) (0 turns it off), got {beta1}")
    beta2 = betas[1]
    return [{"params": params, **({"betas": (beta1, beta2)} if beta1 and step > 0 else {})} for step, params in groups]
