"""The paper's recipe (ds_configs/paper.json + --model xl-base) runs as documented, with the
paper's optimizer and a cosine schedule that ends at 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import FULL, ROOT


@FULL  # the paper's update through the flags: test_ring_config; Transformer-XL in the ring: test_xl
def test_paper_recipe_runs_with_the_papers_schedule(tmp_path):
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "paper.json")))
    opt = cfg["optimizer"]["params"]
    assert (cfg["optimizer"]["type"], opt["lr"], opt["betas"], opt["eps"], cfg["gradient_clipping"]) == \
        ("Adam", 2.5e-4, [0.9, 0.999], 1e-8, 0.25)
    metrics = tmp_path / "m.jsonl"
    steps = 4
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--deepspeed_config",
                        os.path.join(ROOT, "ds_configs", "paper.json"), "--model", "xl-base", "--seq-len", "16",
                        "--steps", str(steps), "--eval-every", "0", "--eval-batches", "1", "--max-bytes", "200000",
                        "--no-progress", "--metrics", str(metrics)],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "layers=12 d=512" in r.stdout
    lrs = [x["lr"] for x in map(json.loads, metrics.read_text().splitlines()) if "lr" in x]
    # no warm-up ramp (DeepSpeed needs 2 warm-up steps; they start at ratio 1), then cosine to 0
    assert lrs == pytest.approx([2.5e-4, 2.5e-4, 1.25e-4, 0.0], abs=1e-12)
