"""The benchmark's one-command table and the speed-related train.py flags, as a user runs them
(tiny model; the measured numbers are in docs/benchmarks.md)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import FULL, run_train, run_train_single, train_env


@FULL  # every configuration of the table also runs, on one process, in test_gpu_check
def test_bench_one_command_table(tmp_path):
    """The benchmark runs every configuration in one invocation and prints one table (tiny model),
    its ranks under the emulation of NCCL's point-to-point rules."""
    env = train_env()
    out = subprocess.run([sys.executable, "-m", "ouroboros_ds.tools.bench", "--model",
                          '{"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16}', "--seq-len", "16",
                          "--micro-batch-size", "2", "--rounds", "1", "--warmup", "0", "--steps", "1",
                          "--out", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("1f1b", "1f1b+ckpt", "dualpipev", "ouro-recompute", "ouro-stash", "ouro-bounded", "1proc-1thread",
                 "1proc-all"):
        assert f"| {name} |" in out.stdout, out.stdout
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")}
    for name in ("1f1b", "dualpipev", "ouro-stash", "ouro-bounded"):
        assert float(rows[name][9].split("/")[0]) > 0  # simulated utilization of stage 0
        assert float(rows[name][10].split("/")[0]) > 0  # measured peak activation memory of stage 0
        assert float(rows[name][11].split("/")[1]) > 0  # peak RSS of stage 1
    # the bounded plan holds less than keeping every graph
    assert float(rows["ouro-bounded"][10].split("/")[1]) < float(rows["ouro-stash"][10].split("/")[1])
    assert "replay plan (kept graphs per module)" in out.stdout


def test_train_flags_replay_stash_and_activation_checkpointing(tmp_path):
    """train.py --replay stash (2 ranks) and --schedule 1f1b --activation-checkpointing (2 ranks) run
    from the same seed to the same first loss; the start-up lines name the mode and the partition."""
    common = ["--steps", "2", "--seq-len", "32", "--model", "tiny", "--eval-batches", "1", "--eval-every", "0",
              "--max-bytes", "200000", "--no-progress"]
    firsts = []
    for extra in (["--replay", "stash", "--sync-steps", "1"], ["--schedule", "1f1b", "--activation-checkpointing"]):
        m = tmp_path / f"{extra[1]}.jsonl"
        r = run_train(common + extra + ["--metrics", str(m)], nproc=1 if extra[0] == "--schedule" else 2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        firsts.append(next(x for x in map(json.loads, m.read_text().splitlines()) if "loss" in x)["loss"])
        if extra[0] == "--replay":
            assert "replay=stash" in r.stdout and "partition fresh: blocks of modules 1..K" in r.stdout
            # the default's mitigations, with one synchronous step so that step 1 runs the ring
            assert "weight_prediction=1.0 lookahead=3.0 sync_steps=1 stage_clip=split" in r.stdout
        else:
            assert "activation_checkpointing=True" in r.stdout
    assert firsts[0] == pytest.approx(firsts[1], rel=1e-5)  # same weights, data and dropout masks


def test_train_flag_mismatch_is_one_clear_line():
    r = run_train_single(["--activation-checkpointing", "--steps", "1"])
    assert r.returncode == 2 and "error: --activation-checkpointing applies to --schedule 1f1b" in r.stderr
    assert "Traceback" not in r.stderr


@FULL  # DualPipeV through train.py: test_train_dualpipev_evaluates_any_count_of_validation_batches;
# stash through train.py: test_train_flags_replay_stash_and_activation_checkpointing
def test_train_dualpipev_same_first_loss_and_peak_memory(tmp_path):
    """--schedule dualpipev (DeepSpeed's DualPipeV, keyed dropout) starts from the same loss as the
    ring on the same seed; both write measured per-stage peak memory into the stage-stats records."""
    common = ["--steps", "2", "--seq-len", "32", "--model", "tiny", "--eval-batches", "4", "--eval-every", "0",
              "--max-bytes", "200000", "--no-progress", "--stage-stats-every", "1"]
    firsts = []
    for extra in (["--schedule", "dualpipev"], ["--replay", "stash", "--sync-steps", "1"]):
        m = tmp_path / f"{extra[1]}.jsonl"
        r = run_train(common + extra + ["--metrics", str(m)], nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        recs = [json.loads(x) for x in m.read_text().splitlines()]
        firsts.append(next(x for x in recs if "loss" in x)["loss"])
        stages = [x for x in recs if "stage" in x]
        assert {x["stage"] for x in stages} == {0, 1}
        assert all(x["peak_activation_bytes"] > 0 and x["peak_rss_bytes"] > 0 for x in stages), stages
        if extra[1] == "stash":
            assert "replay plan (kept graphs per module)" in r.stdout, r.stdout
    assert firsts[0] == pytest.approx(firsts[1], rel=1e-5)


def test_train_dualpipev_evaluates_any_count_of_validation_batches(tmp_path):
    """DualPipeV evaluates over --eval-batches micro-batches, not the training M (here 6 against
    M = 4): after one synchronous step its val loss is 1F1B's. Fewer than 2G is one clear line."""
    common = ["--steps", "1", "--seq-len", "32", "--model", "tiny", "--eval-batches", "6", "--max-bytes", "200000",
              "--no-progress"]
    vals = {}
    for schedule in ("dualpipev", "1f1b"):
        m = tmp_path / f"{schedule}.jsonl"
        r = run_train(common + ["--schedule", schedule, "--metrics", str(m)], nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        vals[schedule] = [json.loads(x)["val_loss"] for x in m.read_text().splitlines() if "val_loss" in x][-1]
    assert vals["dualpipev"] == pytest.approx(vals["1f1b"], rel=1e-5)
    r = run_train_single(["--schedule", "dualpipev", "--eval-batches", "1", "--steps", "1", "--model", "tiny"])
    assert r.returncode == 2 and "--eval-batches" in r.stderr and "2 x pipeline-parallel size = 2" in r.stderr
    assert "Traceback" not in r.stderr
