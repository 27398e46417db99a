"""experiments/train_speed.py: the series through train.py, its table, and its measurement maths."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import train_speed as T  # noqa: E402


def test_speed_is_tokens_over_train_seconds_after_the_skipped_steps(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"step": 0, "delays": {}}] + [{"step": s, "loss": 1.0, "tokens": 100 * (s + 1), "train_seconds": t}
                                          for s, t in enumerate([5.0, 6.0, 8.0, 9.0, 10.0])]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok_s, median = T.measure(str(path), 2)  # steps 2..4: 300 tokens in 10.0 - 6.0 s
    assert tok_s == pytest.approx(300 / 4.0) and median == pytest.approx(1.0)


def test_a_series_through_train_py(tmp_path):
    out = tmp_path / "table.md"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train_speed.py"), "-M", "2", "--model", "tiny",
           "--seq-len", "32", "--micro-batch-size", "2", "--steps", "4", "--skip", "1", "--keep", str(tmp_path / "runs"),
           "--out", str(out), "--jobs", "ring=--sync-steps 0", "1f1b=--schedule 1f1b",
           "dualpipev=--schedule dualpipev"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| 2 |")]
    assert [c[2].strip() for c in rows] == ["ring", "1f1b"]  # DualPipeV needs M >= 2G: left out
    assert rows[0][5].strip() == "1.000x" and all(float(c[3].replace(",", "")) > 0 for c in rows)
    # each job ran with its own flags (train.py's start-up line)
    assert "schedule=ouroboros" in (tmp_path / "runs" / "m2_ring_r0.log").read_text()
    assert "sync_steps=0 " in (tmp_path / "runs" / "m2_ring_r0.log").read_text()
    assert "schedule=1f1b" in (tmp_path / "runs" / "m2_1f1b_r0.log").read_text()


def test_bad_jobs_name_the_flag():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train_speed.py"), "--jobs", "nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--jobs: 'nope' must be name=flags" in r.stderr
