"""How DeepSpeed's optimizer wrappers see one ring stage.

The engine keeps DeepSpeed's optimizers and wrappers (torch Adam/AdamW, ZeRO-1, bf16) as they are
and changes only what they are given:

- one param group per first-gradient step (:func:`ouroboros_ds.ring.warmup.ring_param_groups`) and a
  step pre-hook (:func:`warmup_hook`) that keeps a group in warm-up still. ZeRO and
  BF16_Optimizer turn a missing gradient into zeros, and Adam would then move the module
  (weight decay, step count) before its first delayed gradient; with the gradient set to None
  the torch optimizer skips it, as it skips a parameter without gradient in the plain fp32 path
  and in the Reference;
- a grid whose model-parallel group is this stage (:class:`StageGrid`), so the gradient norm a
  wrapper clips by is the stage's, with no cross-stage collective;
- the threshold it clips at (:func:`stage_clip_threshold`).
"""
from __future__ import annotations

import math

import torch

from .config import STAGE_CLIPS
from .warmup import FIRST_STEP, has_gradient, ring_param_groups


def ring_optimizer_groups(module, model_parameters) -> list[dict]:
    """The param groups to build the stage's optimizer from: :func:`ring_param_groups` when the
    caller passes None or this stage's plain parameters; the caller's groups when each carries
    ``FIRST_STEP`` (e.g. :func:`ouroboros_ds.ring.warmup.ring_param_groups`)."""
    if model_parameters is None or all(torch.is_tensor(p) for p in model_parameters):
        given = None if model_parameters is None else {id(p) for p in model_parameters}
        groups = ring_param_groups(module)
        if given is not None and given != {id(p) for g in groups for p in g["params"]}:
            raise ValueError("model_parameters: pass this stage's trainable parameters (module.parameters()) "
                             "or None; the engine groups them by first-gradient step")
        return groups
    if not all(isinstance(g, dict) and FIRST_STEP in g for g in model_parameters):
        raise ValueError(f"model_parameters: param groups need the key {FIRST_STEP!r} (the first step their "
                         "parameters have a gradient); pass plain parameters to get ring_param_groups(module)")
    return model_parameters


def warmup_hook(current_step, sync_steps: int = 0):
    """A torch optimizer step pre-hook: no gradient for a group whose first-gradient step is
    still ahead of ``current_step()`` (the step t being run), counted from the end of the
    ``sync_steps`` synchronous steps (:func:`ouroboros_ds.ring.warmup.has_gradient`)."""
    def hook(optimizer, args, kwargs):
        t = current_step()
        for group in optimizer.param_groups:
            if not has_gradient(t, group[FIRST_STEP], sync_steps):
                for p in group["params"]:
                    p.grad = None
    return hook


def stage_clip_threshold(gradient_clipping: float, stages: int, mode: str) -> float:
    """The norm each of the G stages clips its own gradient at.

    DeepSpeed's ``gradient_clipping`` c bounds the whole model's gradient norm (one collective over
    all stages). The ring clips each stage by its own norm, with no collective. 'whole' clips each
    at c (the paper's rule): the model's norm may then reach c sqrt(G), and a stage whose norm is
    small is never scaled down with the others. 'split' clips each at c / sqrt(G): the model's norm
    never exceeds c, as with DeepSpeed's clip, and while every stage is clipped the update is the
    global clip's up to how the norm is shared between stages (docs/parity.md measures both)."""
    if mode not in STAGE_CLIPS:  # a RingConfig has checked it; a direct caller may not have
        raise ValueError(f"stage_clip: expected one of {STAGE_CLIPS}, got {mode!r}")
    return gradient_clipping / math.sqrt(stages) if mode == "split" else gradient_clipping


class StageGrid:
    """DeepSpeed's pipe grid as the optimizer wrappers (ZeRO, BF16_Optimizer) see it.

    They all-reduce the gradient norm (and fp16's overflow flag) over ``get_model_parallel_group()``,
    which for a pipeline is every stage of the replica: a cross-stage collective each step, and a
    global clip where Ouroboros clips per stage. Here the model-parallel group is this stage's
    tensor-slice group (this rank alone, no tensor parallelism), so the norm a wrapper clips by is
    the stage's own, reduced over the data-parallel group only. Everything else is the grid's."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def get_model_parallel_group(self):
        return self._grid.get_slice_parallel_group()

    def get_model_parallel_world_size(self):
        return self._grid.get_slice_parallel_world_size()

    def get_model_parallel_rank(self):
        return self._grid.get_slice_parallel_rank()
