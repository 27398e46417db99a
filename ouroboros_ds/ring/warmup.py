"""The warm-up rule: the step at which each parameter first has a gradient, and the optimizer
param groups built from it, for the engine and the Reference alike.

Module k applies the gradient of batch ``t - delay(k)``, so it has no gradient during its first
``delay(k)`` steps and must not move then (not even by weight decay or Adam's step count). A
parameter's first gradient comes at ``delay(k)`` of the freshest module k whose forward uses it,
which is also the delay its gradient carries: on stage 0 the tied embedding ``wte`` is fresh from
step 0 (module K's output projection uses it), while the position embedding and module 1's blocks
wait G steps. A stage's parameters are grouped by that step (:data:`FIRST_STEP`), and the engine
keeps the optimizer off a group before it; the staleness mitigations scale per group.

A synchronous warm-up (``sync_steps`` = S) moves that pause: during steps 0..S-1 every module
backprops its own step's batch, and from step S on module k replays batch ``t - delay(k)``, whose
gradient it already applied while ``t - delay(k) < S``. So a group has no gradient during steps
S .. S + first step - 1 instead (:func:`replays_batch`, :func:`has_gradient`).
"""
from __future__ import annotations

import functools

from ..core import schedule as S
from ..core.schedule import replays_batch
from .utils import layer_modules

# Param-group key: the first step t at which the group's parameters have a gradient.
FIRST_STEP = "ouroboros_first_step"


def has_gradient(t: int, first_step: int, sync_steps: int = 0) -> bool:
    """Whether a group whose gradient first comes ``first_step`` steps into the ring has one at
    step t: always during the synchronous steps, then not until the ring delivers it."""
    # the gradient comes from the replay of the group's freshest module, delay ``first_step``
    return replays_batch(t - first_step, t < sync_steps, sync_steps)


def used_parameters(layer, tied_attrs: dict) -> list:
    """The parameters a layer's forward uses. A tied layer called through its ``forward_fn``
    (``functools.partial(forward_fn, tied module)``, the head) uses only its tied weights,
    ``tied_attrs[id(tied module)]`` (the ``TiedLayerSpec.tied_weight_attr`` names), as DeepSpeed's
    tied-gradient reduction also assumes."""
    if not isinstance(layer, functools.partial):
        return list(layer.parameters())
    tied = next(a for a in layer.args if hasattr(a, "parameters"))
    return [functools.reduce(getattr, attr.split("."), tied) for attr in tied_attrs[id(tied)]]


def first_gradient_groups(used: dict, owned: dict, num_stages: int) -> list[tuple[int, list]]:
    """A stage's parameters grouped by the step of their first gradient: ``[(step, params)]``,
    sorted by step, every parameter once.

    ``used``: {module k: the parameters its forward uses}; ``owned``: {module k: the parameters it
    holds}, in order; an owned parameter no forward uses goes with its module.
    """
    first: dict = {}  # id(param) -> first step with a gradient
    for k, params in used.items():
        for p in params:
            first[id(p)] = min(first.get(id(p), S.delay(k, num_stages)), S.delay(k, num_stages))
    groups: dict = {}
    seen: set = set()
    for k in sorted(owned):
        for p in owned[k]:
            if id(p) not in seen:
                seen.add(id(p))
                groups.setdefault(first.get(id(p), S.delay(k, num_stages)), []).append(p)
    return sorted(groups.items(), key=lambda g: g[0])


def stage_param_groups(module_layers: dict, num_stages: int, tied_attrs: dict) -> list[dict]:
    """One stage's trainable parameters as optimizer param groups, one per first-gradient step,
    each carrying that step under :data:`FIRST_STEP`. ``module_layers``: {module k: its layers}
    for the stage's modules; ``tied_attrs``: {id(tied module): its ``tied_weight_attr`` names}."""
    used = {k: [p for layer in layers for p in used_parameters(layer, tied_attrs)]
            for k, layers in module_layers.items()}
    owned = {k: [p for m in layer_modules(layers) for p in m.parameters() if p.requires_grad]
             for k, layers in module_layers.items()}
    return [{"params": params, FIRST_STEP: step} for step, params in first_gradient_groups(used, owned, num_stages)]


def ring_param_groups(module) -> list[dict]:
    """:func:`stage_param_groups` for this rank's stage of an ``OuroborosPipelineModule``."""
    tied_attrs = {id(m): module.tied_weight_attrs[key] for key, m in module.tied_modules.items()}
    return stage_param_groups({k: module.module_funcs[k] for k in module.local_modules}, module.num_stages,
                              tied_attrs)
