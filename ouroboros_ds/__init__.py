"""ouroboros-ds: Ouroboros delayed-gradient pipeline training on DeepSpeed's pipeline engine.

The public API, for a training loop of your own (``train.py`` is one such loop)::

    import ouroboros_ds as od
    engine, *_ = od.initialize(model=od.OuroborosPipelineModule(...), config="ds_configs/ouroboros.json")

Names are imported on first use, so the schedule tools (``ouroboros_ds.core.schedule``,
``ouroboros_ds.core.validate``, ``ouroboros_ds.core.simulate``) stay free of torch and DeepSpeed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # engines and start-up
    "initialize": "pipe.launch",
    "RingConfig": "ring.config",  # the ring's options, defaults and checks
    "OuroborosEngine": "pipe.engine",
    "OuroborosPipelineModule": "pipe.module",
    "KeyedPipelineEngine": "pipe.baseline",
    "Reference": "ring.reference",
    # models
    "gpt2_config": "models.gpt2",
    "gpt2_layer_specs": "models.gpt2",
    "lm_loss": "models.gpt2",
    "LayerPlan": "models.gpt2",
    "family_config": "models.families",  # Llama, Mistral, Qwen2/3, Gemma, ... from a transformers config
    "family_layer_specs": "models.families",
    # data
    "load_token_data": "train.data",
    "BatchStream": "train.data",
    "eval_batches": "train.data",
    # the schedule as data
    "ouroboros_schedule": "core.schedule",
    "validate": "core.validate",
    "simulate": "core.simulate",
}

# public name -> the defining module's own name for it
_RENAMED = {"family_layer_specs": "layer_specs"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ouroboros_ds' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
