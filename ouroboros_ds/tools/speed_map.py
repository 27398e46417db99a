"""The (G, M) map: which schedule is fastest, at what activation memory, for G stages and M
micro-batches. Simulated from measured per-block costs, for every schedule on its own
instruction lists: Ouroboros (features replay, stash, and the memory-bounded plan) through
:func:`ouroboros_ds.core.simulate.simulate`, DeepSpeed's 1F1B (``TrainSchedule``, with and without
activation checkpointing) and DualPipeV (``DualPipeVSchedule``) through :mod:`ouroboros_ds.tools.rivals`.

    python -m ouroboros_ds.tools.speed_map --bench bench_g2_m4.json --blocks 32 --out docs/speed_map.md --png docs/speed_map.png

The model: ``--blocks`` identical Transformer blocks plus the embedding and the tied head, costed
from a benchmark's measured instructions (``python -m ouroboros_ds.tools.bench --out``; stock 1F1B's
stage 0 gives a block's forward and backward, its last stage the head's) or from ``--costs`` JSON
(:class:`BlockCosts` fields, e.g. written by ``scripts/gpu_check.py``). Activation bytes per
block and micro-batch, its input and its weights come from :func:`ouroboros_ds.ring.memory.measure_layers`
on the benchmark's model. Each G splits the same model: 1F1B ``blocks / G`` per stage, DualPipeV
``blocks / 2G`` per chunk, the ring the balanced partition of its replay mode.
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass

from . import rivals
from ..ring.memory import (LayerCost, ModuleMemory, ReplayPlan, choose_partition, stage_peaks, synchronous_kept,
                           synchronous_peaks)
from ..core.partition import balanced_blocks_per_module
from ..core.schedule import num_modules, ouroboros_schedule, stage_of
from ..core.simulate import Costs, simulate, steady_steps, synchronous_cost

SCHEDULES = ("1f1b", "1f1b+ckpt", "dualpipev", "ouro-recompute", "ouro-stash", "ouro-bounded")


@dataclass
class BlockCosts:
    """Seconds and bytes of one block (and of the head) on one micro-batch."""

    f: float            # block forward
    b: float            # block backward (no recompute)
    head_f: float       # final norm + tied head + loss, forward
    head_b: float       # ... backward
    step: float         # optimizer step per block's parameters
    graph: float        # bytes autograd saves in a block's forward
    inputs: float       # bytes of a block's input (what checkpointing keeps)
    params: float       # bytes of a block's weights (a snapshot)
    head_graph: float   # bytes the head + loss save
    tokens: int         # tokens per micro-batch


def costs_from_bench(bench: dict, memory: dict) -> BlockCosts:
    """Per-block costs from a benchmark's stock 1F1B instruction means (stage 0: embedding + blocks;
    last stage: blocks + final norm + head + loss) and ``memory`` (graph/inputs/params/head_graph)."""
    args, ranks = bench["args"], bench["ranks"]
    G = args["stages"]
    n = bench.get("blocks_per_stage") or _model_blocks(args) // G
    means = [{k: statistics.mean(v) for k, v in r["1f1b"]["durations"].items()} for r in ranks]
    f, b = means[0]["F:0"] / n, means[0]["B:0"] / n
    # the last stage's extra over its blocks is the head's; split 1 : 2 (a backward is about two
    # forwards) rather than taking forward and backward apart, which noise can make negative
    head = max(means[-1]["F:0"] + means[-1]["B:0"] - n * (f + b), 0.0)
    head_f, head_b = head / 3, 2 * head / 3
    step = statistics.mean(m["STEP:0"] for m in means) / n
    return BlockCosts(f=f, b=b, head_f=head_f, head_b=head_b, step=step,
                      tokens=args["micro_batch_size"] * args["seq_len"], **memory)


def _model_blocks(args) -> int:
    from ..models.gpt2 import gpt2_config

    return gpt2_config(args["model"], 256).n_layer


def measured_memory(model: str, micro_batch: int, seq_len: int, vocab: int = 256) -> dict:
    """Bytes per block and micro-batch (graph, input, weights) and the head's graph, measured."""
    import torch

    from ..ring.memory import measure_layers
    from ..models.gpt2 import gpt2_config, gpt2_layer_specs
    from ..ring.reference import build_layers

    torch.manual_seed(0)
    cfg = gpt2_config(model, vocab, dropout=0.1)
    plan = gpt2_layer_specs(cfg, seed=0)
    costs = measure_layers(build_layers(plan), torch.randint(0, vocab, (micro_batch, seq_len)))
    blk = costs[plan.block_indices[0]]
    tail = costs[plan.block_indices[-1] + 1:]
    return {"graph": float(blk.graph), "inputs": float(blk.inputs), "params": float(blk.params),
            "head_graph": float(sum(c.graph for c in tail))}


def _layer_costs(c: BlockCosts, L: int) -> list[LayerCost]:
    """The model as per-layer costs: embedding, L blocks, head (final norm + tied head)."""
    return ([LayerCost(graph=0, inputs=0, params=0)]
            + [LayerCost(graph=c.graph, inputs=c.inputs, params=c.params) for _ in range(L)]
            + [LayerCost(graph=c.head_graph, inputs=c.inputs, params=0)])


@dataclass
class Point:
    schedule: str
    G: int
    M: int
    step_time: float
    tokens_per_s: float
    peak: float          # max over stages, bytes
    utilization: float   # of the most loaded stage (mean over stages for the rivals)
    # the ring only: a step of the synchronous warm-up (``sync_steps``) on the same partition, whose
    # replays wait for their own step's error gradients
    sync_step_time: float | None = None


def rival_point(name: str, c: BlockCosts, L: int, G: int, M: int) -> Point | None:
    if name == "dualpipev":
        if M < 2 * G or L < 2 * G:
            return None
        n = L / (2 * G)
        fwd = [[n * c.f, n * c.f + (c.head_f if r == 0 else 0.0)] for r in range(G)]
        bwd = [[n * c.b, n * c.b + (c.head_b if r == 0 else 0.0)] for r in range(G)]
        kept = [[n * c.graph, n * c.graph + (c.head_graph if r == 0 else 0.0)] for r in range(G)]
        res = rivals.simulate_rival(rivals.dualpipev_schedules(G, M),
                                    rivals.RivalCosts(fwd, bwd, [2 * n * c.step] * G), rivals.RivalMemory(kept))
    else:
        n = L / G
        last = lambda s, x: x if s == G - 1 else 0.0  # noqa: E731
        ckpt = name == "1f1b+ckpt"
        fwd = [[n * c.f + last(s, c.head_f)] for s in range(G)]
        bwd = [[n * (c.b + (c.f if ckpt else 0.0)) + last(s, c.head_b + (c.head_f if ckpt else 0.0))]
               for s in range(G)]
        if ckpt:
            mem = rivals.RivalMemory([[n * c.inputs + last(s, c.inputs)] for s in range(G)],
                                     [[n * c.graph + last(s, c.head_graph)] for s in range(G)])
        else:
            mem = rivals.RivalMemory([[n * c.graph + last(s, c.head_graph)] for s in range(G)])
        res = rivals.simulate_rival(rivals.train_schedules(G, M), rivals.RivalCosts(fwd, bwd, [n * c.step] * G), mem)
    return Point(name, G, M, res.step_time, M * c.tokens / res.step_time, max(res.peak),
                 statistics.mean(res.utilization))


def ring_point(name: str, c: BlockCosts, L: int, G: int, M: int, budget="1f1b") -> tuple[Point, list, ReplayPlan]:
    replay = "recompute" if name == "ouro-recompute" else "stash"
    flops = {"block": c.f, "head": c.head_f, "embed": 0.0}
    layers = _layer_costs(c, L)
    K = num_modules(G)
    if name == "ouro-bounded":
        bpm, chosen = choose_partition(layers, list(range(1, L + 1)), G, M, flops, budget)
        plan = chosen.plan
    else:
        bpm = balanced_blocks_per_module(L, G, flops, replay)
        plan = ReplayPlan({k: M for k in range(1, K)})
    fwd, rep = {}, {}
    for k in range(1, K):
        n = bpm[k - 1]
        fwd[k] = n * c.f
        for j in range(M):
            kept = replay == "stash" and plan.keeps(k, j)
            rep[(k, j)] = n * (c.b + (0.0 if kept else c.f))
    loss = bpm[-1] * (c.f + c.b) + c.head_f + c.head_b
    work = [0.0] * G
    for k, n in enumerate(bpm, start=1):
        work[stage_of(k, G)] += n
    step = max(work) * c.step
    window = steady_steps(G)
    tl = simulate(ouroboros_schedule(G, M), Costs(forward=fwd, replay=rep, loss=loss, step=step), steps=window.stop)
    period = max(tl.period(s, window) for s in range(G))
    util = min(tl.steady_utilization(window))
    # a synchronous step: features replay keeps the graphs 1F1B's memory allows, stash mode its plan's
    sync_rep = rep
    if replay == "recompute":
        sync_kept = synchronous_kept(bpm, M)
        sync_rep = {(k, j): n * (c.b + (0.0 if j < sync_kept[k] else c.f))
                    for k, n in enumerate(bpm[:-1], start=1) for j in range(M)}
    sync = synchronous_cost(G, M, Costs(forward=fwd, replay=sync_rep, loss=loss, step=step))[1]
    mems = {k: ModuleMemory(graph=bpm[k - 1] * c.graph, inputs=c.inputs,
                            snapshot=bpm[k - 1] * c.params if replay == "stash" else 0.0) for k in range(1, K)}
    loss_graph = bpm[-1] * c.graph + c.head_graph
    if replay == "recompute":  # the run's peak: its ring steps' or its synchronous steps'
        peaks = [max(a, b) for a, b in zip(stage_peaks(G, M, mems, loss_graph, ReplayPlan({k: 0 for k in range(1, K)})),
                                           synchronous_peaks(G, M, mems, loss_graph, sync_kept))]
    else:
        peaks = stage_peaks(G, M, mems, loss_graph, plan)
    return Point(name, G, M, period, M * c.tokens / period, max(peaks), util, sync), bpm, plan


def build_map(c: BlockCosts, L: int, Gs, Ms, budget="1f1b") -> list[Point]:
    out = []
    for G in Gs:
        for M in Ms:
            for name in SCHEDULES:
                if name.startswith("ouro"):
                    out.append(ring_point(name, c, L, G, M, budget)[0])
                else:
                    p = rival_point(name, c, L, G, M)
                    if p is not None:
                        out.append(p)
    return out


def table(points: list[Point], Ms_shown) -> str:
    by = {(p.schedule, p.G, p.M): p for p in points}
    Gs = sorted({p.G for p in points})
    lines = ["| G | M | " + " | ".join(SCHEDULES) + " | fastest rival | best Ouroboros at <= 1F1B's memory vs it |",
             "|---|---|" + "---|" * (len(SCHEDULES) + 2)]
    for G in Gs:
        for M in Ms_shown:
            ref = by.get(("1f1b", G, M))
            if ref is None:
                continue
            cells = []
            for s in SCHEDULES:
                p = by.get((s, G, M))
                cells.append("-" if p is None else
                             f"{p.tokens_per_s / ref.tokens_per_s:.2f}x @ {p.peak / ref.peak:.2f}")
            rivals_ = [by[(s, G, M)] for s in ("1f1b", "1f1b+ckpt", "dualpipev") if (s, G, M) in by]
            best_rival = max(rivals_, key=lambda p: p.tokens_per_s)
            ours = [by[(s, G, M)] for s in SCHEDULES if s.startswith("ouro") and (s, G, M) in by
                    and by[(s, G, M)].peak <= ref.peak * 1.0001]
            best = max(ours, key=lambda p: p.tokens_per_s) if ours else None
            cells.append(best_rival.schedule)
            cells.append("-" if best is None else
                         f"{best.schedule} {best.tokens_per_s / best_rival.tokens_per_s:.2f}x")
            lines.append(f"| {G} | {M} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(points: list[Point], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    Gs = sorted({p.G for p in points})
    fig = Figure(figsize=(4.2 * len(Gs), 7.0))
    FigureCanvasAgg(fig)
    style = {"1f1b": ("#444444", "-"), "1f1b+ckpt": ("#999999", "--"), "dualpipev": ("#2ca02c", "-"),
             "ouro-recompute": ("#1f77b4", ":"), "ouro-stash": ("#ff7f0e", "--"), "ouro-bounded": ("#d62728", "-")}
    for i, G in enumerate(Gs):
        ax1 = fig.add_subplot(2, len(Gs), i + 1)
        ax2 = fig.add_subplot(2, len(Gs), len(Gs) + i + 1)
        ref = {p.M: p for p in points if p.G == G and p.schedule == "1f1b"}
        for s in SCHEDULES:
            ps = sorted((p for p in points if p.G == G and p.schedule == s), key=lambda p: p.M)
            if not ps:
                continue
            color, ls = style[s]
            ax1.plot([p.M for p in ps], [p.tokens_per_s / ref[p.M].tokens_per_s for p in ps], ls, color=color,
                     label=s, lw=1.6)
            ax2.plot([p.M for p in ps], [p.peak / ref[p.M].peak for p in ps], ls, color=color, label=s, lw=1.6)
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        ax1.set_title(f"G = {G}", fontsize=10)
        ax1.set_ylabel("tokens/s vs stock 1F1B" if i == 0 else "")
        ax2.set_ylabel("peak activation memory vs 1F1B" if i == 0 else "")
        ax2.set_yscale("log", base=2)
        ax2.set_xlabel("M (micro-batches per step)")
    ax1.legend(fontsize=7, loc="upper right")
    fig.suptitle("Simulated from measured per-block costs: speed and memory relative to DeepSpeed's 1F1B",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ouroboros_ds.tools.speed_map", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", help="a benchmark's --out JSON (its stock 1F1B rows give the per-block costs)")
    p.add_argument("--costs", help="or a JSON of BlockCosts fields")
    p.add_argument("--blocks", type=int, default=32, help="blocks of the simulated model (>= 2 x the largest G)")
    p.add_argument("-G", "--stages", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--max-m", type=int, default=32)
    p.add_argument("--activation-budget", default="1f1b", help="ouro-bounded's budget (ouroboros_ds.ring.memory)")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--png", help="draw the map here")
    p.add_argument("--json", help="write every point here")
    args = p.parse_args(argv)
    if args.costs:
        c = BlockCosts(**json.load(open(args.costs)))
    elif args.bench:
        bench = json.load(open(args.bench))
        a = bench["args"]
        c = costs_from_bench(bench, measured_memory(a["model"], a["micro_batch_size"], a["seq_len"]))
    else:
        p.error("give --bench or --costs")
    Ms = list(range(1, args.max_m + 1))
    points = build_map(c, args.blocks, args.stages, Ms, args.activation_budget)
    shown = [m for m in Ms if m & (m - 1) == 0]
    text = ("Per-block costs: " + json.dumps({k: (round(v, 6) if isinstance(v, float) else v)
                                              for k, v in asdict(c).items()}) + "\n\n"
            + "Cells: tokens/s relative to stock 1F1B @ peak activation memory (busiest stage) relative to "
              "stock 1F1B's.\n\n" + table(points, shown))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.png:
        draw(points, args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(p) for p in points], f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
