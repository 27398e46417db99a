"""Weight prediction for the stale modules (``weight_prediction``, ``ouroboros_ds/ring/prediction.py``
``LastUpdate``; optional, off by default).

- The rule itself: a fresh snapshot moves ``h`` last updates ahead, ``w + h (w - w_before)``.
- The engine with prediction equals the single-process Reference with prediction **bit for bit**
  (G = 2, M = 4 and G = 3, M = 1, dropout, clip, LR schedule), in both replay modes (features
  replay recomputes through the predicted snapshot), and differs from the run without it (the test
  is not blind); with delays 0 (synchronous) prediction changes nothing.
- Resume: the weights kept for the prediction (the last update, the snapshots in flight) are in
  the checkpoint; save after the warm-up, load in fresh processes, and the rest of the run equals
  the uninterrupted one bitwise, in both replay modes.
- Bad settings fail with the field's name.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from helpers import FULL, full, SEED, batches, ds_config, model_plan, paper, ring_engine, run_ranks, stage_parameters

H = 1.0  # horizon, as a multiple of each module's delay
T, SAVE_AT = 6, 3


def test_last_update_moves_a_fresh_snapshot_ahead():
    from ouroboros_ds.ring.prediction import LastUpdate
    from ouroboros_ds.ring.stash import Snapshot

    lin = torch.nn.Linear(3, 2)
    lu = LastUpdate(list(lin.parameters()))
    before = [p.detach().clone() for p in lin.parameters()]
    snap = Snapshot([lin])
    lu.predict(snap, 2.0)  # no update yet: no prediction
    assert all(torch.equal(c, p) for c, p in snap.live)
    lu.record()
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.5)  # "the optimizer step"
    snap = Snapshot([lin])
    lu.predict(snap, 2.0)
    for (c, p), b in zip(snap.live, before):
        assert torch.allclose(c, p + 2.0 * (p - b))
        assert torch.allclose(c, b + 1.5)
    assert all(torch.equal(p, b + 0.5) for p, b in zip(lin.parameters(), before))  # live weights untouched
    restored = LastUpdate(list(lin.parameters()))
    restored.load_state_dict(lu.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.before, lu.before))


def test_bad_settings_name_the_field():
    from ouroboros_ds.ring.reference import Reference
    from ouroboros_ds.models.gpt2 import lm_loss

    with pytest.raises(ValueError, match="weight_prediction: must be a number >= 0"):
        Reference(model_plan(), 2, ds_config(1, 4), lm_loss, ring=paper(replay="stash", weight_prediction=-1))


def _reference(G: int, M: int, steps: int, prediction: float, synchronous: bool = False, replay: str = "stash"):
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.reference import Reference

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        ref = Reference(model_plan(), G, ds_config(M, steps), lm_loss, seed=SEED, synchronous=synchronous,
                        ring=paper(replay=replay, weight_prediction=prediction))
        losses = [ref.step(b) for b in batches(steps, M)]
    finally:
        torch.set_num_threads(threads)
    return dict(ref.named_parameters()), losses


def worker(rank, G, M, ckpt, out, resume, replay):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    engine, mod = ring_engine(G, ds_config(M, T), replay=replay, weight_prediction=H)
    start = 0
    if resume:
        engine.load_ring_checkpoint(ckpt)
        start = engine.global_steps
    data = batches(T, M)[start:]
    it = iter([mb for step in data for mb in step]) if engine.stage_id == 0 else None
    losses, kept = [], None
    for _ in range(start, T):
        loss = engine.train_batch(it)
        losses.append(None if loss is None else loss.item())
        if ckpt and not resume and engine.global_steps == SAVE_AT:
            kept = engine.last_update.nbytes() + sum(s.nbytes() for s in engine.weight_stash.values())
            engine.save_ring_checkpoint(ckpt)
    torch.save({"losses": losses, "params": stage_parameters(mod), "start": start, "kept": kept},
               os.path.join(out, f"{'resume' if resume else 'full'}{rank}.pt"))


def _check_equals_reference(G, M, full, replay):
    ref, ref_losses = _reference(G, M, T, H, replay=replay)
    assert full[0]["losses"] == ref_losses  # floats from .item(): exact
    for r in full:
        for name, p in r["params"].items():
            assert torch.equal(p, ref[name].detach()), f"G={G} M={M} {name}: engine != reference"
    plain, _ = _reference(G, M, T, 0.0, replay=replay)
    assert any(not torch.equal(ref[n], plain[n]) for n in ref), "prediction changed nothing: the test is blind"


# with --full: the engine with prediction equals the Reference in test_engine_with_prediction_equals_reference_g3_m1
# and test_sync_steps (the default's mitigations); a resume with prediction: test_resilience_train's preemption test
@FULL
@pytest.mark.parametrize("replay", ("stash", "recompute"))
def test_engine_with_prediction_equals_reference_and_resumes_bitwise(tmp_path, replay):
    G, M = 2, 4
    ckpt = str(tmp_path / "ckpt")
    run_ranks(worker, G, G, M, ckpt, str(tmp_path), False, replay, tmpdir=str(tmp_path), timeout=300)
    full = [torch.load(tmp_path / f"full{r}.pt") for r in range(G)]
    _check_equals_reference(G, M, full, replay)
    run_ranks(worker, G, G, M, ckpt, str(tmp_path), True, replay, tmpdir=str(tmp_path), timeout=300, fresh=True)
    for r in range(G):
        res = torch.load(tmp_path / f"resume{r}.pt")
        assert res["start"] == SAVE_AT
        assert full[r]["kept"] > 0, f"rank {r}: no weights kept for the prediction: the resume test is blind"
        assert res["losses"] == full[r]["losses"][SAVE_AT:]
        for name, p in full[r]["params"].items():
            assert torch.equal(p, res["params"][name]), f"rank {r} {name}: resumed != uninterrupted"


# stash with prediction: test_sync_steps (G = 2, M = 4) runs it in the quick set
@pytest.mark.parametrize("replay", (full("stash", id="stash"), "recompute"))
def test_engine_with_prediction_equals_reference_g3_m1(tmp_path, replay):
    G, M = 3, 1
    run_ranks(worker, G, G, M, "", str(tmp_path), False, replay, tmpdir=str(tmp_path), timeout=300)
    _check_equals_reference(G, M, [torch.load(tmp_path / f"full{r}.pt") for r in range(G)], replay)


def test_prediction_is_a_no_op_without_delay():
    a, la = _reference(2, 4, 4, H, synchronous=True)
    b, lb = _reference(2, 4, 4, 0.0, synchronous=True)
    assert la == lb
    assert all(torch.equal(p, b[n]) for n, p in a.items())
