"""The benchmark's one-command table and the speed-related train.py flags, as a user runs them
(tiny model; the measured numbers are in docs/benchmarks.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, run_train, run_train_single


def test_bench_one_command_table(tmp_path):
    """The benchmark runs every configuration in one invocation and prints one table (tiny model)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "ouroboros_ds.bench", "--model",
                          '{"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16}', "--seq-len", "16",
                          "--micro-batch-size", "2", "--rounds", "1", "--warmup", "0", "--steps", "1",
                          "--out", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("1f1b", "1f1b+ckpt", "ouro-recompute", "ouro-stash", "1proc-1thread", "1proc-all"):
        assert f"| {name} |" in out.stdout, out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("| ouro-stash |")).split("|")
    assert float(row[8].split("/")[0]) > 0  # simulated utilization of stage 0
    assert float(row[11].split("/")[0]) > 0  # weight snapshots held on stage 0


def test_train_flags_replay_stash_and_activation_checkpointing(tmp_path):
    """train.py --replay stash (2 ranks) and --schedule 1f1b --activation-checkpointing (2 ranks) run
    from the same seed to the same first loss; the start-up lines name the mode and the partition."""
    common = ["--steps", "2", "--seq-len", "32", "--model", "tiny", "--eval-batches", "1", "--eval-every", "0",
              "--max-bytes", "200000", "--no-progress"]
    firsts = []
    for extra in (["--replay", "stash"], ["--schedule", "1f1b", "--activation-checkpointing"]):
        m = tmp_path / f"{extra[1]}.jsonl"
        r = run_train(common + extra + ["--metrics", str(m)], nproc=1 if extra[0] == "--schedule" else 2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        firsts.append(next(x for x in map(json.loads, m.read_text().splitlines()) if "loss" in x)["loss"])
        if extra[0] == "--replay":
            assert "replay=stash" in r.stdout and "partition fresh: blocks of modules 1..K" in r.stdout
            assert "weight_prediction=1.0" in r.stdout  # the default mitigation (docs/parity.md)
        else:
            assert "activation_checkpointing=True" in r.stdout
    assert firsts[0] == pytest.approx(firsts[1], rel=1e-5)  # same weights, data and dropout masks


def test_train_flag_mismatch_is_one_clear_line():
    r = run_train_single(["--activation-checkpointing", "--steps", "1"])
    assert r.returncode == 2 and "error: --activation-checkpointing applies to --schedule 1f1b" in r.stderr
    assert "Traceback" not in r.stderr
