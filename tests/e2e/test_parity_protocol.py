"""experiments/parity.py: the lr-fair judging on made-up curves, and the protocol end to end on a few steps."""
from __future__ import annotations

import os
import subprocess
import sys


from helpers import FULL, ROOT
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import parity as P  # noqa: E402

PRED = '{"weight_prediction": 1.0}'
SYNC = '{"weight_prediction": 1.0, "sync_steps": 2}'


def _run(variant, lr, seed, bpb, G=2, M=4):
    job = dict(data="shakespeare", G=G, M=M, variant=variant, lr=lr, seed=seed, steps=4, model="tiny", seq_len=128)
    return (variant, lr, seed, G), dict(job=job, steps=[2, 4], bpb=list(bpb), seconds=[1.0, 2.0], train_loss=[0.0, 0.0])


def _rows(table):
    return {row[4].strip(): [c.strip() for c in row[1:-1]]
            for row in (line.split("|") for line in table.splitlines() if line.startswith("| shakespeare"))}


def test_each_schedule_is_judged_at_its_own_best_lr():
    args = P.parse_args(["--out", "x", "--data", "shakespeare", "--stages", "2", "3", "--micro-batches", "4",
                         "--variants", "1f1b", "default", PRED, SYNC, "--lrs", "1e-3", "2e-3", "--steps", "4"])
    results = dict([
        _run("1f1b", 1e-3, 0, [4.0, 3.0]), _run("1f1b", 1e-3, 1, [4.0, 3.2]),   # mean 3.1
        _run("1f1b", 2e-3, 0, [4.0, 2.8]), _run("1f1b", 2e-3, 1, [4.0, 3.0]),   # mean 2.9: 1F1B's best
        _run("default", 1e-3, 0, [4.0, 3.045]), _run("default", 1e-3, 1, [4.0, 3.045]),  # its best: +5%
        _run("default", 2e-3, 0, [4.5, 3.2]), _run("default", 2e-3, 1, [4.5, 3.2]),
        _run(PRED, 2e-3, 0, [3.4, 2.4]),  # reaches 2.9 at step 2 + 2 x 0.5 / 1.0 = 3
        _run(SYNC, 2e-3, 0, [3.4, 2.4]),  # the same curve, its first two steps synchronous
        _run("1f1b", 2e-3, 0, [4.0, 2.8], G=3),  # filed under G = 3 too, as main() files a synchronous run
    ])
    table, rows, _ = P.summarize(args, results)
    by = _rows(table)
    assert by["1f1b"][5:8] == ["0.002", "2.9000 (±0.1000)", "+0.00%"]
    assert by["1f1b"][8] == "4"  # the mean curve reaches its own final at the last evaluation
    assert by["default"][4] == "0.001: 3.0450, 0.002: 3.2000"
    assert by["default"][5:9] == ["0.001", "3.0450 (±0.0000)", "+5.00%", "-"]  # never reaches 1F1B's final
    ratio = P.STEP_TIMES["ouro-recompute"] / P.STEP_TIMES["1f1b"]
    assert by[PRED][8] == "3" and by[PRED][9] == f"{3 * ratio / 4:.2f}x"  # steps x step-time ratio, over 1F1B's 4
    # synchronous steps fill and drain and recompute, as 1F1B with checkpointing: counted at its step time
    sync_time = (2 * P.STEP_TIMES["1f1b+ckpt"] + 1 * P.STEP_TIMES["ouro-recompute"]) / (4 * P.STEP_TIMES["1f1b"])
    assert by[SYNC][8] == "3" and by[SYNC][9] == f"{sync_time:.2f}x" and by[SYNC][9] != by[PRED][9]
    # the same update with stash replay (tiny model, G = 2: the same split in both modes): its step times
    stash_time = (2 * P.STEP_TIMES["1f1b"] + 1 * P.STEP_TIMES["ouro-stash"]) / (4 * P.STEP_TIMES["1f1b"])
    assert by[SYNC][12] == f"{stash_time:.2f}x" and by[PRED][12] == f"{3 * P.STEP_TIMES['ouro-stash'] / (4 * P.STEP_TIMES['1f1b']):.2f}x"
    assert by["1f1b"][12] == "-" and by["default"][12] == "-"  # synchronous; never reaches 1F1B's final
    assert by[PRED][11] == "-"  # no DualPipeV step time given
    assert [r["G"] for r in rows] == [2, 2, 2, 2]  # G = 3: no ring variant ran, so no cell (1F1B alone is no comparison)


def test_speed_map_step_times_price_the_synchronous_steps(tmp_path):
    """--speed-map: simulated step times per (G, M), the ring's synchronous step (``ouro-sync``)
    included, over the defaults; DualPipeV's time where it runs."""
    import json

    points = [dict(schedule="1f1b", G=2, M=4, step_time=10.0), dict(schedule="dualpipev", G=2, M=4, step_time=8.0),
              dict(schedule="1f1b+ckpt", G=2, M=4, step_time=15.0),
              dict(schedule="ouro-recompute", G=2, M=4, step_time=5.0, sync_step_time=11.0),
              dict(schedule="ouro-recompute", G=4, M=4, step_time=1.0, sync_step_time=2.0)]
    (tmp_path / "map.json").write_text(json.dumps(points))
    assert P.map_step_times(str(tmp_path / "map.json"))[(2, 4)]["ouro-sync"] == 11.0
    args = P.parse_args(["--out", "x", "--data", "shakespeare", "--stages", "2", "--micro-batches", "4",
                         "--variants", "1f1b", SYNC, "--lrs", "2e-3", "--steps", "4", "--speed-map",
                         str(tmp_path / "map.json")])
    results = dict([_run("1f1b", 2e-3, 0, [4.0, 2.8]), _run(SYNC, 2e-3, 0, [3.4, 2.4])])
    table, _, _ = P.summarize(args, results)
    by = _rows(table)
    # 3.2 steps to 1F1B's final: 2 synchronous at 11 s, 1.2 ring steps at 5 s; against 4 x 10 s (1F1B), 4 x 8 s (DualPipeV)
    assert by[SYNC][8] == "3" and by[SYNC][9] == f"{28 / 40:.2f}x" and by[SYNC][11] == f"{28 / 32:.2f}x"
    assert "G=2 M=4" in table and "G=4 M=4" not in table  # the ratios of the table's cells only


def test_stash_column_only_where_stash_is_the_same_update():
    """Stash replay equals features replay bit for bit only with weight prediction and the same block split."""
    job = dict(data="shakespeare", model="tiny", seq_len=128, G=2)
    assert P.stash_is_same_update(job, P.variant_options("default"))
    assert not P.stash_is_same_update(job, P.variant_options("paper"))  # no prediction: another update
    assert not P.stash_is_same_update(job, P.variant_options("1f1b"))
    assert not P.stash_is_same_update(job, P.variant_options("stash-pred-fresh"))  # already stash
    g3 = {**job, "G": 3}  # the balanced split moves blocks out of the replayed modules in recompute mode
    fresh = {"partition": "fresh"}
    assert P.blocks_per_module(g3, fresh, "recompute", 256) != P.blocks_per_module(g3, fresh, "stash", 256)
    assert not P.stash_is_same_update(g3, P.variant_options("default"))


def test_the_default_and_the_default_without_the_delay_scaled_lr():
    """'default' is RingConfig()'s options (the delay-scaled lr 'auto'); 'default-no-stale-lr' differs in
    that option alone, so the two compare it with everything else equal."""
    import dataclasses

    from ouroboros_ds.ring.config import RingConfig

    default, without = P.variant_options("default"), P.variant_options("default-no-stale-lr")
    assert default == dataclasses.asdict(RingConfig()) and default["stale_lr_scale"] == "auto"
    assert {k for k in default if default[k] != without[k]} == {"stale_lr_scale"} and without["stale_lr_scale"] == 0


@FULL  # parity.py's runs under --raw and their reuse: test_run_names
def test_protocol_runs_tables_and_reuses(tmp_path):
    out, raw = tmp_path / "out", tmp_path / "raw"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "parity.py"), "--out", str(out), "--raw", str(raw),
           "--data", "shakespeare", "--micro-batches", "4", "--seeds", "0", "--lrs", "2e-3", "--steps", "4",
           "--eval-every", "2", "--eval-sequences", "32", "--jobs", "1", "--variants", "1f1b", "default", "paper"]
    r = subprocess.run(cmd + ["--stages", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "results.md").read_text()
    by = _rows(table)
    assert set(by) == {"1f1b", "default", "paper"} and by["1f1b"][7] == "+0.00%"
    # the paper's ring is not the synchronous run (the default's first 50 steps are synchronous)
    assert float(by["paper"][6].split()[0]) != float(by["1f1b"][6].split()[0])
    assert (out / "parity.png").stat().st_size > 0 and len(list(raw.glob("*.json"))) == 3
    again = subprocess.run(cmd + ["--stages", "2", "3", "--table-only"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "3 runs reused, 0 to run" in again.stdout, again.stdout[-2000:]
    assert (out / "results.md").read_text().splitlines()[2:] == table.splitlines()[2:]  # no G = 3 cell: not run


def test_bad_arguments_name_the_flag(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "parity.py"), "--out", str(tmp_path)]
    r = subprocess.run(cmd + ["--variants", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--variants: 'nope'" in r.stderr
    r = subprocess.run(cmd + ["--eval-sequences", "33"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--eval-sequences" in r.stderr
