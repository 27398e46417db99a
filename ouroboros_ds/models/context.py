"""What makes a layer reproducible under any engine: seeded construction, keyed dropout, and
recurrent memory set by whoever runs the layer.

Every engine (the Ouroboros ring, DeepSpeed's stock 1F1B, the single-process
:class:`~ouroboros_ds.ring.reference.Reference`) builds the same layers and runs them inside the
contexts defined here, so one seed gives them identical weights, identical dropout masks and
identical memories, whatever their stage boundaries:

- **Seeded init per layer** (:func:`seeded_init`): layer i is built under its own seed whatever
  stage builds it, without touching the caller's RNG.
- **Keyed dropout** (:func:`dropout_key`, read by layers through :func:`keyed_rng`): a layer's
  masks depend only on ``(seed, batch, micro-batch, layer)``. Features replay is exact because
  the replay runs under the forward's key.
- **Recurrent memory** (:func:`recurrent_memory`): the layers keep no state; the runner says
  which memory they read and collects the one they write, so the ring can stash the memory a
  forward used next to its input and give the replay exactly that memory.

No other module of the package is imported here: models, engines and the Reference all import
this one.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

# ------------------------------------------------------------------ seeded construction
@contextlib.contextmanager
def seeded_init(seed: int | None):
    """Build under ``seed`` without touching the caller's RNG (no-op for ``None``)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def init_weights(module: nn.Module, cfg) -> None:
    """GPT-2's init: N(0, ``cfg.initializer_range``), residual projections (``c_proj``) scaled by
    1/sqrt(2 n_layer), zero biases, unit LayerNorm gains."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "ln" in name:
            nn.init.ones_(p)
        else:
            std = cfg.initializer_range
            if name.endswith("c_proj.weight"):
                std /= math.sqrt(2 * cfg.n_layer)
            nn.init.normal_(p, mean=0.0, std=std)


# ------------------------------------------------------------------ keyed dropout
_KEY: list = [None]


@contextlib.contextmanager
def dropout_key(seed: int, batch: int, micro_batch: int):
    """Dropout in the layers run inside this context depends only on these three and the layer."""
    prev, _KEY[0] = _KEY[0], (seed, batch, micro_batch)
    try:
        yield
    finally:
        _KEY[0] = prev


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@contextlib.contextmanager
def keyed_rng(layer: nn.Module, device: torch.device):
    """Inside a layer's forward: seed the RNG from the current :func:`dropout_key` and the layer's
    ``layer_idx`` (in training mode under a key; otherwise the RNG is left as it is)."""
    key = _KEY[0]
    if not layer.training or key is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(_mix(*key, layer.layer_idx))
        yield


# ------------------------------------------------------------------ recurrent memory
# (memories to read {layer_idx: tensor}, dict the layers write their next memory into) or None
_MEM: list = [None]


@contextlib.contextmanager
def recurrent_memory(read: dict | None):
    """Run layers with memory: they read theirs from ``read`` (``{layer_idx: [B, m, d] tensor}``,
    missing = no memory yet) and write their next memory into the dict this yields."""
    written: dict = {}
    prev, _MEM[0] = _MEM[0], (read or {}, written)
    try:
        yield written
    finally:
        _MEM[0] = prev


def memory_context():
    """``(read, written)`` of the enclosing :func:`recurrent_memory`, or ``None`` outside one."""
    return _MEM[0]
