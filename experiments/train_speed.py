"""Speed through `train.py`, as users run it: tokens/s of several jobs in one series.

Each job is `train.py` with the same DeepSpeed config, model, shape and M, plus its own flags; the
jobs run one after the other, alternating, `--rounds` times, so every ratio comes from one series
on one machine. A job's speed is its tokens over its `train_seconds` (the time inside
`train_batch`, from its `--metrics` file) after the first `--skip` steps; the table gives the best
round (and every round), the ratio to the first job, and the median step time.

    python experiments/train_speed.py -M 4 2 1 --model small --seq-len 256 --steps 14 --rounds 1 \\
        --jobs "default=--sync-steps 0" "synchronous=--sync-steps 100" "1f1b=--schedule 1f1b" \\
               "dualpipev=--schedule dualpipev"

`--sync-steps 0` measures the ring's steady state, `--sync-steps` larger than `--steps` its
synchronous warm-up steps. DualPipeV needs M >= 2G and is left out below that. Each job is
launched with `torch.distributed.run` (one rank per stage, `--stages` ranks), one torch thread
per rank as `train.py` sets it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", nargs="+", required=True, help='"name=train.py flags" (the first is the ratios\' base)')
    p.add_argument("-M", "--micro-batches", nargs="+", type=int, default=[4], help="gradient_accumulation_steps")
    p.add_argument("--deepspeed_config", default=os.path.join(ROOT, "ds_configs", "ouroboros.json"))
    p.add_argument("--micro-batch-size", type=int, default=None, help="train_micro_batch_size_per_gpu (default: the config's)")
    p.add_argument("--model", default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--stages", type=int, default=2, help="G: ranks, one stage each")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--skip", type=int, default=3, help="steps left out of the measurement (start-up)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--master-port", type=int, default=29650)
    p.add_argument("--keep", default=None, help="folder for each run's metrics and log (default: a temporary one)")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    jobs = []
    for j in args.jobs:
        name, sep, flags = j.partition("=")
        if not sep or not name.strip():
            p.error(f"--jobs: {j!r} must be name=flags, e.g. 'default=--sync-steps 0'")
        jobs.append((name.strip(), shlex.split(flags)))
    args.jobs = jobs
    if args.skip + 2 > args.steps:
        p.error(f"--steps {args.steps}: needs at least --skip + 2 = {args.skip + 2} steps to measure")
    return args


def measure(metrics: str, skip: int) -> tuple[float, float]:
    """(tokens/s after ``skip`` steps, median step seconds) from a train.py metrics file."""
    rows = [r for r in map(json.loads, open(metrics)) if "train_seconds" in r]
    a, b = rows[skip - 1], rows[-1]
    steps = [rows[i]["train_seconds"] - rows[i - 1]["train_seconds"] for i in range(skip, len(rows))]
    return (b["tokens"] - a["tokens"]) / (b["train_seconds"] - a["train_seconds"]), statistics.median(steps)


def run_job(args, folder: str, name: str, flags: list, M: int, rnd: int, port: int) -> tuple[float, float] | None:
    with open(args.deepspeed_config) as f:
        cfg = json.load(f)
    cfg["gradient_accumulation_steps"] = M
    if args.micro_batch_size:
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    stem = os.path.join(folder, f"m{M}_{name}_r{rnd}")
    with open(stem + ".ds.json", "w") as f:
        json.dump(cfg, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.stages), "--master_port",
           str(port), os.path.join(ROOT, "train.py"), "--deepspeed_config", stem + ".ds.json", "--model", args.model,
           "--seq-len", str(args.seq_len), "--data", args.data, "--steps", str(args.steps), "--eval-every", "0",
           "--no-progress", "--metrics", stem + ".jsonl", *flags]
    with open(stem + ".log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(f"{name} (M = {M}, round {rnd + 1}) failed with exit code {rc}; see {stem}.log", file=sys.stderr)
        return None
    return measure(stem + ".jsonl", args.skip)


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = args.keep or tempfile.mkdtemp(prefix="train_speed_")
    os.makedirs(folder, exist_ok=True)
    res: dict = {}  # (M, name) -> [(tokens/s, median step)]
    port = args.master_port
    for rnd in range(args.rounds):
        for M in args.micro_batches:
            for name, flags in args.jobs:
                if "dualpipev" in flags and M < 2 * args.stages:
                    continue  # DeepSpeed's DualPipeV needs M >= 2G
                port += 1
                r = run_job(args, folder, name, flags, M, rnd, port)
                if r is not None:
                    res.setdefault((M, name), []).append(r)
                    print(f"M = {M} {name}: {r[0]:,.0f} tokens/s", flush=True)
    base = args.jobs[0][0]
    lines = [f"`python experiments/train_speed.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}`", "",
             f"| M | job | tokens/s (best of {args.rounds}) | every round | vs {base} | median step (s) |",
             "|---|---|---|---|---|---|"]
    for M in args.micro_batches:
        ref = max((r[0] for r in res.get((M, base), [])), default=None)
        for name, _ in args.jobs:
            runs = res.get((M, name))
            if not runs:
                continue
            best = max(r[0] for r in runs)
            ratio = f"{best / ref:.3f}x" if ref else "-"
            lines.append(f"| {M} | {name} | {best:,.0f} | {', '.join(f'{r[0]:,.0f}' for r in runs)} | {ratio} "
                         f"| {statistics.median(r[1] for r in runs):.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0 if res else 1


if __name__ == "__main__":
    sys.exit(main())
