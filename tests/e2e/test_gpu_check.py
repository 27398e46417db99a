"""The GPU check's CPU fallback: tiny shapes, the engine at G = 1 bitwise equal to the Reference in
every replay mode (the default's weight prediction and look-ahead, the paper's update, stash, a
memory-bounded plan), and block costs that the (G, M) map reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_gpu_check_runs_on_cpu_and_feeds_the_map(tmp_path):
    out = tmp_path / "costs.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "ouroboros_ds.tools.gpu_check", "--tiny", "--out", str(out)], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = [line for line in r.stdout.splitlines() if line.startswith("engine vs Reference")]
    assert len(checks) == 4 and all(line.endswith("OK") and "bitwise True" in line for line in checks), checks
    assert any("prediction=1.0 lookahead=3.0" in line for line in checks), checks
    costs = json.loads(out.read_text())
    from ouroboros_ds.tools.speed_map import BlockCosts, build_map

    points = build_map(BlockCosts(**costs), 8, [2], [1, 4])
    assert {p.schedule for p in points} == {"1f1b", "1f1b+ckpt", "dualpipev", "ouro-recompute", "ouro-stash",
                                            "ouro-bounded"}
    assert all(p.tokens_per_s > 0 and p.peak > 0 for p in points)
