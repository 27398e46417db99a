"""The ring placement as a DeepSpeed ``PipelineModule``.

``G`` stages hold ``K = G + 1`` modules: stage 0 builds module 1 (the embedding and the first
blocks) and module K (the last blocks, the final norm, the tied head), stage s builds module
s + 1. The tied embedding is therefore one parameter on stage 0: no tied-weight all-reduce.
The layout follows DeepSpeed's ``DualPipeVModule`` (two layer ranges on one rank, one of them
active at a time) so DeepSpeed's per-layer checkpoint files work unchanged.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import PipelineModule

from ..core.partition import ring_partition
from ..core.schedule import modules_of, stage_of
from ..ring.utils import unique_parameters


class TiedSyncWithoutGraph:
    """``PipelineModule`` mixin: tied weights synchronized without autograd history.

    DeepSpeed's ``_synchronize_tied_weights`` (at construction and after a checkpoint load)
    broadcasts each tied parameter itself, not its ``.data``, with grad mode on. torch then records
    the in-place ``c10d::broadcast_`` in the parameter's history, and every backward through the
    tied head warns that the op has no autograd kernel ("may lead to silently incorrect
    behavior"). The broadcast only copies values between the stages that hold the tied layer, so
    running it under ``no_grad`` moves the same values and leaves nothing in the graph."""

    def _synchronize_tied_weights(self):
        with torch.no_grad():
            super()._synchronize_tied_weights()


class OuroborosPipelineModule(TiedSyncWithoutGraph, PipelineModule):
    """A ``PipelineModule`` cut into the Ouroboros ring.

    Args beyond ``PipelineModule``'s:
        block_indices: positions of the Transformer blocks in ``layers`` (for the partition).
        blocks_per_module: explicit block count of modules 1..K (default: the authors' rule).
    ``loss_fn(outputs, labels)`` is computed by module K on stage 0.
    """

    def __init__(self, layers, num_stages=None, topology=None, loss_fn=None, block_indices=None,
                 blocks_per_module=None, **kwargs):
        self._block_indices = list(block_indices) if block_indices is not None else None
        self._blocks_per_module = blocks_per_module
        super().__init__(layers, num_stages=num_stages, topology=topology, loss_fn=loss_fn,
                         partition_method="ouroboros", **kwargs)

    # Overridden: DeepSpeed cuts the layers into G contiguous parts; the ring cuts them into K
    # and gives stage 0 two of them.
    def _partition_layers(self, method="ouroboros"):
        G = self.num_stages
        stage = self._topo.get_coord(self.global_rank).pipe
        blocks = self._block_indices if self._block_indices is not None else list(range(1, len(self._layer_specs) - 1))
        self.block_indices = blocks
        self.module_bounds = ring_partition(len(self._layer_specs), blocks, G, self._blocks_per_module)
        self.parts = [b[0] for b in self.module_bounds] + [len(self._layer_specs)]
        self.local_modules = modules_of(stage, G)
        self._set_bounds(*self.module_bounds[self.local_modules[0] - 1])

    # Overridden: build each local module's layer range separately (as DualPipeVModule does).
    def _build(self):
        self.module_funcs = {}
        for k in self.local_modules:
            self._set_bounds(*self.module_bounds[k - 1])
            self.forward_funcs = []
            super()._build()
            self.module_funcs[k] = self.forward_funcs
        self.activate_module(self.local_modules[0])

    def blocks_per_module(self) -> list[int]:
        """Transformer blocks in each of modules 1..K."""
        return [sum(1 for i in self.block_indices if start <= i < stop) for start, stop in self.module_bounds]

    def stage_owner(self, layer_idx):
        for k, (start, stop) in enumerate(self.module_bounds, start=1):
            if start <= layer_idx < stop:
                return stage_of(k, self.num_stages)
        raise RuntimeError(f"layer {layer_idx} is in no module: bounds={self.module_bounds}")

    def activate_module(self, k: int) -> None:
        """Expose module k's layers as ``forward_funcs`` (for DeepSpeed's per-layer save/load)."""
        self.active_module = k
        self.forward_funcs = self.module_funcs[k]
        self._set_bounds(*self.module_bounds[k - 1])

    def forward_module(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Run module k's layers on x (no activation checkpointing: the replay is the recompute)."""
        for layer in self.module_funcs[k]:
            x = layer(x)
        return x

    def module_parameters(self, k: int) -> list[torch.nn.Parameter]:
        """Module k's parameters, once each (the tied embedding appears in modules 1 and K)."""
        return unique_parameters(self.module_funcs[k])

    def forward(self, forward_input):
        return self.forward_module(self.active_module, forward_input)

    def save_state_dict(self, *args, **kwargs):
        for k in self.local_modules:
            self.activate_module(k)
            super().save_state_dict(*args, **kwargs)

    def load_state_dir(self, *args, **kwargs):
        for k in self.local_modules:
            self.activate_module(k)
            super().load_state_dir(*args, **kwargs)

    def describe(self) -> list[str]:
        """One line per local module: its layers and parameter count (for the start-up summary)."""
        lines = []
        for k in self.local_modules:
            start, stop = self.module_bounds[k - 1]
            n = sum(p.numel() for p in self.module_parameters(k))
            lines.append(f"module {k}: layers [{start}, {stop}) params {n:,}")
        return lines
