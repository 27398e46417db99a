"""Learning-rate-fair convergence: Ouroboros against synchronous 1F1B, each at its own best lr.

For every corpus, G and M, each schedule ("variant") trains the `tiny` GPT-2 (4 blocks, d_model
64, bytes) at every lr of a sweep and every seed, with the same data, initial weights, dropout
masks and hyper-parameters (``ds_configs/ouroboros.json`` with the lr replaced); each variant is
then judged at the lr whose final val bpb (mean over seeds) is lowest:

- final val bpb (mean over seeds, and the spread: max - min over seeds),
- the gap to the best 1F1B run at equal steps (the end of the run),
- the steps to reach the best 1F1B run's final val bpb (mean curve over seeds, linear between
  evaluations; "-" if never reached), and the time to reach it relative to 1F1B's: steps x the
  step-time ratio (variant / 1F1B) measured by one benchmark run (``python -m ouroboros_ds.tools.bench``,
  its JSON given with ``--bench``), with the variant's synchronous first steps at the step time of
  1F1B with activation checkpointing (:func:`run_time`), against stock 1F1B and against 1F1B with
  activation checkpointing (the rival at the activation memory of features replay); and the same
  at stash replay's step time where stash runs the variant's update bit for bit
  (:func:`stash_is_same_update`: the same steps, more activation memory, faster steps).

The runs use the single-process :class:`ouroboros_ds.ring.reference.Reference`: exactly the update the
DeepSpeed engine runs (equal bit for bit by test, G = 1..3, M = 1 and 4, dropout on), without the
processes. 1F1B is its synchronous limit with one gradient-norm clip over the whole model, as the
stock engine clips. So these runs measure learning per step; speed comes from the benchmark.

  python experiments/parity.py --out docs/parity                 # the full protocol (hours of CPU)
  python experiments/parity.py --out /tmp/p --data shakespeare --stages 2 --micro-batches 4 \\
      --seeds 0 --lrs 1e-3 2e-3 --steps 200 --variants 1f1b paper default   # a quick look

Raw per-run metrics (JSON) go to ``--raw`` (default ``runs/parity``, not part of the repository),
one file per run named after its corpus, G, M, variant, lr, seed and steps (a corpus given as a path:
its base name and a short hash of the full path; a JSON variant: its characters and a hash);
``--reuse`` keeps finished runs. The table (``results.md``) and the curves (``parity.png``) go to
``--out``. ``--jobs`` runs that many runs at once (one torch thread each).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> Reference options. "partition": the block split of the engine's --partition flag.
VARIANTS = {
    "1f1b": dict(synchronous=True, global_clip=True),
    # 1F1B with the default's look-ahead on module K (screening only: the look-ahead without delays)
    "1f1b-look": dict(synchronous=True, global_clip=True, lookahead=3.0, lookahead_synchronous=True),
    "paper": dict(),  # the paper's update: features replay, balanced partition, no mitigation
    "stash-pred-fresh": dict(replay="stash", weight_prediction=1.0, partition="fresh"),
    "pred": dict(weight_prediction=1.0),
    "pred-fresh": dict(weight_prediction=1.0, partition="fresh"),
    "pred-fresh-look": dict(weight_prediction=1.0, partition="fresh", lookahead=1.0),
    "fresh": dict(partition="fresh"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the table (results.md) and the curves (parity.png)")
    p.add_argument("--raw", default=os.path.join(ROOT, "runs", "parity"), help="folder for per-run metrics (JSON)")
    p.add_argument("--data", nargs="+", default=["shakespeare", "enwik8-sample"])
    p.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    p.add_argument("--micro-batches", nargs="+", type=int, default=[1, 4],
                   help="M; the global batch stays --batch sequences (M = 1: one micro-batch of all)")
    p.add_argument("--variants", nargs="+", default=["1f1b", "paper", "default"],
                   help=f"schedules: {', '.join(VARIANTS)}, default, default-no-stale-lr, or a JSON object of "
                        "Reference options")
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32, help="sequences per step (global batch)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--model", default="tiny")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-sequences", type=int, default=256, help="validation windows per evaluation (the same for every run)")
    p.add_argument("--variant-lrs", default="{}",
                   help='JSON {variant: [lr, ...]}: a sweep of its own for a variant (default: --lrs)')
    p.add_argument("--step-times", default=json.dumps(STEP_TIMES),
                   help="JSON {config: step seconds} of one benchmark run (the default: docs/benchmarks.md, G = 2, M = 4)")
    p.add_argument("--bench", nargs="*", default=[],
                   help="benchmark JSONs (python -m ouroboros_ds.tools.bench --out ...): step times per (G, M), over --step-times")
    p.add_argument("--speed-map", default=None,
                   help="a speed map's points (python -m ouroboros_ds.tools.speed_map --json ...): simulated step "
                        "times per (G, M), synchronous steps included, over --step-times and --bench")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the Reference runs (cuda: fp32 with TF32 matmuls)")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="stop a run at the first evaluation after this many seconds (0: never); the table then "
                        "compares the runs at the last step all of them reached")
    p.add_argument("--reuse", action="store_true", help="keep runs whose raw metrics exist")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: table and curves from the runs already in --raw (a cell without runs is left out)")
    return p.parse_args(argv)


def variant_options(name: str) -> dict:
    if name in VARIANTS:
        return dict(VARIANTS[name])
    if name in ("default", "default-no-stale-lr"):
        import dataclasses

        from ouroboros_ds.ring.config import RingConfig
        # default-no-stale-lr: the default without the delay-scaled lr (at G >= 4, the default before it)
        return dataclasses.asdict(RingConfig() if name == "default" else RingConfig(stale_lr_scale=0.0))
    try:
        return json.loads(name)
    except json.JSONDecodeError:
        raise SystemExit(f"--variants: {name!r} is neither one of {', '.join(VARIANTS)}, 'default', "
                         "'default-no-stale-lr', nor JSON") from None


def run_key(data, G, M, variant, lr, seed, steps):
    """The run's file name in --raw (without ".json"): the corpus and the variant as plain file
    names (:func:`ouroboros_ds.train.corpora.corpus_name`: a path is its base name and a hash of the path)."""
    from ouroboros_ds.train.corpora import corpus_name, safe_name

    return f"{corpus_name(data)}_g{G}_m{M}_{safe_name(variant)}_lr{lr:g}_s{seed}_n{steps}"


def blocks_per_module(job: dict, opts: dict, replay: str, vocab: int):
    """The block split the engine's --partition flag gives this job's model (None: the authors')."""
    from ouroboros_ds.models.gpt2 import gpt2_config
    from ouroboros_ds.core.partition import balanced_blocks_per_module, layer_costs

    partition = opts.get("partition", "balanced")
    if partition == "authors":
        return None
    mcfg = gpt2_config(job["model"], vocab, dropout=0.1)
    return balanced_blocks_per_module(mcfg.n_layer, job["G"], layer_costs(mcfg.n_embd, vocab, job["seq_len"]),
                                      replay, fresh=partition == "fresh")


def stash_is_same_update(job: dict, opts: dict) -> bool:
    """Whether ``--replay stash`` runs this ring variant's update bit for bit: with weight prediction
    features replay recomputes at the weights stash keeps, with the same dropout masks (tested in
    tests/unit/test_reference.py), provided both modes get the same block split (the balanced
    split weighs the replay's extra forward, so it may differ)."""
    if opts.get("synchronous") or opts.get("replay", "recompute") != "recompute" or not opts.get("weight_prediction"):
        return False
    from ouroboros_ds.train import data as D

    vocab = D.load_token_data(job["data"]).vocab_size
    return blocks_per_module(job, opts, "recompute", vocab) == blocks_per_module(job, opts, "stash", vocab)


def train_one(job: dict) -> dict:
    """One run on the Reference: returns {"steps", "bpb", "seconds"} at every evaluation."""
    import torch

    dev = torch.device(job.get("device", "cpu"))
    if dev.type == "cpu":
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    from ouroboros_ds.train import data as D
    from ouroboros_ds.models.gpt2 import gpt2_config, gpt2_layer_specs, lm_loss
    from ouroboros_ds.ring.config import FIELDS, RingConfig
    from ouroboros_ds.ring.reference import Reference

    a = job
    opts = variant_options(a["variant"])
    tok = D.load_token_data(a["data"])
    bpm = blocks_per_module(a, opts, opts.get("replay", "recompute"), tok.vocab_size)
    opts.pop("partition", None)
    mcfg = gpt2_config(a["model"], tok.vocab_size, dropout=0.1)
    plan = gpt2_layer_specs(mcfg, seed=a["seed"])
    with open(os.path.join(ROOT, "ds_configs", "ouroboros.json")) as f:
        cfg = json.load(f)
    cfg["optimizer"]["params"]["lr"] = a["lr"]
    if "clip" in opts:  # a variant may set its own gradient_clipping
        cfg["gradient_clipping"] = opts.pop("clip")
    cfg["scheduler"]["params"]["total_num_steps"] = a["steps"]
    mb = a["batch"] // a["M"]
    cfg.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=a["M"])
    # a variant's ring options are changes to the paper's update; the rest are the Reference's own
    ring = RingConfig.paper(**{k: opts.pop(k) for k in list(opts) if k in FIELDS})
    ref = Reference(plan, a["G"], cfg, lm_loss, seed=a["seed"], ring=ring, blocks_per_module=bpm, **opts).to(dev)
    stream = D.BatchStream(tok.train, a["seq_len"], mb, a["M"], seed=a["seed"])
    val = D.eval_batches(tok.val, a["seq_len"], 32, max_batches=a["eval_sequences"] // 32)

    def evaluate():
        ref.train(False)
        with torch.no_grad():
            losses = []
            for x, y in val:
                h, y = x.to(dev), y.to(dev)
                for k in range(1, ref.K + 1):
                    h = ref.forward_module(k, h)
                losses.append(lm_loss(h, y).item())
        ref.train(True)
        return tok.bits_per_byte(sum(losses) / len(losses))

    out = {"steps": [], "bpb": [], "seconds": [], "train_loss": []}
    clock, start = 0.0, time.perf_counter()
    for step in range(a["steps"]):
        t0 = time.perf_counter()
        loss = ref.step([tuple(t.to(dev) for t in next(stream)) for _ in range(a["M"])])
        clock += time.perf_counter() - t0
        if not math.isfinite(loss):
            out["diverged_at"] = step
            break
        if (step + 1) % a["eval_every"] == 0 or step + 1 == a["steps"]:
            out["steps"].append(step + 1)
            out["bpb"].append(evaluate())
            out["seconds"].append(clock)
            out["train_loss"].append(loss)
            if a.get("max_seconds") and time.perf_counter() - start > a["max_seconds"]:
                out["stopped_at"] = step + 1  # out of time: the curve so far, at equal steps with the others
                break
    return out


def run_all(args, jobs: list[dict]) -> dict:
    os.makedirs(args.raw, exist_ok=True)
    results, todo = {}, []
    for job in jobs:
        path = os.path.join(args.raw, run_key(job["data"], job["G"], job["M"], job["variant"], job["lr"], job["seed"],
                                              job["steps"]) + ".json")
        if (args.reuse or args.table_only) and os.path.exists(path):
            r = json.load(open(path))
            r["job"] = {**r["job"], "data": job["data"]}  # the same corpus, perhaps given another way
            results[path] = r
        elif not args.table_only:
            todo.append((path, job))
    print(f"{len(results)} runs reused, {len(todo)} to run", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train_one, job): (path, job) for path, job in todo}
        for fut in futures:
            path, job = futures[fut]
            r = fut.result()
            r["job"] = job
            with open(path, "w") as f:
                json.dump(r, f)
            results[path] = r
            print(f"{os.path.basename(path)}: final val bpb {r['bpb'][-1] if r['bpb'] else float('nan'):.4f} "
                  f"({r['seconds'][-1] if r['seconds'] else 0:.0f} s)", flush=True)
    return results


# ------------------------------------------------------------------ step-time ratios (benchmark)
# Step seconds of `python -m ouroboros_ds.tools.bench --rounds 6` (docs/benchmarks.md: G = 2, M = 4, the
# `small` model, idle box); ouro-recompute-pred from `--configs 1f1b 1f1b+ckpt ouro-recompute ouro-recompute-pred`
# when measured (docs/parity.md), else ouro-recompute's.
STEP_TIMES = {"1f1b": 1.117, "1f1b+ckpt": 1.594, "ouro-recompute": 1.116, "ouro-stash": 0.905}


def bench_step_times(paths) -> dict:
    """{(G, M): {config: step seconds}}: per round the slowest rank's mean step, median over rounds."""
    out = {}
    for path in paths or []:
        d = json.load(open(path))
        G, M = d["args"]["stages"], d["args"]["micro_batches"]
        times = {}
        for cfg in d["ranks"][0]:
            if cfg.startswith("_"):
                continue
            per_round = list(zip(*[r[cfg]["step_times"] for r in d["ranks"] if cfg in r and "step_times" in r[cfg]]))
            if per_round:
                times[cfg] = statistics.median(max(x) for x in per_round)
        out[(G, M)] = times
    return out


def map_step_times(path) -> dict:
    """{(G, M): {config: step seconds}} from a speed map's points, with the ring's synchronous step
    (features replay's, ``sync_step_time``) as ``ouro-sync``."""
    out: dict = {}
    for p in json.load(open(path)) if path else []:
        times = out.setdefault((p["G"], p["M"]), {})
        times[p["schedule"]] = p["step_time"]
        if p["schedule"] == "ouro-recompute" and p.get("sync_step_time"):
            times["ouro-sync"] = p["sync_step_time"]
    return out


def bench_config(opts: dict, times: dict) -> str:
    """The benchmark configuration whose step time a variant's ring steps take: with weight
    prediction the `-pred` one (fresh partition, prediction's weight copies) where measured."""
    base = "ouro-stash" if opts.get("replay") == "stash" else "ouro-recompute"
    return base + "-pred" if opts.get("weight_prediction") and base + "-pred" in times else base


def run_time(n: float, opts: dict, times: dict) -> float:
    """Seconds a run of the variant needs for its first n steps, from benchmark step times.

    A ring step costs the variant's own step time. Its first ``sync_steps`` steps are synchronous:
    each fills and drains the pipeline; with features replay they take ``ouro-sync``'s step time
    where one was measured or simulated (their forwards keep the graphs 1F1B's memory allows), else
    1F1B with activation checkpointing's (every forward recomputed, an upper bound); stash mode
    keeps its graphs: stock 1F1B's."""
    if opts.get("synchronous"):
        return n * times["1f1b"]
    sync = min(n, opts.get("sync_steps", 0))
    sync_cfg = "1f1b" if opts.get("replay") == "stash" else "ouro-sync" if "ouro-sync" in times else "1f1b+ckpt"
    return sync * times[sync_cfg] + (n - sync) * times[bench_config(opts, times)]


# ------------------------------------------------------------------ summary
def mean_curve(runs: list[dict]):
    n = min(len(r["bpb"]) for r in runs)
    return runs[0]["steps"][:n], [statistics.fmean(r["bpb"][i] for r in runs) for i in range(n)]


def steps_to(steps, bpb, target):
    """First step at which the curve reaches target (linear between evaluations), or None."""
    prev = (0, float("inf"))
    for s, b in zip(steps, bpb):
        if b <= target:
            if prev[1] == float("inf"):
                return s
            return prev[0] + (s - prev[0]) * (prev[1] - target) / (prev[1] - b)
        prev = (s, b)
    return None


def summarize(args, results: dict):
    bench = bench_step_times(args.bench)
    for gm, t in map_step_times(args.speed_map).items():
        bench[gm] = {**t, **bench.get(gm, {})}  # a measured step time over a simulated one
    default_times = json.loads(args.step_times)
    groups: dict = {}  # (data, G, M, variant) -> {lr: [runs]}
    if any("stopped_at" in r for r in results.values()):  # --max-seconds: compare at the steps all reached
        n = min(len(r["bpb"]) for r in results.values() if "diverged_at" not in r)
        results = {key: {**r, **{f: r[f][:n] for f in ("steps", "bpb", "seconds", "train_loss")}}
                   for key, r in results.items()}
    for r in results.values():
        j = r["job"]
        if j["steps"] != args.steps or not r["bpb"]:
            continue
        groups.setdefault((j["data"], j["G"], j["M"], j["variant"]), {}).setdefault(j["lr"], []).append(r)
    rows, curves = [], {}
    lines = [f"`python experiments/parity.py {' '.join(sys.argv[1:])}`", "",
             "| data | G | M | schedule | lr sweep: final val bpb (mean of seeds) | best lr | final val bpb (spread) "
             "| vs 1F1B best | steps to 1F1B's final | time vs 1F1B | time vs 1F1B+ckpt | time vs DualPipeV "
             "| time vs 1F1B, stash replay |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for data in args.data:
        for G in args.stages:
            for M in args.micro_batches:
                sweep = {v: groups.get((data, G, M, v), {}) for v in args.variants}
                delayed = [v for v in args.variants if not variant_options(v).get("synchronous")]
                if delayed and not any(sweep[v] for v in delayed):
                    continue  # a cell no ring variant ran (1F1B's runs are filed under every G)
                best = {}
                for v, by_lr in sweep.items():
                    full = {lr: rs for lr, rs in by_lr.items()
                            if all(len(r["bpb"]) == len(rs[0]["bpb"]) and "diverged_at" not in r for r in rs)}
                    if full:
                        lr = min(full, key=lambda lr: statistics.fmean(r["bpb"][-1] for r in full[lr]))
                        best[v] = (lr, full[lr])
                if "1f1b" not in best:
                    continue
                base_steps, base_curve = mean_curve(best["1f1b"][1])
                target = base_curve[-1]
                times = {**default_times, **bench.get((G, M), {})}
                for v in args.variants:
                    by_lr = sweep[v]
                    sweep_txt = ", ".join(
                        f"{lr:g}: " + ("div" if any("diverged_at" in r for r in rs)
                                       else f"{statistics.fmean(r['bpb'][-1] for r in rs):.4f}")
                        for lr, rs in sorted(by_lr.items()))
                    if v not in best:
                        lines.append(f"| {data} | {G} | {M} | {v} | {sweep_txt} | - | - | - | - | - | - | - | - |")
                        continue
                    lr, rs = best[v]
                    steps, curve = mean_curve(rs)
                    finals = [r["bpb"][-1] for r in rs]
                    gap = (curve[-1] / target - 1) * 100
                    n = steps_to(steps, curve, target)
                    opts = variant_options(v)
                    base_n = steps_to(base_steps, base_curve, target)
                    t = {b: (run_time(n, opts, times) / (base_n * times[b]) if n is not None else None)
                         for b in ("1f1b", "1f1b+ckpt", "dualpipev") if b in times and bench_config(opts, times) in times}
                    # The same update with stash replay (equal bit for bit by test): same steps, its step time.
                    stash = None
                    if n is not None and "ouro-stash" in times and stash_is_same_update(rs[0]["job"], opts):
                        stash = run_time(n, {**opts, "replay": "stash"}, times) / (base_n * times["1f1b"])
                    fmt = lambda x: "-" if x is None else f"{x:.2f}x"
                    lines.append(
                        f"| {data} | {G} | {M} | {v} | {sweep_txt} | {lr:g} | {curve[-1]:.4f} (±{(max(finals) - min(finals)) / 2:.4f}) "
                        f"| {gap:+.2f}% | {'-' if n is None else f'{n:.0f}'} | {fmt(t.get('1f1b'))} | {fmt(t.get('1f1b+ckpt'))} "
                        f"| {fmt(t.get('dualpipev'))} | {fmt(stash)} |")
                    rows.append(dict(data=data, G=G, M=M, variant=v, lr=lr, final=curve[-1], gap=gap, steps_to=n,
                                     time_vs_1f1b=t.get("1f1b"), time_vs_ckpt=t.get("1f1b+ckpt"),
                                     time_vs_dualpipev=t.get("dualpipev"), time_vs_1f1b_stash=stash,
                                     spread=(max(finals) - min(finals)) / 2))
                    curves[(data, G, M, v)] = (lr, steps, curve)
    cells = [(None, default_times)] + [(gm, t) for gm, t in bench.items()
                                       if gm[0] in args.stages and gm[1] in args.micro_batches]
    lines += ["", "Step-time ratios to 1F1B (measured, or simulated with --speed-map): " + "; ".join(
        f"{'G=%d M=%d' % gm if gm else 'all cells'}: " + ", ".join(f"{c} {s / t['1f1b']:.3f}" for c, s in t.items())
        for gm, t in cells if "1f1b" in t)]
    return "\n".join(lines), rows, curves


def draw(curves: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({k[:3] for k in curves})
    if not panels:
        return
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (data, G, M) in zip(axes.flat, panels):
        for (d, g, m, v), (lr, steps, curve) in curves.items():
            if (d, g, m) == (data, G, M):
                ax.plot(steps, curve, marker=".", label=f"{v} (lr {lr:g})")
        ax.set(title=f"{data}, G={G}, M={M}", xlabel="step", ylabel="val bits/byte (mean of seeds)")
        lo = min(min(c[2][-1] for k, c in curves.items() if k[:3] == (data, G, M)), 10)
        ax.set_ylim(lo - 0.05, lo + 0.8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.eval_sequences % 32:
        raise SystemExit("--eval-sequences: must be a multiple of 32 (the evaluation batch)")
    for M in args.micro_batches:
        if args.batch % M:
            raise SystemExit(f"--batch: {args.batch} is not a multiple of M = {M}")
    for v in args.variants:
        variant_options(v)
    lrs_of = {v: json.loads(args.variant_lrs).get(v, args.lrs) for v in args.variants}
    jobs = [dict(data=d, G=G, M=M, variant=v, lr=lr, seed=s, steps=args.steps, batch=args.batch,
                 seq_len=args.seq_len, model=args.model, eval_every=args.eval_every,
                 eval_sequences=args.eval_sequences, device=args.device, max_seconds=args.max_seconds)
            for d in args.data for G in args.stages for M in args.micro_batches for v in args.variants
            for lr in lrs_of[v] for s in args.seeds
            if not (variant_options(v).get("synchronous") and (G != args.stages[0]))]  # 1F1B: one G is all Gs
    # a synchronous run is the same at every G: run it once, file it under each G
    results = run_all(args, jobs)
    for r in list(results.values()):
        j = r["job"]
        if variant_options(j["variant"]).get("synchronous"):
            for G in args.stages[1:]:
                results[(j["data"], G, j["M"], j["variant"], j["lr"], j["seed"])] = {**r, "job": {**j, "G": G}}
    table, rows, curves = summarize(args, results)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    draw(curves, os.path.join(args.out, "parity.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
