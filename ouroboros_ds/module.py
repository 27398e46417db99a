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

from .schedule import modules_of, num_modules, stage_of
from .utils import unique_parameters


def ring_partition(num_layers: int, block_indices: list[int], stages: int,
                   blocks_per_module: list[int] | None = None) -> list[tuple[int, int]]:
    """Layer ranges ``[(start, stop)]`` of modules 1..K over a layer list.

    ``block_indices`` are the positions of the Transformer blocks (contiguous); layers before
    them go to module 1, layers after them to module K. ``blocks_per_module`` gives the block
    count of each module explicitly; by default it follows the authors' code: each stage gets
    ``L // G`` blocks (the remainder goes to the last stages, since stage 0 also carries the
    embedding, head and loss), and stage 0's share is split half before (module 1), half after
    (module K).
    """
    G, K, L = stages, num_modules(stages), len(block_indices)
    if L and block_indices != list(range(block_indices[0], block_indices[0] + L)):
        raise ValueError("the Transformer blocks must be contiguous in the layer list")
    if blocks_per_module is None:
        if G > L:
            raise ValueError(f"pipeline-parallel size G={G} exceeds the model's {L} blocks: stages 1..G-1 "
                             f"need a block each; use --pipeline-parallel-size <= {L} or a deeper --model")
        per_stage = [L // G] * G
        for s in range(L % G):
            per_stage[G - 1 - s] += 1
        first = per_stage[0] // 2
        blocks_per_module = [first] + per_stage[1:] + [per_stage[0] - first]
    blocks_per_module = list(blocks_per_module)
    if len(blocks_per_module) != K or sum(blocks_per_module) != L or min(blocks_per_module) < 0:
        raise ValueError(f"blocks_per_module={blocks_per_module} must list K={K} non-negative counts "
                         f"(modules 1..K) summing to the model's {L} blocks")
    if G > 1 and min(blocks_per_module[1:-1]) < 1:
        raise ValueError(f"blocks_per_module={blocks_per_module}: modules 2..K-1 (stages 1..G-1) need at least one block")
    first_block = block_indices[0] if L else num_layers
    bounds, start = [], 0
    stop = first_block
    for k, n in enumerate(blocks_per_module, start=1):
        stop += n
        if k == K:
            stop = num_layers
        bounds.append((start, stop))
        start = stop
    return bounds


def layer_costs(n_embd: int, vocab_size: int, seq_len: int) -> dict:
    """Modelled forward FLOPs per token of the layer kinds (the cost model of the balanced partition):
    a block 24 d^2 (QKV, projection, MLP) + 4 T d (attention scores and values), the tied head
    2 d V plus ~5 V for softmax cross entropy; the embedding is a lookup (~0)."""
    d, V, T = n_embd, vocab_size, seq_len
    return {"block": 24 * d * d + 4 * T * d, "head": 2 * d * V + 5 * V, "embed": 0}


# Work of one micro-batch in forward units: backward = 2 forwards. A delayed module (k < K) does its
# forward and its replay (recompute "recompute": 1 + 1 + 2; "stash": 1 + 2); module K does forward,
# loss and backward at once (1 + 2).
_WORK = {"recompute": 4, "stash": 3, "fresh": 3}


def stage_costs_of(blocks_per_module: list[int], costs: dict, replay: str = "recompute") -> list[float]:
    """Modelled work per micro-batch of each stage (FLOPs per token x forward units)."""
    G = len(blocks_per_module) - 1
    out = [0.0] * G
    for k, n in enumerate(blocks_per_module, start=1):
        out[stage_of(k, G)] += n * costs["block"] * (_WORK["fresh"] if k == G + 1 else _WORK[replay])
    out[0] += costs["head"] * _WORK["fresh"] + costs["embed"] * _WORK[replay]
    return out


def balanced_blocks_per_module(num_blocks: int, stages: int, costs: dict, replay: str = "recompute",
                               fresh: bool = False) -> list[int]:
    """The block counts of modules 1..K that minimise the most loaded stage's modelled work
    (:func:`stage_costs_of`): stage 0 carries the head and the loss on top of its blocks, so it
    gets fewer. Stages 1..G-1 share the other blocks evenly (extra ones to the last stages); among
    stage 0's own splits the cheapest wins (in recompute mode a block costs less in module K, which
    is not replayed), ties broken towards the authors' half/half split, or with ``fresh`` towards
    the fewest blocks in module 1: stage 0 does the same work, but its blocks then sit in module K
    (fresh gradients) instead of module 1 (the stalest, delay G) (``train.py --partition fresh``)."""
    G, L = stages, num_blocks
    if G == 1:
        candidates = [[m1, L - m1] for m1 in range(L + 1)]
    else:
        if G - 1 > L:
            raise ValueError(f"pipeline-parallel size G={G} exceeds the model's {L} blocks")
        candidates = []
        for b0 in range(0, L - (G - 1) + 1):
            rest = [(L - b0) // (G - 1)] * (G - 1)
            for i in range((L - b0) % (G - 1)):
                rest[G - 2 - i] += 1
            candidates += [[m1] + rest + [b0 - m1] for m1 in range(b0 + 1)]

    def key(bpm):
        tie = bpm[0] if fresh else abs(bpm[0] - (bpm[0] + bpm[-1]) // 2)
        return (max(stage_costs_of(bpm, costs, replay)), tie)
    return min(candidates, key=key)


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
        """One line per local module: its layers and parameter count (for the start-up summary);
        with ``stage_costs`` set (e.g. by train.py's balanced partition), the modelled per-stage work."""
        lines = []
        if getattr(self, "partition_note", None):
            lines.append(self.partition_note)
        for k in self.local_modules:
            start, stop = self.module_bounds[k - 1]
            n = sum(p.numel() for p in self.module_parameters(k))
            lines.append(f"module {k}: layers [{start}, {stop}) params {n:,}")
        return lines
