"""Memory-bounded replay: which in-flight micro-batches keep their graph, under a budget.

Stash replay (:mod:`ouroboros_ds.ring.stash`) takes module k's delayed gradient at the weights of the
forward, through a weight snapshot. Keeping every forward's graph costs ``(K - k + 1) x M`` graphs
per stage at the peak (3-8x stock 1F1B's activations). A :class:`ReplayPlan` keeps the graph of
only the first ``kept[k]`` micro-batches of each batch; the others forward without a graph and
their replay recomputes the forward **through the same snapshot** (the forward's weights, the
forward's dropout key). The update is therefore the stash update for every plan, bit for bit: the
plan trades an extra forward per recomputed micro-batch for memory, and changes nothing else.

Peak activation memory of the stage holding module k < K (``d = K - k`` batches in flight between
steps; per micro-batch: ``a`` bytes of graph, ``x`` of stashed input; ``w`` the module's snapshot),
for the engine's order (all forwards, then the replays in micro-batch order, kept ones first)::

    peak_k = (d + 1) (w + M x) + max((d + 1) n a,  d n a + a  if n < M)
    stage 0 also runs module K's loss (graph a_K) after module 1's replays:  d n a + d (w + M x) + a_K

:func:`plan_for_budget` picks, per stage, the largest ``n`` whose peak fits the budget.
:func:`parse_budget` reads the user's option: ``1f1b`` (the default: stock 1F1B's peak on its
busiest stage, what a user's devices already hold), ``1.5x`` (times that), ``300MB``, or ``inf``.

The planner's arithmetic is pure Python; :func:`measure_layers` (torch) measures its per-layer
inputs on one micro-batch, :func:`onef1b_parts` asks DeepSpeed for 1F1B's partition, and
:func:`choose_partition` searches ring partitions with the plan (``train.py --partition budget``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.schedule import delay, num_modules, stage_of

MB = 2 ** 20


@dataclass(frozen=True)
class ReplayPlan:
    """``kept[k]``: how many micro-batches of each batch (the first ones) keep their graph in
    module k < K; the rest are recomputed at the replay through the batch's weight snapshot.
    A module missing from ``kept`` keeps every graph (plain stash replay)."""

    kept: dict

    def keeps(self, k: int, mb: int) -> bool:
        return mb < self.kept.get(k, mb + 1)

    def __str__(self) -> str:
        return " ".join(f"{k}:{n}" for k, n in sorted(self.kept.items()))

    @classmethod
    def parse(cls, text: str) -> "ReplayPlan":
        """Read back ``str(plan)``: ``"1:2 2:0"``."""
        try:
            return cls({int(k): int(n) for k, n in (item.split(":") for item in text.split())})
        except ValueError:
            raise ValueError(f"replay plan {text!r}: expected 'k:n' pairs, e.g. '1:2 2:0'") from None


@dataclass(frozen=True)
class ModuleMemory:
    """Bytes of one module k < K: ``graph`` and ``inputs`` per micro-batch, ``snapshot`` per batch."""

    graph: float
    inputs: float = 0.0
    snapshot: float = 0.0


def module_peak(k: int, G: int, M: int, mem: ModuleMemory, n: int) -> float:
    """Peak bytes module k holds during a step with ``n`` kept graphs per batch (formula above)."""
    d = delay(k, G)
    held = (d + 1) * (mem.snapshot + M * mem.inputs)
    graphs = (d + 1) * n * mem.graph
    if n < M:
        graphs = max(graphs, d * n * mem.graph + mem.graph)
    return held + graphs


def stage_peaks(G: int, M: int, mems: dict, loss_graph: float, plan: ReplayPlan) -> list[float]:
    """Per stage, the peak activation bytes of ``plan`` (``mems[k]``: :class:`ModuleMemory` of
    module k < K; ``loss_graph``: module K's graph of one micro-batch, including the head)."""
    K = num_modules(G)
    out = [0.0] * G
    for k in range(1, K):
        n = min(plan.kept.get(k, M), M)
        s = stage_of(k, G)
        out[s] = max(out[s], module_peak(k, G, M, mems[k], n))
    m1, n1, d1 = mems[1], min(plan.kept.get(1, M), M), delay(1, G)
    out[0] = max(out[0], d1 * n1 * m1.graph + d1 * (m1.snapshot + M * m1.inputs) + loss_graph)
    return out


def plan_for_budget(G: int, M: int, mems: dict, loss_graph: float, budget: float) -> ReplayPlan:
    """Per module k < K, the most kept graphs whose stage peak stays within ``budget`` bytes
    (0 when even recomputing everything does not fit: the snapshots and inputs alone are over)."""
    kept = {}
    for k in range(1, num_modules(G)):
        best = 0
        for n in range(M, -1, -1):
            trial = ReplayPlan({**kept, k: n})
            if stage_peaks(G, M, mems, loss_graph, trial)[stage_of(k, G)] <= budget:
                best = n
                break
        kept[k] = best
    return ReplayPlan(kept)


def synchronous_kept(blocks_per_module: list[int], micro_batches: int) -> dict:
    """Per module k < K, how many micro-batches of a synchronous step (the ``sync_steps`` warm-up)
    keep the graph of their forward, so that the step does stock 1F1B's work within its memory.

    A synchronous step's error gradients come back within the step, at the weights of the
    forward, so the replay can backprop the forward's own graph instead of recomputing it: the
    same update, bit for bit, without the extra forward. The step runs every forward before the
    replays, so the kept graphs are alive at once; module k keeps the first n micro-batches' (the
    others are recomputed at their replay, after the kept ones are released). Counted in blocks
    (identical blocks save identical bytes): stock 1F1B's busiest stage holds min(M, G)
    micro-batches of ceil(L / G) blocks; module k keeps the most n with n x blocks(k) within that,
    and on stage 0 module K's loss graph (blocks(K), alive during each loss) comes on top of module
    1's kept graphs. A module without blocks keeps every graph (the embedding's is a few bytes)."""
    K, M = len(blocks_per_module), micro_batches
    G, L = K - 1, sum(blocks_per_module)
    budget = min(M, G) * -(-L // G)
    kept = {}
    for k in range(1, K):
        n = blocks_per_module[k - 1]
        room = budget - (blocks_per_module[-1] if stage_of(k, G) == 0 else 0)
        kept[k] = M if n == 0 else max(0, min(M, room // n))
    return kept


def synchronous_peaks(G: int, M: int, mems: dict, loss_graph: float, kept: dict) -> list[float]:
    """Per stage, the peak activation bytes of a synchronous step whose module k keeps ``kept[k]``
    graphs (:func:`synchronous_kept`): the kept graphs and the step's stashed inputs, all alive
    after the forwards; on stage 0 module K's loss graph on top."""
    out = [0.0] * G
    for k in range(1, num_modules(G)):
        out[stage_of(k, G)] += kept.get(k, M) * mems[k].graph + M * mems[k].inputs
    out[0] += loss_graph
    return out


def onef1b_peaks(G: int, M: int, stage_graph: list[float]) -> list[float]:
    """Stock 1F1B (``TrainSchedule``): stage s keeps ``min(G - s, M)`` micro-batch graphs
    (``num_pipe_buffers``) of its own layers (``stage_graph[s]`` bytes each)."""
    return [min(G - s, M) * a for s, a in enumerate(stage_graph)]


def parse_budget(text) -> tuple[str, float]:
    """``--activation-budget``: ``("rel", r)`` for ``1f1b`` / ``Rx`` (R times stock 1F1B's peak on its
    busiest stage), ``("abs", bytes)`` for ``NMB`` / ``NGB``, ``("abs", inf)`` for ``inf``."""
    s = str(text).strip().lower()
    if s in ("1f1b", "1x"):
        return "rel", 1.0
    if s in ("inf", "none", "unbounded"):
        return "abs", float("inf")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(x|mb|gb)", s)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--activation-budget {text!r}: expected '1f1b' (stock 1F1B's peak activation memory on its "
                         "busiest stage, the default), a multiple of it like '1.5x', a size like '300MB' or '2GB', "
                         "or 'inf' (keep every graph)")
    v, unit = float(m.group(1)), m.group(2)
    return ("rel", v) if unit == "x" else ("abs", v * (MB if unit == "mb" else 1024 * MB))


def budget_bytes(text, onef1b_peak: float) -> float:
    kind, v = parse_budget(text)
    return v * onef1b_peak if kind == "rel" else v


# ------------------------------------------------------------------ measured inputs (torch)
@dataclass(frozen=True)
class LayerCost:
    """One layer on one micro-batch: bytes autograd saves for its backward (its graph), bytes of
    its input and of its parameters."""

    graph: int
    inputs: int
    params: int


def measure_layers(layers, sample) -> list[LayerCost]:
    """Run ``sample`` (one micro-batch of token ids) through ``layers`` once, with a graph, and
    count per layer what :class:`ouroboros_ds.ring.saved_bytes.SavedBytes` sees (parameters excluded)."""
    import torch

    from .saved_bytes import SavedBytes
    from .utils import layer_modules

    out, h, seen = [], sample, set()
    for layer in layers:
        params = [p for m in layer_modules([layer]) for p in m.parameters()]
        nparam = sum(p.numel() * p.element_size() for p in params if id(p) not in seen)
        seen |= {id(p) for p in params}
        sb = SavedBytes()
        sb.exclude = {p.untyped_storage().data_ptr() for p in params}
        x = h.detach().requires_grad_() if h.is_floating_point() else h
        with torch.enable_grad(), sb.hooks():
            y = layer(x)
        out.append(LayerCost(graph=sb.peak, inputs=h.numel() * h.element_size(), params=nparam))
        h = y.detach()
        del y
    return out


def ring_memory(costs: list[LayerCost], bounds: list[tuple[int, int]]) -> tuple[dict, float]:
    """Per-module :class:`ModuleMemory` of modules 1..K-1 and module K's graph bytes, from per-layer
    costs and the ring's layer ranges (``module_bounds``)."""
    mems = {}
    for k, (a, b) in enumerate(bounds[:-1], start=1):
        part = costs[a:b]
        mems[k] = ModuleMemory(graph=sum(c.graph for c in part), inputs=part[0].inputs if part else 0,
                               snapshot=sum(c.params for c in part))
    a, b = bounds[-1]
    return mems, float(sum(c.graph for c in costs[a:b]))


def onef1b_stage_graphs(costs: list[LayerCost], parts: list[int]) -> list[float]:
    """Per stage of a stock ``PipelineModule`` (``parts``: its partition boundaries) the graph bytes
    of one micro-batch."""
    return [float(sum(c.graph for c in costs[parts[s]:parts[s + 1]])) for s in range(len(parts) - 1)]


def onef1b_parts(num_layers: int, block_indices: list[int], stages: int) -> list[int]:
    """The partition DeepSpeed's ``PipelineModule(partition_method="type:Block")`` makes."""
    from deepspeed.runtime import utils as ds_utils

    weights = [1 if i in set(block_indices) else 0 for i in range(num_layers)]
    return ds_utils.partition_balanced(weights=weights, num_parts=stages)


@dataclass
class BudgetPlan:
    """What :func:`plan_replay` decided, with the numbers behind it (bytes)."""

    plan: ReplayPlan
    budget: float
    onef1b_peaks: list
    planned_peaks: list

    def describe(self) -> str:
        mb = lambda v: f"{v / MB:.1f}"  # noqa: E731
        return (f"replay plan (kept graphs per module) {self.plan}; budget {mb(self.budget)} MB per stage "
                f"(stock 1F1B's peak per stage {' / '.join(map(mb, self.onef1b_peaks))} MB); planned peak "
                f"{' / '.join(map(mb, self.planned_peaks))} MB")


def plan_replay(layers, block_indices, sample, stages: int, micro_batches: int, bounds, budget="1f1b") -> BudgetPlan:
    """The replay plan of a ring with layer ranges ``bounds`` (``module_bounds``) under ``budget``
    (:func:`parse_budget`), from per-layer costs measured on ``sample`` (one micro-batch)."""
    costs = measure_layers(layers, sample)
    mems, loss_graph = ring_memory(costs, bounds)
    ref = onef1b_peaks(stages, micro_batches,
                       onef1b_stage_graphs(costs, onef1b_parts(len(layers), block_indices, stages)))
    b = budget_bytes(budget, max(ref))
    plan = plan_for_budget(stages, micro_batches, mems, loss_graph, b)
    return BudgetPlan(plan, b, ref, stage_peaks(stages, micro_batches, mems, loss_graph, plan))


def _partitions(num_blocks: int, stages: int):
    """Candidate block counts of modules 1..K: stage 0's two modules split every way; stages
    1..G-1 share the rest evenly (G = 2: every split)."""
    G, L = stages, num_blocks
    for b0 in range(0, L - (G - 1) + 1):
        rest = [(L - b0) // (G - 1)] * (G - 1)
        for i in range((L - b0) % (G - 1)):
            rest[G - 2 - i] += 1
        if min(rest) < 1:
            continue
        for m1 in range(b0 + 1):
            yield [m1] + rest + [b0 - m1]


def plan_partition(layers, block_indices, sample, stages: int, micro_batches: int, flops: dict,
                   budget="1f1b") -> tuple[list[int], BudgetPlan]:
    """The ring partition and replay plan that minimise the most loaded stage's modelled work
    (``flops``: :func:`ouroboros_ds.core.partition.layer_costs`) under ``budget``, from per-layer costs
    measured on ``sample`` (one micro-batch); see :func:`choose_partition`."""
    return choose_partition(measure_layers(layers, sample), block_indices, stages, micro_batches, flops, budget)


def choose_partition(costs: list[LayerCost], block_indices, stages: int, micro_batches: int, flops: dict,
                     budget="1f1b") -> tuple[list[int], BudgetPlan]:
    """Among the candidate ring partitions, the one whose replay plan (:func:`plan_for_budget`)
    minimises the most loaded stage's modelled work (a kept micro-batch costs forward + backward =
    3 forward units per block, a recomputed one 4; module K 3; ``flops["block"]``, ``flops["head"]``
    per unit) with a planned peak within ``budget``; when none fits, the one with the lowest peak."""
    from ..core.partition import ring_partition

    G, M = stages, micro_batches
    if G < 2:
        raise ValueError("the memory-bounded replay needs a ring of G >= 2 stages")
    ref = onef1b_peaks(G, M, onef1b_stage_graphs(costs, onef1b_parts(len(costs), block_indices, G)))
    b = budget_bytes(budget, max(ref))
    best = None
    for bpm in _partitions(len(block_indices), G):
        bounds = ring_partition(len(costs), block_indices, G, bpm)
        mems, loss_graph = ring_memory(costs, bounds)
        plan = plan_for_budget(G, M, mems, loss_graph, b)
        peaks = stage_peaks(G, M, mems, loss_graph, plan)
        work = [0.0] * G
        for k, n in enumerate(bpm, start=1):
            units = 3 if k == G + 1 else 3 + (M - min(plan.kept.get(k, M), M)) / M
            work[stage_of(k, G)] += n * flops["block"] * units
        work[0] += flops["head"] * 3
        key = (max(peaks) > b, max(work) if max(peaks) <= b else max(peaks), max(peaks))
        if best is None or key < best[0]:
            best = (key, bpm, BudgetPlan(plan, b, ref, peaks))
    return best[1], best[2]
