"""python -m ouroboros_ds.tools.plot: loss vs step and vs wall-clock for several runs into a PNG."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT
from ouroboros_ds.tools.plot import load_run


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_load_run_joins_restarted_segments(tmp_path):
    recs = [{"step": 0, "delays": {"1": 1}},
            {"step": 0, "loss": 5.0, "tokens": 8, "seconds": 1.0, "lr": 0.1},
            {"step": 1, "loss": 4.0, "tokens": 16, "seconds": 2.0, "lr": 0.1},
            {"step": 2, "stage": 0, "dp_rank": 0, "in_flight_bytes": 10, "step_seconds": 1.0},
            {"step": 2, "val_loss": 3.9, "val_bpb": 5.6},
            # requeued: resumed at step 1, clock restarts
            {"step": 1, "loss": 4.1, "tokens": 16, "seconds": 0.5, "lr": 0.1},
            {"step": 2, "loss": 3.0, "tokens": 24, "seconds": 1.5, "lr": 0.1}]
    r = load_run(_write(tmp_path / "a.jsonl", recs))
    assert r["step"] == [0, 1, 2]
    assert r["loss"] == [5.0, 4.1, 3.0]
    assert r["seconds"] == [1.0, 2.5, 3.5]
    assert (r["val_step"], r["val_loss"]) == ([2], [3.9])


def test_cli_draws_two_runs_and_rejects_bad_input(tmp_path):
    a = _write(tmp_path / "ouroboros.jsonl", [{"step": i, "loss": 5 - i * 0.1, "seconds": 0.2 * (i + 1)}
                                              for i in range(20)] + [{"step": 20, "val_loss": 3.1}])
    b = _write(tmp_path / "1f1b.jsonl", [{"step": i, "loss": 5 - i * 0.12, "seconds": 0.3 * (i + 1)} for i in range(20)])
    out = tmp_path / "plots" / "loss.png"
    r = subprocess.run([sys.executable, "-m", "ouroboros_ds.tools.plot", a, b, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ouroboros (20 steps" in r.stdout and "1f1b (20 steps" in r.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image
    assert Image.open(out).size == (1320, 480)  # 11 x 4 inches at 120 dpi

    empty = _write(tmp_path / "empty.jsonl", [{"step": 0, "val_loss": 1.0}])
    r = subprocess.run([sys.executable, "-m", "ouroboros_ds.tools.plot", empty, "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no training records" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(FileNotFoundError):
        load_run(str(tmp_path / "missing.jsonl"))
