"""The paper's claim, small: do delayed gradients train as well as synchronous 1F1B?

Runs train.py (torchrun, G CPU ranks on gloo) with the same model, data, seed, global batch and
hyper-parameters for each of:

  1f1b        DeepSpeed's stock synchronous 1F1B, M = 4 micro-batches of 8
  ouro-m1     Ouroboros, M = 1 micro-batch of 32 (the paper's algorithm, same global batch)
  ouro-m4     Ouroboros, M = 4 micro-batches of 8 (our pipelined ring)
  ouro-m4-lr  ouro-m4 with the staleness mitigation --stale-lr-scale C (ouroboros_ds/staleness.py)

for each corpus (--data) and stage count (--stages), then writes runs' metrics (JSON lines), a
table of final validation bits per byte and speed, and a PNG of val bpb against steps and against
wall-clock to --out.

  python experiments/staleness.py --out docs/staleness                       # the full grid
  python experiments/staleness.py --out /tmp/s --data shakespeare --stages 2 --steps 100   # a quick look

Runs are sequential, each alone on the machine (a shared box makes the wall-clock curves lie).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {  # name -> (schedule, micro-batch size, M, extra flags)
    "1f1b": ("1f1b", 8, 4, []),
    "ouro-m1": ("ouroboros", 32, 1, []),
    "ouro-m4": ("ouroboros", 8, 4, []),
    "ouro-m4-lr": ("ouroboros", 8, 4, ["--stale-lr-scale", "{c}"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for metrics, table (results.md) and PNG")
    p.add_argument("--data", nargs="+", default=["enwik8-sample", "shakespeare"])
    p.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--stale-lr-scale", type=float, default=3.0, help="C of the ouro-m4-lr run")
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_one(args, data: str, G: int, name: str) -> str:
    schedule, mb, M, extra = RUNS[name]
    metrics = os.path.join(args.out, f"{data}_g{G}_{name}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    with open(os.path.join(ROOT, "ds_configs", "ouroboros.json")) as f:
        cfg = json.load(f)
    cfg.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=M)
    cfg_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(cfg, cfg_file)
    cfg_file.close()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(G), "--master_port", str(port),
           os.path.join(ROOT, "train.py"), "--deepspeed_config", cfg_file.name, "--data", data,
           "--schedule", schedule, "--steps", str(args.steps), "--lr", str(args.lr), "--model", args.model,
           "--seq-len", str(args.seq_len), "--eval-every", str(args.eval_every),
           "--eval-batches", str(args.eval_batches), "--seed", str(args.seed), "--no-progress",
           "--metrics", metrics, *[x.format(c=args.stale_lr_scale) for x in extra]]
    print(f"== {data} G={G} {name}: {' '.join(cmd[3:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    os.unlink(cfg_file.name)
    if r.returncode != 0:
        raise RuntimeError(f"{data} G={G} {name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    print(r.stdout.strip().splitlines()[-1], flush=True)
    return metrics


def read(metrics: str) -> dict:
    recs = [json.loads(line) for line in open(metrics)]
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_bpb" in r]
    secs = {r["step"]: r["seconds"] for r in steps}
    return {"steps": [r["step"] for r in evals], "bpb": [r["val_bpb"] for r in evals],
            "seconds": [secs.get(r["step"] - 1, 0.0) for r in evals],
            "steps_per_s": len(steps) / steps[-1]["seconds"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for data in args.data:
        for G in args.stages:
            for name in args.runs:
                results[(data, G, name)] = read(run_one(args, data, G, name))
    lines = [f"`python experiments/staleness.py {' '.join(argv or sys.argv[1:])}`", "",
             "| data | G | run | final val bpb | vs 1f1b | steps/s |", "|---|---|---|---|---|---|"]
    for (data, G, name), r in results.items():
        base = results.get((data, G, "1f1b"))
        rel = f"{(r['bpb'][-1] / base['bpb'][-1] - 1) * 100:+.1f}%" if base else "-"
        lines.append(f"| {data} | {G} | {name} | {r['bpb'][-1]:.4f} | {rel} | {r['steps_per_s']:.2f} |")
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
        row[1].set(title=f"{data}, G={G}", xlabel="wall-clock (s)", ylabel="val bits/byte")
        row[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
