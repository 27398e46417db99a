"""Staleness mitigation beyond the paper: a learning rate scaled down by the module's delay.

Module k applies a gradient that is ``delay(k) = K - k`` steps old. With Adam every weight moves
by about ``lr`` per step whatever the gradient's size, so a stale gradient's error grows with
``lr x delay``, and the largest stable step shrinks with the delay (docs/staleness.md: on a
quadratic it falls about as 1 / delay, 1.0, 0.51, 0.35 at delays 1, 2, 3). Module k steps at

    lr_k = lr / (1 + c * delay(k))          (c = 0: the paper's update, unchanged)

with ``delay(k)`` its delay in the ring, in every step: also during the synchronous first steps,
which then train the stale modules at the step they will keep in the ring (measured better than
scaling from the switch on: docs/parity.md). Module K (delay 0) keeps ``lr``; so does the tied
embedding: it sits in module 1 (the stalest) *and* in module K, and most of its gradient is
module K's fresh output-projection gradient.

The rule is a pair of optimizer step hooks (:func:`delay_scaled_lr`): before the step each stale
param group's ``lr`` is multiplied, after it the group's own value is put back. So whatever
DeepSpeed LR schedule owns the groups' ``lr`` (WarmupLR and OneCycle set every group to the same
absolute value, which would undo a scaled ``lr`` given to the group), its wrappers (ZeRO, bf16)
step the scaled value, and the engine and :class:`ouroboros_ds.ring.reference.Reference` register
the same hooks, so they stay equal bit for bit.

The other functions here are alternatives the Reference screens and the engine does not run
(:func:`stale_momentum`, :func:`compensate`, :func:`two_timescale_lr`, ``delay_scaled_lr``'s
``cap``): each measured no better (docs/parity.md).
"""
from __future__ import annotations

import torch

from .warmup import FIRST_STEP


def lr_factor(delay: int, c: float) -> float:
    """What a module ``delay`` steps stale in the ring multiplies its lr by."""
    return 1.0 / (1.0 + c * delay)


def delay_scaled_lr(optimizer, c: float, cap: float | None = None) -> None:
    """Register the delay-scaled lr on a torch optimizer whose param groups carry ``FIRST_STEP``
    (the group's delay in the ring: the step its first gradient comes, :mod:`ouroboros_ds.ring.warmup`).

    ``cap`` (screening only, the Reference's ``stale_lr_cap``): instead of scaling the schedule's lr,
    cap it at ``cap x lr_factor``, so a stale module steps at the full schedule once its lr has
    decayed below that (measured worse: docs/parity.md)."""
    if c < 0:
        raise ValueError(f"stale_lr_scale: must be >= 0 (0 turns the mitigation off), got {c}")
    saved: dict = {}

    def before(opt, args, kwargs):
        for i, group in enumerate(opt.param_groups):
            if group[FIRST_STEP]:
                saved[i] = group["lr"]
                f = lr_factor(group[FIRST_STEP], c)
                group["lr"] = group["lr"] * f if cap is None else min(group["lr"], cap * f)

    def after(opt, args, kwargs):
        for i, lr in saved.items():
            opt.param_groups[i]["lr"] = lr
        saved.clear()

    if c:
        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)


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


def compensate(pairs, optimizers, kappa: float, kind: str = "adaptive") -> None:
    """Delay compensation (screening only, the Reference's ``compensation``; measured to change
    nothing: docs/parity.md): each stale gradient, taken at weights ``w_then``, corrected to first
    order towards the current weights, ``g + h (w - w_then)``, with a diagonal curvature estimate
    ``h`` from Adam's second moment ``v`` (bias-corrected) and the group's lr:

    - ``"adaptive"`` (DC-ASGD-a, Zheng et al. 2017): ``h = kappa g^2 / (sqrt(v) lr)``;
    - ``"flat"``: ``h = kappa sqrt(v) / lr``, i.e. lr x h / sqrt(v) = kappa for every weight.

    ``pairs``: (live parameter, the weights its gradient was taken at); before the clip and step."""
    if kind not in ("adaptive", "flat"):
        raise ValueError(f"compensation_kind: expected 'adaptive' or 'flat', got {kind!r}")
    where = {id(p): (opt, group) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    with torch.no_grad():
        for p, w_then in pairs:
            opt, group = where[id(p)]
            st = opt.state.get(p, {})
            if p.grad is None or "exp_avg_sq" not in st:
                continue  # no second moment yet: the module's first delayed step
            v = st["exp_avg_sq"] / (1 - group["betas"][1] ** float(st["step"]))
            if kind == "adaptive":
                h = kappa * p.grad * p.grad / ((v.sqrt() + group["eps"]) * group["lr"])
            else:
                h = kappa * v.sqrt() / group["lr"]
            p.grad.add_(h * (p - w_then))


def two_timescale_lr(optimizer, c: float, beta_slow: float) -> None:
    """The delay-scaled lr on the fast part of the update only (screening only, the Reference's
    ``stale_slow_ema``): a stale group steps ``f U + (1 - f) U_slow``, with ``U`` the optimizer's
    update at the schedule's lr, ``U_slow`` its EMA (``beta_slow``, from 0) and ``f`` the group's
    ``lr_factor``. Slowly turning directions (flat ones) come to the full lr, oscillating ones (the
    ones a delay destabilizes) keep ``f`` (``experiments/delay_stability.py``). Measured worse
    (docs/parity.md): the full-lr part lets the sharp directions back in."""
    if not (c > 0 and 0 < beta_slow < 1):
        raise ValueError(f"two_timescale_lr: needs stale_lr_scale > 0 and 0 < beta_slow < 1, got {c}, {beta_slow}")
    before: dict = {}
    slow: dict = {}

    def pre(opt, args, kwargs):
        for group in opt.param_groups:
            if group[FIRST_STEP]:
                for p in group["params"]:
                    before[p] = p.detach().clone()

    def post(opt, args, kwargs):
        with torch.no_grad():
            for group in opt.param_groups:
                f = lr_factor(group[FIRST_STEP], c)
                for p in group["params"] if group[FIRST_STEP] else ():
                    w0 = before.pop(p)
                    u = p - w0
                    if not u.any():
                        continue  # no gradient yet: the module does not move
                    s = slow.setdefault(p, torch.zeros_like(p))
                    s.mul_(beta_slow).add_(u, alpha=1 - beta_slow)
                    p.copy_(w0 + f * u + (1 - f) * s)

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)
