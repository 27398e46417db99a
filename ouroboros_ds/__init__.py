"""ouroboros-ds: Ouroboros delayed-gradient pipeline training on DeepSpeed's pipeline engine.

The public API, for a training loop of your own (``train.py`` is one such loop)::

    import ouroboros_ds as od
    engine, *_ = od.initialize(model=od.OuroborosPipelineModule(...), config="ds_configs/ouroboros.json")

Names are imported on first use, so the schedule tools (``ouroboros_ds.schedule``,
``ouroboros_ds.validate``, ``ouroboros_ds.simulate``) stay free of torch and DeepSpeed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # engines and start-up
    "initialize": "launch",
    "OuroborosEngine": "engine",
    "OuroborosPipelineModule": "module",
    "KeyedPipelineEngine": "baseline",
    "Reference": "reference",
    # models
    "gpt2_config": "models",
    "gpt2_layer_specs": "models",
    "lm_loss": "models",
    "LayerPlan": "models",
    "family_config": "models_hf",  # Llama, Mistral, Qwen2/3, Gemma, ... from a transformers config
    "family_layer_specs": "models_hf",
    # data
    "load_token_data": "data",
    "BatchStream": "data",
    "eval_batches": "data",
    # the schedule as data
    "ouroboros_schedule": "schedule",
    "validate": "validate",
    "simulate": "simulate",
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
