"""Resume in stash replay mode: the checkpoint holds the weight snapshots by value, the kept
graphs are rebuilt from stashed input + snapshot + dropout key, and the resumed run equals the
uninterrupted one bitwise (G = 2, M = 4, saved after the warm-up with snapshots in flight)."""
from __future__ import annotations

import datetime
import os

import torch

from helpers import batches, ds_config, ring_engine, run_ranks, stage_parameters

G, M, T, SAVE_AT = 2, 4, 6, 3


def _engine():

    return ring_engine(G, ds_config(M, T), replay="stash")


def _feed(engine, start):
    return iter([mb for step in batches(T, M)[start:] for mb in step]) if engine.stage_id == 0 else None


def worker(rank, ckpt, out, resume):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    engine, mod = _engine()
    start = 0
    if resume:
        engine.load_ring_checkpoint(ckpt)
        start = engine.global_steps
    it, losses, snaps = _feed(engine, start), [], None
    for _ in range(start, T):
        loss = engine.train_batch(it)
        losses.append(None if loss is None else loss.item())
        if not resume and engine.global_steps == SAVE_AT:
            snaps = len(engine.weight_stash)
            engine.save_ring_checkpoint(ckpt)
    torch.save({"losses": losses, "params": stage_parameters(mod), "start": start, "snaps": snaps},
               os.path.join(out, f"{'resume' if resume else 'full'}{rank}.pt"))


def test_stash_mode_resume_is_bitwise(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_ranks(worker, G, ckpt, str(tmp_path), False, tmpdir=str(tmp_path), timeout=300)
    run_ranks(worker, G, ckpt, str(tmp_path), True, tmpdir=str(tmp_path), timeout=300, fresh=True)
    for r in range(G):
        full = torch.load(tmp_path / f"full{r}.pt")
        res = torch.load(tmp_path / f"resume{r}.pt")
        assert res["start"] == SAVE_AT
        assert full["snaps"] > 0, f"rank {r}: no weight snapshot in flight at the save: the test is blind"
        assert res["losses"] == full["losses"][SAVE_AT:]
        for name, p in full["params"].items():
            assert torch.equal(p, res["params"][name]), f"rank {r} {name}"
