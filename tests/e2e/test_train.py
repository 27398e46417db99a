"""train.py as a user runs it: torchrun, 2 CPU ranks on gloo, real text (the built-in Shakespeare)."""
from __future__ import annotations

import json

import pytest

from helpers import FULL, run_train, run_train_single


@FULL  # a quality check of 100+ steps; every path it takes runs in the quick e2e runs
def test_short_run_learns_well_below_unigram_entropy(tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = run_train(["--steps", "300", "--seq-len", "64", "--lr", "1e-3", "--eval-every", "150",
              "--eval-batches", "16", "--no-progress", "--metrics", str(metrics)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # a normal run has nothing for the user to ignore: no Python warning, no scheduler start noise
    assert "Warning:" not in r.stderr + r.stdout, (r.stderr + r.stdout)[-3000:]
    assert "Attempting to get learning rate" not in r.stderr + r.stdout
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    evals = [x for x in recs if "val_bpb" in x]
    assert [x["step"] for x in steps] == list(range(300))
    assert all(set(x) == {"step", "loss", "tokens", "seconds", "train_seconds", "tokens_per_s", "lr"} for x in steps)
    assert all(0 < x["train_seconds"] <= x["seconds"] for x in steps)  # training time only, no evaluations
    assert all(x["tokens_per_s"] == pytest.approx(x["tokens"] / x["seconds"]) for x in steps)  # since the start
    assert steps[-1]["tokens"] == 300 * 8 * 4 * 64
    assert [x["step"] for x in evals] == [150, 300]
    # Shakespeare's byte unigram entropy is 4.77 bits/byte (printed at start-up): a model that
    # learned nothing past byte frequencies sits there. Measured here: about 4.1 after 300 steps.
    entropy = float(r.stdout.split("unigram_entropy=")[1].split()[0])
    assert 4.5 < entropy < 5.0
    assert evals[-1]["val_bpb"] < entropy - 0.4, (evals, entropy)
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]


def test_bad_input_is_one_clear_line(tmp_path):
    r = run_train_single(["--steps", "2", "--pipeline-parallel-size", "3", "--no-progress"])
    assert r.returncode == 2
    assert "error: --pipeline-parallel-size: 3 must divide the world size 1" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_train_single(["--steps", "2", "--data", str(tmp_path / "missing.txt"), "--no-progress"])
    assert r.returncode == 2 and "error:" in r.stderr and "missing.txt" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
