"""The paper's claim, small: do delayed gradients train as well as synchronous 1F1B?

Runs train.py (torchrun, G CPU ranks on gloo) with the same model, data, seed, global batch
(B = --micro-batch x --micro-batches sequences) and hyper-parameters for each of:

  1f1b        DeepSpeed's stock synchronous 1F1B, M micro-batches of --micro-batch
  ouro-m1     Ouroboros, one micro-batch of B (the paper's algorithm, same global batch)
  ouro-m4     Ouroboros, M micro-batches of --micro-batch (our pipelined ring)
  ouro-m4-lr  ouro-m4 with the staleness mitigation --stale-lr-scale C (ouroboros_ds/ring/staleness.py)
  ouro-m4-pred  ouro-m4 with the mitigation --weight-prediction H (stash replay; ouroboros_ds/ring/prediction.py LastUpdate)
  ouro-m4-fresh       ouro-m4 with --partition fresh (stage 0's blocks in module K, none in the stalest module 1)
  ouro-m4-fresh-pred  both (ouro-m1-fresh-pred: both, on the paper's one micro-batch)

for each corpus (--data) and stage count (--stages), then writes runs' metrics (JSON lines, one
file per corpus, G and run; a corpus given as a path is named by its base name and a short hash
of the full path), a table (results.md) and a PNG of val bits per byte against steps and against
training wall-clock (time inside train_batch, so evaluations do not bend it) to --out. Ouroboros runs use
--replay stash by default: the same numbers as recompute (tested), and the faster mode on CPU.

The table's columns: final val bpb and its gap to 1F1B at the same step; "last 25%": how much
val bpb still fell over the last quarter of the run (near 0: the curve has flattened); train
steps/s; and "bpb @ T": each run's val bpb at T, the training time of the panel's earliest
finisher (linear between evaluations), with its gap to 1F1B at that same wall-clock.

  python experiments/staleness.py --out docs/staleness/long --steps 1500 --eval-every 100   # the full grid
  python experiments/staleness.py --out /tmp/s --data shakespeare --stages 2 --steps 100   # a quick look

Runs are sequential, each alone on the machine (a shared box makes the wall-clock curves lie);
--reuse keeps a finished run's metrics, so an interrupted grid can be resumed or re-tabled.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from ouroboros_ds.ring.utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRED = ["--replay", "stash", "--weight-prediction", "{h}"]
FRESH = ["--partition", "fresh"]
RUNS = {  # name -> (schedule, one micro-batch of the whole global batch?, extra flags)
    "1f1b": ("1f1b", False, []),
    "ouro-m1": ("ouroboros", True, []),
    "ouro-m4": ("ouroboros", False, []),
    "ouro-m4-lr": ("ouroboros", False, ["--stale-lr-scale", "{c}"]),
    "ouro-m4-pred": ("ouroboros", False, PRED),
    "ouro-m4-fresh": ("ouroboros", False, FRESH),
    "ouro-m4-fresh-pred": ("ouroboros", False, FRESH + PRED),
    "ouro-m1-fresh-pred": ("ouroboros", True, FRESH + PRED),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for metrics, table (results.md) and PNG")
    p.add_argument("--data", nargs="+", default=["enwik8-sample", "shakespeare"])
    p.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (M > 1 runs)")
    p.add_argument("--micro-batches", type=int, default=4, help="M of the 1f1b and ouro-m4 runs")
    p.add_argument("--replay", choices=["recompute", "stash"], default="stash", help="of the Ouroboros runs")
    p.add_argument("--reuse", action="store_true", help="keep a run whose metrics already reach --steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--stale-lr-scale", type=float, default=3.0, help="C of the ouro-m4-lr run")
    p.add_argument("--weight-prediction", type=float, default=1.0, help="H of the *-pred runs")
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-sequences", type=int, default=512,
                   help="validation windows per evaluation, the same ones for every run (a multiple of B)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_one(args, data: str, G: int, name: str) -> str:
    schedule, single, extra = RUNS[name]
    mb, M = (args.micro_batch * args.micro_batches, 1) if single else (args.micro_batch, args.micro_batches)
    from ouroboros_ds.train.corpora import corpus_name  # a path: its base name and a hash of the path

    metrics = os.path.join(args.out, f"{corpus_name(data)}_g{G}_{name}.jsonl")
    if os.path.exists(metrics):
        if args.reuse and any(r.get("step") == args.steps and "val_bpb" in r for r in map(json.loads, open(metrics))):
            print(f"== {data} G={G} {name}: reusing {metrics}", flush=True)
            return metrics
        os.remove(metrics)
    if schedule == "ouroboros":
        extra = ["--replay", args.replay, *extra]
    with open(os.path.join(ROOT, "ds_configs", "ouroboros.json")) as f:
        cfg = json.load(f)
    cfg.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=M)
    cfg_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(cfg, cfg_file)
    cfg_file.close()
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(G), "--master_port", str(port),
           os.path.join(ROOT, "train.py"), "--deepspeed_config", cfg_file.name, "--data", data,
           "--schedule", schedule, "--steps", str(args.steps), "--lr", str(args.lr), "--model", args.model,
           "--seq-len", str(args.seq_len), "--eval-every", str(args.eval_every),
           "--eval-batches", str(args.eval_sequences // mb), "--seed", str(args.seed), "--no-progress",
           "--metrics", metrics, "--comm-timeout", "300", *[x.format(c=args.stale_lr_scale, h=args.weight_prediction) for x in extra]]
    print(f"== {data} G={G} {name}: {' '.join(cmd[3:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    os.unlink(cfg_file.name)
    if r.returncode != 0:
        print(f"FAILED {data} G={G} {name} (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}", flush=True)
        return None
    print(r.stdout.strip().splitlines()[-1], flush=True)
    return metrics


def read(metrics: str) -> dict:
    recs = [json.loads(line) for line in open(metrics)]
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_bpb" in r]
    secs = {r["step"]: r.get("train_seconds", r["seconds"]) for r in steps}  # older runs: seconds only
    return {"steps": [r["step"] for r in evals], "bpb": [r["val_bpb"] for r in evals],
            "seconds": [secs.get(r["step"] - 1, 0.0) for r in evals],
            "steps_per_s": len(steps) / secs[steps[-1]["step"]]}


def at_time(r: dict, T: float) -> float:
    """val bpb of run r at training time T, linear between evaluations (None before the first)."""
    pts = list(zip(r["seconds"], r["bpb"]))
    for (t0, b0), (t1, b1) in zip(pts, pts[1:]):
        if t0 <= T <= t1:
            return b0 + (b1 - b0) * (T - t0) / max(t1 - t0, 1e-9)
    return pts[-1][1] if pts and abs(T - pts[-1][0]) < 1e-6 else None


def last_quarter_drop(r: dict) -> float:
    """How much val bpb fell over the last 25% of the steps (between the nearest evaluations)."""
    cut = r["steps"][-1] * 0.75
    i = min(range(len(r["steps"])), key=lambda k: abs(r["steps"][k] - cut))
    return r["bpb"][i] - r["bpb"][-1]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.eval_sequences % (args.micro_batch * args.micro_batches):
        raise SystemExit(f"--eval-sequences: {args.eval_sequences} is not a multiple of the global batch "
                         f"{args.micro_batch * args.micro_batches}; every run must see the same windows")
    results = {}
    for data in args.data:
        for G in args.stages:
            for name in args.runs:
                metrics = run_one(args, data, G, name)
                if metrics:  # a failed run is reported above and left out of the table
                    results[(data, G, name)] = read(metrics)
    lines = [f"`python experiments/staleness.py {' '.join(argv or sys.argv[1:])}`", "",
             "| data | G | run | final val bpb | vs 1f1b | last 25% | steps/s | T (s) | bpb @ T | vs 1f1b @ T |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda a, b: f"{(a / b - 1) * 100:+.1f}%" if a is not None and b is not None else "-"
    for (data, G, name), r in results.items():
        base = results.get((data, G, "1f1b"))
        T = min(q["seconds"][-1] for (d, g, _), q in results.items() if (d, g) == (data, G))
        bT, baseT = at_time(r, T), (at_time(base, T) if base else None)
        lines.append(f"| {data} | {G} | {name} | {r['bpb'][-1]:.4f} | {pct(r['bpb'][-1], base and base['bpb'][-1])} "
                     f"| {last_quarter_drop(r):.3f} | {r['steps_per_s']:.2f} | {T:.0f} "
                     f"| {'-' if bT is None else f'{bT:.4f}'} | {pct(bT, baseT)} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    draw(results, os.path.join(args.out, "staleness.png"))
    return 0


def draw(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(d, G) for d, G, _ in results})
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.4 * len(panels)), squeeze=False)
    for row, (data, G) in zip(axes, panels):
        for (d, g, name), r in results.items():
            if (d, g) == (data, G):
                row[0].plot(r["steps"], r["bpb"], marker=".", label=name)
                row[1].plot(r["seconds"], r["bpb"], marker=".", label=name)
        row[0].set(title=f"{data}, G={G}", xlabel="step", ylabel="val bits/byte")
        row[1].set(title=f"{data}, G={G}", xlabel="training wall-clock (s)", ylabel="val bits/byte")
        row[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
