"""How the ring's modules share the model's blocks: pure arithmetic, no torch.

:func:`ring_partition` turns block counts per module into layer ranges; :func:`balanced_blocks_per_module`
chooses the counts that minimise the busiest stage's modelled work (:func:`layer_costs`,
:func:`stage_costs_of`), for the engine, the Reference, the memory plan and the tools alike.
"""
from __future__ import annotations

from .schedule import num_modules, stage_of


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
