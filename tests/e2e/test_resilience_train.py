"""Resilience through train.py: bad input (in-process), preemption and resume, a killed rank."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import FULL, ROOT, launch_train
TINY = '{"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 32}'


def _config(tmp_path, **over) -> str:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2}},
           "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}
    cfg.update(over)
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


SYNC = 2  # synchronous first steps: every run here reaches the ring within a few steps


def _common(cfg, steps):
    return ["--deepspeed_config", cfg, "--model", TINY, "--seq-len", "16", "--max-bytes", "20000",
            "--eval-every", "0", "--eval-batches", "2", "--no-progress", "--steps", str(steps),
            "--sync-steps", str(SYNC)]


# ------------------------------------------------------------------ bad input, in-process
def _cli(argv, capsys, monkeypatch, world=None):
    import train

    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = train.cli(argv)
    return code, capsys.readouterr().err


def _bad_cases(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_bytes(b"to be or not")
    base = _config(tmp_path)
    return [
        # (argv, world, words the one line must contain)
        (["--pipeline-parallel-size", "3", "--model", TINY], 3, ["--pipeline-parallel-size: 3 exceeds", "2 blocks"]),
        (["--deepspeed_config", _config(tmp_path, gradient_accumulation_steps=0)], None,
         ["gradient_accumulation_steps must be an integer >= 1"]),
        (["--deepspeed_config", _config(tmp_path, zero_optimization={"stage": 2})], None,
         ["zero_optimization.stage 2", "set zero_optimization.stage to 0 or 1"]),
        (["--deepspeed_config", _config(tmp_path, zero_optimization={"stage": 3})], None, ["zero_optimization.stage 3"]),
        (["--deepspeed_config", _config(tmp_path, fp16={"enabled": True, "loss_scale": 1})], None,
         ["fp16.loss_scale 1", "0 (dynamic)"]),
        (["--data", str(tmp_path / "missing.txt")], None, ["--data", "missing.txt", "not found"]),
        (["--data", str(empty)], None, ["--data", "is empty"]),
        (["--data", str(short), "--seq-len", "16"], None, ["--data", "fewer than one", "longer text file"]),
        (["--seq-len", "64", "--model", TINY], None, ["--seq-len 64 exceeds", "n_positions=32"]),
        (["--pipeline-parallel-size", "2"], 3, ["--pipeline-parallel-size: 2 must divide the world size 3"]),
        (["--save-every", "5"], None, ["--save-every", "--save DIR"]),
        (["--load", str(tmp_path)], None, ["--load", "no 'latest' file"]),
        (["--comm-timeout", "0"], None, ["--comm-timeout: must be > 0"]),
        (["--paper", "--weight-prediction", "1"], None, ["--paper: the paper's update has no staleness mitigation"]),
        (["--weight-prediction", "-1", "--replay", "stash"], None, ["--weight-prediction: must be a number >= 0"]),
    ], base


def test_bad_input_one_line_each(tmp_path, capsys, monkeypatch):
    cases, base = _bad_cases(tmp_path)
    for argv, world, words in cases:
        if "--deepspeed_config" not in argv:
            argv = ["--deepspeed_config", base, *argv]
        code, err = _cli(["--no-progress", "--steps", "2", *argv], capsys, monkeypatch, world)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        for w in words:
            assert w in lines[0], (argv, w, lines[0])
        import torch.distributed as tdist
        assert not tdist.is_initialized(), f"{argv}: the check came after DeepSpeed started"


def test_bytes_mode_takes_any_bytes(tmp_path, capsys, monkeypatch):
    """A non-UTF-8 file trains in bytes mode (in-process, one rank, G = 1, 2 steps)."""
    import random

    rnd = random.Random(0)
    path = tmp_path / "binary.bin"
    path.write_bytes(bytes(rnd.randrange(256) for _ in range(20000)) + b"\xff\xfe\x80")
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    metrics = tmp_path / "m.jsonl"
    code, err = _cli([*_common(_config(tmp_path), 2), "--data", str(path), "--metrics", str(metrics)],
                     capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert len([x for x in metrics.read_text().splitlines() if '"loss"' in x]) == 2


# ------------------------------------------------------------------ processes
def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of a worker of this torchrun (its child with RANK=rank in its environment)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        children = open(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read().split()
        for pid in children:
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError("worker not found")


def _wait_for_steps(launcher, metrics, n, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and sum('"loss"' in x for x in metrics.read_text().splitlines()) >= n:
            return
        assert launcher.poll() is None, launcher.returncode
        time.sleep(0.05)
    raise AssertionError("no progress")


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def test_preempted_run_resumes_bitwise(tmp_path):
    """SIGUSR1 to rank 1 only: both ranks stop after the same step, save, exit 0; --load finishes
    the run with the uninterrupted run's losses (float repr in the metrics: bitwise). The stop
    falls after the synchronous steps, so the save holds a ring in flight (stashed inputs, error
    gradients not yet applied, the weights kept for prediction)."""
    steps = 100
    cfg = _config(tmp_path)
    ckpt = tmp_path / "ckpt"
    full_m, pre_m, res_m = tmp_path / "full.jsonl", tmp_path / "pre.jsonl", tmp_path / "res.jsonl"
    # the uninterrupted run, at the same time as the one to preempt (they share nothing)
    full = launch_train([*_common(cfg, steps), "--metrics", str(full_m)], stderr=subprocess.DEVNULL)
    # a requeued job's command line: --save and --load the same folder (the first launch has no save)
    pre = launch_train([*_common(cfg, steps), "--metrics", str(pre_m), "--save", str(ckpt), "--load", str(ckpt)])
    _wait_for_steps(pre, pre_m, 3)
    os.kill(_rank_pid(pre, 1), signal.SIGUSR1)
    out, err = pre.communicate(timeout=600)
    full.communicate(timeout=600)
    assert full.returncode == 0
    assert pre.returncode == 0, err[-3000:]
    assert f"no save in {ckpt} yet: starting from step 0" in out, out
    stopped = len(_losses(pre_m))
    assert SYNC < 3 <= stopped < steps, out
    assert "stopped by" in out and f"global_step{stopped}" in out, out
    assert (ckpt / "latest").read_text() == f"global_step{stopped}"

    res = launch_train([*_common(cfg, steps), "--metrics", str(res_m), "--save", str(ckpt), "--load", str(ckpt)])
    out, err = res.communicate(timeout=600)
    assert res.returncode == 0, err[-3000:]
    assert f"resumed from {ckpt} at step {stopped}" in out
    assert (ckpt / "latest").read_text() == f"global_step{steps}"
    a, b, c = _losses(full_m), _losses(pre_m), _losses(res_m)
    assert sorted(c) == list(range(stopped, steps))
    assert {**b, **c} == a, "the preempted + resumed losses differ from the uninterrupted run"


def test_killed_rank_ends_the_job_with_a_clear_error(tmp_path):
    """SIGKILL one rank mid-run: the job ends within a bounded time, nonzero, saying why."""
    metrics = tmp_path / "m.jsonl"
    job = launch_train([*_common(_config(tmp_path), 100000), "--metrics", str(metrics)])
    try:
        _wait_for_steps(job, metrics, 3)
        os.kill(_rank_pid(job, 1), signal.SIGKILL)
        t0 = time.time()
        out, err = job.communicate(timeout=90)
        took = time.time() - t0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert took < 60, took
    # rank 0 says it lost its peer (or torchrun stopped it first); torchrun names the killed rank
    assert "lost a peer" in err or "Signal 9" in err or "SIGKILL" in err, err[-3000:]
    print(f"job ended {took:.1f} s after the kill; rank 0 said: "
          f"{[x for x in err.splitlines() if 'lost a peer' in x][:1]}")


def _hung_worker(rank, out):
    """Rank 1 goes silent after two steps (alive, like a hung process); rank 0's next receive must
    give up after the process-group timeout instead of waiting forever."""
    import datetime

    import deepspeed
    import torch

    from helpers import batches, ds_config, feed, ring_engine

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=3))
    engine, _ = ring_engine(2, ds_config(1, 5))
    it = feed(engine, batches(5, 1))
    for _ in range(2):
        engine.train_batch(it)
    done = os.path.join(out, "rank0_done")
    if rank == 1:
        deadline = time.time() + 60
        while not os.path.exists(done) and time.time() < deadline:
            time.sleep(0.1)
        os._exit(0)  # no teardown: the peer's process group is broken
    t0 = time.time()
    try:
        engine.train_batch(it)
        result = "no error"
    except RuntimeError as e:
        result = str(e)
    torch.save({"error": result, "seconds": time.time() - t0}, os.path.join(out, "hung.pt"))
    open(done, "w").close()
    os._exit(0)


@FULL  # a lost peer: test_killed_rank_ends_the_job_with_a_clear_error; a stuck step: test_watchdog_ends_a_stuck_step
def test_hung_rank_times_out(tmp_path):
    """A silent peer: the ring's receive fails after the process-group timeout (3 s here), which
    train.py sets from --comm-timeout and turns into one 'lost a peer' line (see the kill test)."""
    import torch

    from helpers import run_ranks

    run_ranks(_hung_worker, 2, str(tmp_path), tmpdir=str(tmp_path), timeout=120, fresh=True)
    res = torch.load(tmp_path / "hung.pt")
    assert "Timed out" in res["error"], res
    assert 2.5 < res["seconds"] < 20, res
    print(f"rank 0 gave up {res['seconds']:.1f} s after its peer went silent: {res['error'][:200]}")


def test_watchdog_ends_a_stuck_step(tmp_path):
    """A step stuck outside communication: the watchdog ends the process with one line."""
    code = ("import sys, time; sys.path.insert(0, %r); from ouroboros_ds.train.resilience import Watchdog; "
            "w = Watchdog(1.0, 7); w.started = time.monotonic(); time.sleep(30)" % ROOT)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and time.time() - t0 < 15, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == ["error: rank 7: a training step made no progress for 1 s "
                                             "(--comm-timeout): a peer rank died or hung; exiting"]
