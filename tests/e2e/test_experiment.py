"""experiments/staleness.py end to end on a tiny grid (2 ranks, a few steps), and its table maths."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import FULL, ROOT
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import staleness as E  # noqa: E402


def test_at_time_and_flatness():
    r = {"steps": [10, 20, 30, 40], "bpb": [5.0, 4.0, 3.5, 3.4], "seconds": [1.0, 2.0, 3.0, 4.0]}
    assert E.at_time(r, 1.5) == pytest.approx(4.5)
    assert E.at_time(r, 4.0) == pytest.approx(3.4)
    assert E.at_time(r, 0.5) is None  # before the first evaluation: unknown, not extrapolated
    assert E.last_quarter_drop(r) == pytest.approx(3.5 - 3.4)  # from step 30 (75% of 40) to the end


@FULL  # the tool's runs under --out and their reuse: test_run_names
def test_grid_runs_tables_and_reuses(tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "staleness.py"), "--out", str(out), "--data", "shakespeare",
           "--stages", "2", "--runs", "1f1b", "ouro-m1", "ouro-m4-fresh-pred", "--steps", "4", "--eval-every", "2", "--micro-batch", "2",
           "--micro-batches", "2", "--seq-len", "32", "--eval-sequences", "8"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "results.md").read_text()
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| shakespeare")]
    assert [row[3].strip() for row in rows] == ["1f1b", "ouro-m1", "ouro-m4-fresh-pred"]
    assert rows[0][5].strip() == "+0.0%" and float(rows[1][4]) > 0
    assert (out / "staleness.png").stat().st_size > 0
    # the same 8 windows for both: 1f1b in 4 eval batches of 2, ouro-m1 in 2 of 4
    assert "--eval-batches 4" in r.stdout and "--eval-batches 2" in r.stdout
    assert "--partition fresh --replay stash --weight-prediction 1.0" in r.stdout  # the mitigation run gets its flags
    again = subprocess.run(cmd + ["--reuse"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing") == 3, again.stdout[-2000:]
    assert (out / "results.md").read_text().splitlines()[2:] == table.splitlines()[2:]
