"""Draw training loss against steps and against wall-clock for one or several runs.

    python -m ouroboros_ds.tools.plot runs/ouroboros.jsonl runs/1f1b.jsonl --out loss.png

Reads the JSON lines ``train.py --metrics`` writes (``{"step", "loss", "seconds", ...}`` per
step, ``{"step", "val_loss", ...}`` per evaluation; other records are skipped). A file appended
to by a restarted run (a Slurm requeue) holds several segments whose ``seconds`` restart at 0:
wall-clock is laid end to end over the segments, and a step seen twice keeps its last value.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def load_run(path: str) -> dict:
    """``{"step", "loss", "seconds", "val_step", "val_loss"}`` lists of one metrics file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; give metrics files written by train.py --metrics")
    train, val = {}, {}
    offset = last = 0.0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not a JSON line") from None
            if "loss" in rec and "seconds" in rec:
                if rec["seconds"] < last:  # a new segment (restarted run): continue its clock
                    offset += last
                last = rec["seconds"]
                train[rec["step"]] = (rec["loss"], offset + rec["seconds"])
            elif "val_loss" in rec:
                val[rec["step"]] = rec["val_loss"]
    if not train:
        raise ValueError(f"{path}: no training records ({{'step', 'loss', 'seconds'}}); "
                         "is it a train.py --metrics file?")
    steps = sorted(train)
    return {"step": steps, "loss": [train[s][0] for s in steps], "seconds": [train[s][1] for s in steps],
            "val_step": sorted(val), "val_loss": [val[s] for s in sorted(val)]}


def draw(runs: dict[str, dict], out: str, title: str | None = None) -> str:
    """Two panels, loss vs step and loss vs seconds, one line per run; validation as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, (label, r) in enumerate(runs.items()):
        color = f"C{i}"
        a.plot(r["step"], r["loss"], color=color, lw=1, label=label)
        b.plot(r["seconds"], r["loss"], color=color, lw=1, label=label)
        if r["val_step"]:
            # A val record's step counts steps done (s), a train record's is 0-based: eval "s"
            # follows the train record s - 1, in steps and in time.
            a.plot([s - 1 for s in r["val_step"]], r["val_loss"], "o", color=color, ms=4, label=f"{label} (val)")
            when = dict(zip(r["step"], r["seconds"]))
            pts = [(when[s - 1], v) for s, v in zip(r["val_step"], r["val_loss"]) if s - 1 in when]
            if pts:
                b.plot(*zip(*pts), "o", color=color, ms=4)
    a.set_xlabel("step")
    b.set_xlabel("wall-clock (s)")
    a.set_ylabel("loss (nats/token)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ouroboros_ds.tools.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", help="JSON-lines files from train.py --metrics")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--labels", nargs="+", default=None, help="one label per file (default: file names)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        if args.labels and len(args.labels) != len(args.metrics):
            raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.metrics)} files")
        labels = args.labels or [os.path.splitext(os.path.basename(m))[0] for m in args.metrics]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two runs have the same label {labels}; give --labels")
        runs = {lab: load_run(m) for lab, m in zip(labels, args.metrics)}
        draw(runs, args.out, args.title)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{k} ({len(r['step'])} steps, final loss {r['loss'][-1]:.4f})"
                                          for k, r in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
