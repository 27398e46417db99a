"""Module K's look-ahead in the engine (``lookahead``, ``ouroboros_ds/ring/prediction.py`` ``look_ahead``; on by
default, with weight prediction; its closed form is pinned in tests/unit/test_lookahead_rule.py).

- The engine with lookahead 3 and weight prediction 1 (the default run's horizons) equals the
  single-process Reference with both **bit for bit**: G in {1, 2, 3} (G = 1: modules 1 and K on one
  stage), M in {1, 4}, both replay modes, dropout, clip, LR schedule; one launch per G. The
  Reference without the look-ahead differs (the test is not blind).
- Resume: module K's last update is in the checkpoint (and counted in ``in_flight_bytes``); save
  after the warm-up, load in fresh processes (both replay modes in one launch), and the rest of
  the run equals the uninterrupted one bitwise. A run without the look-ahead refuses the checkpoint.
- ``initialize``: None reads the config's ``"ouroboros"`` object (as for weight prediction), the
  paper's switch turns it off, the 1F1B baseline refuses the argument and ignores the object.
- A NaN loss: dropping the micro-batch equals giving it a zero gradient, bit for bit, and a step
  whose only loss is NaN leaves module K exactly where it was (the look-ahead is undone).
"""
from __future__ import annotations

import datetime
import json
import os

import pytest
import torch

from helpers import (FULL, full, batches, ds_config, initialize_reads, reference_run, ring_engine, run_once, run_ranks,
                     stage_parameters, steps_for)

L, H = 3.0, 1.0  # look-ahead and weight-prediction horizons: the default run's
G_VALUES, M_VALUES, REPLAYS = (1, 2, 3), (1, 4), ("recompute", "stash")
RESUME_G, RESUME_M, SAVE_AT = 2, 4, 3
BAD_BATCH, BAD_MB = 3, 2  # after step 0 (lr 0) and step 1: module K has a last update to look along


def _engine(G, M, replay, lookahead=L, loss_fn=None):
    return ring_engine(G, ds_config(M, steps_for(G)), replay=replay, weight_prediction=H, lookahead=lookahead,
                       loss_fn=loss_fn)


def _feed(engine, G, M, start):
    data = batches(steps_for(G), M)[start:]
    return iter([mb for step in data for mb in step]) if engine.stage_id == 0 else None


def _train(G, M, replay, ckpt=None):
    engine, mod = _engine(G, M, replay)
    it, losses, kept = _feed(engine, G, M, 0), [], None
    for _ in range(steps_for(G)):
        loss = engine.train_batch(it)
        losses.append(None if loss is None else loss.item())
        if ckpt and engine.global_steps == SAVE_AT:
            kept = _kept(engine)
            engine.save_ring_checkpoint(ckpt)
    return {"losses": losses, "params": stage_parameters(mod), "stage": engine.stage_id, "kept": kept}


def _kept(engine):
    """(bytes of module K's last update, what in_flight_bytes counts for it) on stage 0; None elsewhere."""
    if engine.k_update is None:
        return None
    with_k = engine.in_flight_bytes()
    ku, engine.k_update = engine.k_update, None
    try:
        return ku.nbytes(), with_k - engine.in_flight_bytes()
    finally:
        engine.k_update = ku


def _nonfinite(M, mode):
    """A NaN (or, to compare, zero) loss at (BAD_BATCH, BAD_MB of M), G = 2, recompute."""
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.prediction import own_parameters

    calls, bad = [0], (BAD_BATCH, min(BAD_MB, M - 1))

    def loss_fn(out, labels):
        loss = lm_loss(out, labels)
        t, j = divmod(calls[0], M)
        calls[0] += 1
        return loss * (float("nan") if mode == "nan" else 0.0) if (t, j) == bad else loss

    G = RESUME_G
    engine, mod = _engine(G, M, "recompute", loss_fn=loss_fn)
    own = own_parameters(mod.module_funcs[G + 1]) if engine.stage_id == 0 else []
    it, snaps = _feed(engine, G, M, 0), []
    for _ in range(steps_for(G)):
        snaps.append([p.detach().clone() for p in own])
        engine.train_batch(it)
    snaps.append([p.detach().clone() for p in own])
    return {"params": stage_parameters(mod), "snaps": snaps, "events": list(engine.nonfinite_events)}


def worker(rank, G, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    ckpt = os.path.join(out, "ckpt") if G == RESUME_G else ""
    res = {(replay, M): _train(G, M, replay, os.path.join(ckpt, replay) if ckpt and M == RESUME_M else None)
           for replay in REPLAYS for M in M_VALUES}
    if G == RESUME_G:
        res["nonfinite"] = {("nan", 4): _nonfinite(4, "nan"), ("zero", 4): _nonfinite(4, "zero"),
                            ("nan", 1): _nonfinite(1, "nan")}
    if G == 1:
        res["initialize"] = initialize_reads(1, "lookahead", "auto", 2.0, lambda e: (e.lookahead, e.k_update is not None),
                                             lambda e: getattr(e, "lookahead", None), bad="far")
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def resume_worker(rank, out, ckpt):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    G, M, res = RESUME_G, RESUME_M, {}
    engine, _ = _engine(G, M, "recompute", lookahead=0.0)
    try:
        engine.load_ring_checkpoint(os.path.join(ckpt, "recompute"))
        res["refused"] = None
    except ValueError as e:
        res["refused"] = str(e)
    for replay in REPLAYS:
        engine, mod = _engine(G, M, replay)
        engine.load_ring_checkpoint(os.path.join(ckpt, replay))
        start, losses = engine.global_steps, []
        it = _feed(engine, G, M, start)
        for _ in range(start, steps_for(G)):
            loss = engine.train_batch(it)
            losses.append(None if loss is None else loss.item())
        res[replay] = {"start": start, "losses": losses, "params": stage_parameters(mod)}
    torch.save(res, os.path.join(out, f"resume{rank}.pt"))


# ------------------------------------------------------------------ the runs, once per G
@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    return lambda G: run_once(tmp_path_factory, f"lookahead_g{G}", worker, G)


def _reference(G, M, replay, lookahead):
    return reference_run(G, M, steps_for(G), replay=replay, weight_prediction=H, lookahead=lookahead)


# quick: G = 2 (G = 1 and 3 run their paths in test_equivalence / test_sync_steps)
@pytest.mark.parametrize("G", [full(G, id=f"G{G}") if G != 2 else pytest.param(G, id=f"G{G}") for G in G_VALUES])
def test_engine_with_lookahead_equals_reference(ring_run, G):
    _, ranks = ring_run(G)
    for replay in REPLAYS:
        for M in M_VALUES:
            what = f"G={G} M={M} replay={replay}"
            runs = [r[(replay, M)] for r in ranks]
            assert [r["stage"] for r in runs] == list(range(G))
            ref, ref_losses = _reference(G, M, replay, L)
            assert runs[0]["losses"] == ref_losses, what  # floats from .item(): exact
            for r in runs:
                for name, p in r["params"].items():
                    assert torch.equal(p, ref[name].detach()), f"{what} {name}: engine != reference"
            plain, plain_losses = _reference(G, M, replay, 0.0)
            assert plain_losses != ref_losses and any(not torch.equal(ref[n], plain[n]) for n in ref), \
                f"{what}: the look-ahead changed nothing: the test is blind"


@FULL  # a resumed default run (look-ahead auto) is pinned by test_resilience_train's preemption test
def test_resume_with_lookahead_is_bitwise(ring_run, tmp_path):
    out, full = ring_run(RESUME_G)
    ckpt = os.path.join(out, "ckpt")
    with open(os.path.join(ckpt, "recompute", "latest")) as f:
        tag = f.read().strip()
    with open(os.path.join(ckpt, "recompute", tag, "ouroboros_meta.json")) as f:
        assert json.load(f)["lookahead"] == L
    k_bytes, counted = full[0][("recompute", RESUME_M)]["kept"]
    assert k_bytes > 0 and counted == k_bytes, "module K's last update is not counted in in_flight_bytes"
    assert full[1][("recompute", RESUME_M)]["kept"] is None  # only stage 0 holds module K
    run_ranks(resume_worker, RESUME_G, str(tmp_path), ckpt, tmpdir=str(tmp_path), timeout=300, fresh=True)
    for r in range(RESUME_G):
        res = torch.load(tmp_path / f"resume{r}.pt")
        assert res["refused"] and f"lookahead: checkpoint {L}, this run 0.0" in res["refused"], res["refused"]
        for replay in REPLAYS:
            uninterrupted = full[r][(replay, RESUME_M)]
            assert res[replay]["start"] == SAVE_AT
            assert res[replay]["losses"] == uninterrupted["losses"][SAVE_AT:], f"rank {r} {replay}"
            for name, p in uninterrupted["params"].items():
                assert torch.equal(p, res[replay]["params"][name]), f"rank {r} {replay} {name}: resumed != uninterrupted"


def test_nan_loss_with_lookahead(ring_run):
    _, ranks = ring_run(RESUME_G)
    for r, res in enumerate(ranks):
        nan, zero = res["nonfinite"][("nan", 4)], res["nonfinite"][("zero", 4)]
        for name, p in nan["params"].items():
            assert torch.isfinite(p).all(), f"rank {r}: {name} is not finite"
            assert torch.equal(p, zero["params"][name]), f"rank {r}: {name} differs from the zero-gradient run"
        assert any(e["what"] in ("loss", "error gradient") for e in nan["events"])
    # M = 1: the NaN loss is the step's only one, so module K has no gradient at that step; it was
    # looked ahead during the step (its last update is not zero) and must come back exactly
    snaps = ranks[0]["nonfinite"][("nan", 1)]["snaps"]
    assert snaps[BAD_BATCH] and all(torch.equal(a, b) for a, b in zip(snaps[BAD_BATCH], snaps[BAD_BATCH + 1]))
    assert any(not torch.equal(a, b) for a, b in zip(snaps[BAD_BATCH - 1], snaps[BAD_BATCH]))
    assert any(not torch.equal(a, b) for a, b in zip(snaps[BAD_BATCH + 1], snaps[BAD_BATCH + 2]))


def test_initialize_reads_lookahead_like_weight_prediction(ring_run):
    _, ranks = ring_run(1)
    init = ranks[0]["initialize"]
    assert init["object"] == (1.0, True)  # the config's "ouroboros" object; "auto" at G = 1: 2G - 1
    assert init["argument"] == (2.0, True)  # ring=RingConfig(lookahead=2.0)
    assert init["paper"] == (0.0, False)  # the paper's update never looks ahead
    assert init["none"] == (1.0, True)  # neither: RingConfig()'s default "auto", train.py's too
    assert init["baseline, object"] is None  # the ring's default does not reach the 1F1B engine
    assert init["baseline, argument"].startswith("ring / replay_plan: only an OuroborosPipelineModule")
    assert "the paper's update has no staleness mitigation" in init["paper and option"]
    assert init["bad"].startswith("lookahead: must be 'auto' (2G - 1 updates, at most 5 with the delay-scaled lr) or a number >= 0"), init["bad"]
