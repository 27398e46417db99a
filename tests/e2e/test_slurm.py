"""launch_scripts/ouroboros.sbatch on a real single-node Slurm: the job trains on 2 ranks
and writes its metrics; SIGUSR1 to the batch shell (what ``--signal=B:USR1@180`` sends before the
time limit) makes the ranks save, the job requeue, and the requeued run resume from the save.

Needs root and Debian's slurm-wlm + munge (``.ci/slurm_setup.sh`` installs them; ``.ci/run``
calls it and sets OUROBOROS_REQUIRE_SLURM=1, so in CI a missing Slurm fails instead of skipping).
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from slurm_cluster import LocalSlurm, missing_binaries

from helpers import FULL, ROOT
STEPS = 24


@pytest.fixture
def slurm(tmp_path):
    missing = missing_binaries()
    if missing or os.geteuid() != 0:
        why = f"Slurm not installed ({', '.join(missing)}); run .ci/slurm_setup.sh" if missing else "needs root"
        if os.environ.get("OUROBOROS_REQUIRE_SLURM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    cluster = LocalSlurm(str(tmp_path / "slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _segments(path):
    """The metrics file's training records, split where a new launch's clock restarts."""
    segs = []
    for line in open(path):
        rec = json.loads(line)
        if "loss" in rec:
            if not segs or rec["seconds"] < segs[-1][-1]["seconds"]:
                segs.append([])
            segs[-1].append(rec)
    return segs


@FULL  # needs a Slurm; .ci/run installs one and runs --full
def test_sbatch_trains_writes_metrics_and_requeues_on_usr1(slurm, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(slurm.env, PYTHON=sys.executable, OUROBOROS_DIR=ROOT, RUN_DIR=str(run_dir), OMP_NUM_THREADS="1",
               HF_DATASETS_OFFLINE="1")
    # A launcher's variables left in this process by an earlier in-process run (train.main sets a
    # world of one) would reach the job: the sbatch script must choose its own rendezvous.
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    # 2 tasks, even on a 2-core node; -O (overcommit) so a busy machine does not leave it pending.
    sub = slurm.run(["sbatch", "--parsable", "-O", "--chdir", str(tmp_path), "--output", str(tmp_path / "job.out"),
                     os.path.join(ROOT, "launch_scripts", "ouroboros.sbatch"),
                     "--steps", str(STEPS), "--sync-steps", "2", "--seq-len", "32", "--max-bytes", "200000",
                     "--eval-every", "12",
                     "--eval-batches", "2", "--stage-stats-every", "12"], env=env)
    job = sub.stdout.strip().split(";")[0]
    metrics = run_dir / "metrics.jsonl"

    # Running and training: wait for a few steps in the metrics, then "preempt" it.
    slurm.wait_job(job, lambda j: j["JobState"] in ("RUNNING", "COMPLETED", "FAILED"), 60, "RUNNING")
    end = time.time() + 180
    while time.time() < end and not (metrics.exists() and sum(1 for _ in open(metrics)) >= 4):
        assert slurm.job(job)["JobState"] == "RUNNING", (slurm.job(job), _read(tmp_path / "job.out"))
        time.sleep(0.2)
    assert metrics.exists(), _read(tmp_path / "job.out")
    slurm.run(["scancel", "-s", "USR1", "-b", job])

    info = slurm.wait_job(job, lambda j: j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED")
                          and j.get("Restarts") == "1", 300, "COMPLETED after one requeue")
    out = _read(tmp_path / "job.out")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out[-3000:])
    assert "caught SIGUSR1" in out and "restart 1 on" in out, out[-3000:]

    segs = _segments(metrics)
    assert len(segs) == 2, [len(x) for x in segs]
    first, second = segs
    # The ranks agreed on a stop step, saved, and the requeued launch resumed right there: every
    # step trained and logged exactly once, across the two launches.
    assert 1 <= len(first) < STEPS
    stop = first[-1]["step"] + 1
    assert f"resumed from {run_dir / 'checkpoint'} at step {stop}" in out, out[-3000:]
    assert "stopped by SIGUSR1" in out, out[-3000:]
    assert [r["step"] for r in first + second] == list(range(STEPS))
    recs = [json.loads(x) for x in open(metrics)]
    assert [r["step"] for r in recs if "val_bpb" in r][-1] == STEPS
    assert second[-1]["loss"] < first[0]["loss"] - 0.3, (first[0], second[-1])


def _read(path):
    return open(path).read() if os.path.exists(path) else f"({path} not written)"
