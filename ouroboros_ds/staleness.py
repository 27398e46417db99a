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
(``train.py --stale-lr-scale c``) and :class:`ouroboros_ds.reference.Reference` build their groups
with this one function, so they stay equal.
"""
from __future__ import annotations

from . import schedule as S


def delay_scaled_groups(module_params: dict, num_stages: int, lr: float, c: float) -> list[dict]:
    """Optimizer parameter groups for the modules of one stage.

    ``module_params``: {module k: its parameters} for the stage's modules (a parameter listed
    under several modules, the tied embedding, is *shared* and keeps the full ``lr``). Returns
    ``[{"params": [...], "lr": ...}, ...]``, every parameter once, groups without parameters
    left out.
    """
    if c < 0:
        raise ValueError(f"stale_lr_scale: must be >= 0 (0 turns the mitigation off), got {c}")
    count: dict = {}
    for params in module_params.values():
        for p in {id(p): p for p in params}.values():
            count[id(p)] = count.get(id(p), 0) + 1
    groups, seen, shared = [], set(), []
    for k in sorted(module_params):
        own = []
        for p in module_params[k]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            (shared if count[id(p)] > 1 else own).append(p)
        if own:
            groups.append({"params": own, "lr": lr / (1.0 + c * S.delay(k, num_stages))})
    if shared:
        groups.append({"params": shared, "lr": lr})
    return groups


def pipeline_groups(model, lr: float, c: float) -> list[dict]:
    """The rule for this rank's stage of an ``OuroborosPipelineModule``, as the engine's own param
    groups (``engine.ring_param_groups``: one per first-gradient step). A parameter's first
    gradient comes at the delay of the freshest module that uses it, which is the delay its
    gradient carries: module k's own parameters at delay(k), the tied embedding at 0 (module K).
    So each group gets ``lr / (1 + c * first_step)``: the same lrs as :func:`delay_scaled_groups`."""
    from .engine import FIRST_STEP, ring_param_groups

    if c < 0:
        raise ValueError(f"stale_lr_scale: must be >= 0 (0 turns the mitigation off), got {c}")
    return [{**g, "lr": lr / (1.0 + c * g[FIRST_STEP])} for g in ring_param_groups(model)]
