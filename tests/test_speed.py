"""Speed: the simulator at scale, the tied-weight cycle bound, the balanced partition,
and the benchmark's one-command table (tiny model; the real numbers are in docs/benchmarks.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ouroboros_ds.module import balanced_blocks_per_module, layer_costs, ring_partition, stage_costs_of
from ouroboros_ds.schedule import num_modules, ouroboros_schedule
from ouroboros_ds.simulate import balanced_costs, cycle_bound, scale_table, simulate, steady_steps


def steady(G, M, costs):
    w = steady_steps(G)
    tl = simulate(ouroboros_schedule(G, M), costs, steps=w.stop)
    return tl, w


@pytest.mark.parametrize("G", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("M", [1, 2, 4, 8])
def test_schedule_meets_the_cycle_bound(G, M):
    """With balanced costs the schedule's steady-state period is exactly the lower bound that no
    order of work can beat (the stage's own work, or the tied-weight chain F1 -> ... -> L -> STEP)."""
    costs = balanced_costs(G)
    tl, w = steady(G, M, costs)
    period, util_bound = cycle_bound(G, M, costs)
    periods = [tl.period(s, w) for s in range(G)]
    assert max(periods) == pytest.approx(period, rel=1e-9)
    assert min(tl.steady_utilization(w)) == pytest.approx(util_bound, rel=1e-9)


def test_g8_utilization_target_and_the_m1_bound():
    """The target is utilization >= 0.95 at G = 8 for every M. It holds from M = 4 on; at M = 1 and
    2 the tied-weight cycle forbids it for any schedule: (f + b) / (sum of forwards + loss)."""
    costs = balanced_costs(8)
    for M in (4, 8, 16, 32):
        tl, w = steady(8, M, costs)
        assert min(tl.steady_utilization(w)) >= 0.95
    K = num_modules(8)
    chain = sum(costs.forward[k] for k in range(1, K)) + costs.loss
    assert cycle_bound(8, 1, costs)[1] == pytest.approx(1.0 / chain)
    assert cycle_bound(8, 1, costs)[1] < 0.44 and cycle_bound(8, 2, costs)[1] < 0.73


def test_period_leaves_out_the_stage_skew():
    """The window over all stages (Timeline.utilization) includes the stagger between stages; the
    per-stage period does not: 2 stages, no bubble, every stage busy all the time."""
    tl, w = steady(2, 4, balanced_costs(2))
    assert min(tl.steady_utilization(w)) == pytest.approx(1.0)
    assert min(tl.utilization(w)) < 1.0


def test_scale_table_rows():
    table = scale_table([2, 8], balanced_costs)
    assert "| 8 | 1 | 2.321 | 0.431 | 0.431 | 8.000 |" in table
    assert "| 8 | 32 | 32.000 | 1.000 | 1.000 | 39.000 | 1.219 | 1.219 |" in table
    assert sum(1 for line in table.splitlines() if line.startswith("| 2 |")) == 4  # M = 1, 2, 4, 8


def test_balanced_partition_lowers_the_most_loaded_stage():
    costs = layer_costs(256, 256, 128)
    for G, L in ((2, 8), (3, 8), (4, 8), (8, 16)):
        for replay in ("recompute", "stash"):
            bpm = balanced_blocks_per_module(L, G, costs, replay)
            bounds = ring_partition(L + 3, list(range(1, L + 1)), G, bpm)  # a valid explicit partition
            assert len(bounds) == G + 1 and sum(bpm) == L
            authors = [b - a for a, b in ring_partition(L + 3, list(range(1, L + 1)), G)]
            authors = [authors[0] - 1] + authors[1:-1] + [authors[-1] - 2]  # blocks only
            assert max(stage_costs_of(bpm, costs, replay)) <= max(stage_costs_of(authors, costs, replay))
    # the head and loss are on stage 0: at G=2 in recompute mode it takes fewer, cheaper blocks
    bpm = balanced_blocks_per_module(8, 2, costs, "recompute")
    assert bpm == [0, 3, 5]
    assert stage_costs_of([0, 3, 5], costs)[0] - 5 * 3 * costs["block"] == pytest.approx(3 * costs["head"])


def test_fresh_partition_moves_stage0_blocks_out_of_the_stalest_module():
    """--partition fresh: the same most-loaded-stage work as balanced, module 1 gets no block that
    module K could take; the other stages' blocks are not moved."""
    for dims in ((64, 256, 128), (256, 256, 128)):
        costs = layer_costs(*dims)
        for G, L in ((2, 4), (2, 8), (3, 8), (4, 8)):
            for replay in ("recompute", "stash"):
                bal = balanced_blocks_per_module(L, G, costs, replay)
                fresh = balanced_blocks_per_module(L, G, costs, replay, fresh=True)
                assert max(stage_costs_of(fresh, costs, replay)) == pytest.approx(max(stage_costs_of(bal, costs, replay)))
                assert fresh[0] == 0 and sum(fresh) == L, (G, L, replay, fresh)
    # the tiny model of docs/staleness.md at G = 2: [1, 2, 1] (one block of delay 2) -> [0, 2, 2]
    tiny = layer_costs(64, 256, 128)
    assert balanced_blocks_per_module(4, 2, tiny, "stash") == [1, 2, 1]
    assert balanced_blocks_per_module(4, 2, tiny, "stash", fresh=True) == [0, 2, 2]


def test_bench_one_command_table(tmp_path):
    """The benchmark runs every configuration in one invocation and prints one table (tiny model)."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
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


def _train(args, world=2, timeout=300):
    from ring import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(free_port()), os.path.join(root, "train.py"), *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_flags_replay_stash_and_activation_checkpointing(tmp_path):
    """train.py --replay stash (2 ranks) and --schedule 1f1b --activation-checkpointing (2 ranks) run
    from the same seed to the same first loss; the start-up lines name the mode and the partition."""
    common = ["--steps", "2", "--seq-len", "32", "--model", "tiny", "--eval-batches", "1", "--eval-every", "0",
              "--max-bytes", "200000", "--no-progress"]
    firsts = []
    for extra in (["--replay", "stash"], ["--schedule", "1f1b", "--activation-checkpointing"]):
        m = tmp_path / f"{extra[1]}.jsonl"
        r = _train(common + extra + ["--metrics", str(m)], world=1 if extra[0] == "--schedule" else 2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        firsts.append(next(x for x in map(json.loads, m.read_text().splitlines()) if "loss" in x)["loss"])
        if extra[0] == "--replay":
            assert "replay=stash" in r.stdout and "partition balanced: blocks of modules 1..K" in r.stdout
        else:
            assert "activation_checkpointing=True" in r.stdout
    assert firsts[0] == pytest.approx(firsts[1], rel=1e-5)  # same weights, data and dropout masks


def test_train_flag_mismatch_is_one_clear_line():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    r = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--activation-checkpointing", "--steps", "1"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: --activation-checkpointing applies to --schedule 1f1b" in r.stderr
    assert "Traceback" not in r.stderr
