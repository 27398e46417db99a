"""The synchronous warm-up in the engine (``sync_steps``: the first steps run with every delay 0;
on by default, 50 steps; the rule is pinned on the Reference in tests/unit/test_reference.py).

- The engine with sync_steps = 3 and the default run's mitigations (weight prediction 1, module K's
  look-ahead 3) equals the single-process Reference with the same settings **bit for bit**: G in
  {1, 2, 3} (G = 1: modules 1 and K on one stage, local hand-offs), M in {1, 4}, features replay,
  and stash replay in some cases; dropout, clip, LR schedule. Each run lasts until every module has
  paused after the synchronous steps (delay(k) steps, as at the start of a run) and stepped again.
  The Reference without the warm-up differs (the test is not blind).
- After a synchronous step no state is held between steps (every replay ran in its own step).
- With features replay a synchronous step backprops the graphs its forwards kept (as many as
  stock 1F1B's memory allows) and recomputes only the others.
- ZeRO-1: the warm-up hook keeps module 1 still during the pause after the synchronous steps, as
  the plain optimizer does, and the run follows the Reference.
- Resume: saves after step 1 (inside the synchronous steps) and after the last synchronous step
  (the first ring step comes next), loaded in fresh processes: the rest of the run equals the uninterrupted one bitwise. A run
  with another sync_steps refuses the checkpoint.
- ``initialize``: None reads the config's ``"ouroboros"`` object, the paper's switch turns it off,
  the 1F1B baseline refuses the argument and ignores the object.
"""
from __future__ import annotations

import datetime
import json
import os

import pytest
import torch

from helpers import (FULL, full, batches, ds_config, initialize_reads, reference_run, ring_engine, run_once, run_ranks,
                     stage_parameters)

# Three synchronous steps: step 0's LR is 0 (WarmupCosineLR), so step 2 is the first with a last
# update to look ahead along (a look-ahead wrongly taken in a synchronous step shows).
SYNC, L, H = 3, 3.0, 1.0  # synchronous steps; look-ahead and weight-prediction horizons (the default run's)
CLIP = "split"  # the default run's per-stage clip
G_VALUES, M_VALUES = (1, 2, 3), (1, 4)
STASH = {2: (4,), 3: (1,)}  # stash replay as well for these (G: Ms)
RESUME_G, RESUME_M, SAVES = 2, 4, (1, SYNC)  # saved inside the synchronous steps and right after them


def steps_of(G: int) -> int:
    """The synchronous steps, module 1's pause of G steps, and two of its delayed updates."""
    return SYNC + G + 2


def _cases(G):
    return [("recompute", M) for M in M_VALUES] + [("stash", M) for M in STASH.get(G, ())]


def _engine(G, M, replay, sync_steps=SYNC, zero=0):
    cfg = ds_config(M, steps_of(G))
    if zero:
        cfg["zero_optimization"] = {"stage": zero}
    return ring_engine(G, cfg, replay=replay, weight_prediction=H, lookahead=L, sync_steps=sync_steps,
                       stage_clip=CLIP)


def _feed(engine, G, M, start):
    data = batches(steps_of(G), M)[start:]
    return iter([mb for step in data for mb in step]) if engine.stage_id == 0 else None


def _held(engine) -> int:
    """Entries of in-flight state held between steps (stashed inputs, error gradients, snapshots, graphs)."""
    return sum(len(getattr(engine, name)) for name in ("stash", "grads_in", "weight_stash", "graphs"))


def _train(G, M, replay, ckpt=None, zero=0):
    from ouroboros_ds.ring.warmup import FIRST_STEP, ring_param_groups

    engine, mod = _engine(G, M, replay, zero=zero)
    # stage 0's parameters that only module 1 uses (wpe, its blocks; the tied wte also moves through module K)
    module1 = [p for g in ring_param_groups(mod) if g[FIRST_STEP] == G for p in g["params"]] \
        if engine.stage_id == 0 else []
    it, losses, held, synchronous, moved = _feed(engine, G, M, 0), [], [], [], []
    forwards, res_forwards = _count_forwards(mod), {}
    for _ in range(steps_of(G)):
        forwards.clear()
        before = [p.detach().clone() for p in module1]
        loss = engine.train_batch(it)
        losses.append(None if loss is None else loss.item())
        synchronous.append(engine.step_synchronous)
        held.append(_held(engine))
        if engine.global_steps == 2:  # a synchronous step with a last update: module k's forwards in it
            res_forwards = dict(forwards)
        moved.append(any(not torch.equal(a, p) for a, p in zip(before, module1)))
        if ckpt and engine.global_steps in SAVES:
            engine.save_ring_checkpoint(os.path.join(ckpt, f"at{engine.global_steps}"))
    return {"losses": losses, "params": stage_parameters(mod), "stage": engine.stage_id, "held": held,
            "synchronous": synchronous, "module1_moved": moved, "optimizer": type(engine.optimizer).__name__,
            "forwards": res_forwards, "sync_kept": engine.sync_kept, "blocks": mod.blocks_per_module()}


def _count_forwards(mod) -> dict:
    """Counts module k's forward passes (each forward and each recomputation) in ``{k: n}``."""
    calls, inner = {}, mod.forward_module

    def counted(k, x):
        calls[k] = calls.get(k, 0) + 1
        return inner(k, x)
    mod.forward_module = counted
    return calls


def worker(rank, G, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    ckpt = os.path.join(out, "ckpt") if G == RESUME_G else ""
    res = {(replay, M): _train(G, M, replay, os.path.join(ckpt, replay) if ckpt and M == RESUME_M else None)
           for replay, M in _cases(G)}
    if G == RESUME_G:
        res["zero1"] = _train(G, RESUME_M, "recompute", zero=1)
    if G == 1:
        res["initialize"] = initialize_reads(1, "sync_steps", 5, 3, lambda e: e.sync_steps,
                                             lambda e: getattr(e, "sync_steps", None), bad=-1)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def resume_worker(rank, out, ckpt):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    G, M, res = RESUME_G, RESUME_M, {}
    engine, _ = _engine(G, M, "recompute", sync_steps=0)
    try:
        engine.load_ring_checkpoint(os.path.join(ckpt, "recompute", f"at{SAVES[0]}"))
        res["refused"] = None
    except ValueError as e:
        res["refused"] = str(e)
    for replay, _ in [c for c in _cases(G) if c[1] == M]:
        for at in SAVES:
            engine, mod = _engine(G, M, replay)
            engine.load_ring_checkpoint(os.path.join(ckpt, replay, f"at{at}"))
            start, losses = engine.global_steps, []
            it = _feed(engine, G, M, start)
            for _ in range(start, steps_of(G)):
                loss = engine.train_batch(it)
                losses.append(None if loss is None else loss.item())
            res[(replay, at)] = {"start": start, "losses": losses, "params": stage_parameters(mod)}
    torch.save(res, os.path.join(out, f"resume{rank}.pt"))


# ------------------------------------------------------------------ the runs, once per G
@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    return lambda G: run_once(tmp_path_factory, f"sync_g{G}", worker, G)


def _reference(G, M, replay, sync_steps):
    return reference_run(G, M, steps_of(G), replay=replay, weight_prediction=H, lookahead=L, sync_steps=sync_steps,
                         stage_clip=CLIP)


# quick: G = 2 (its stash run at M = 4 included); G = 1 and 3 with --full
@pytest.mark.parametrize("G", [full(G, id=f"G{G}") if G != 2 else pytest.param(G, id=f"G{G}") for G in G_VALUES])
def test_engine_with_sync_steps_equals_reference(ring_run, G):
    _, ranks = ring_run(G)
    for replay, M in _cases(G):
        what = f"G={G} M={M} replay={replay}"
        runs = [r[(replay, M)] for r in ranks]
        assert [r["stage"] for r in runs] == list(range(G))
        ref, ref_losses = _reference(G, M, replay, SYNC)
        assert runs[0]["losses"] == ref_losses, what  # floats from .item(): exact
        for r in runs:
            for name, p in r["params"].items():
                assert torch.equal(p, ref[name].detach()), f"{what} {name}: engine != reference"
        ring, ring_losses = _reference(G, M, replay, 0)
        assert ring_losses[:1] == ref_losses[:1]  # step 0: the same loss, whatever comes next
        assert ring_losses != ref_losses and any(not torch.equal(ref[n], ring[n]) for n in ref), \
            f"{what}: sync_steps changed nothing: the test is blind"


def test_a_synchronous_step_keeps_its_graphs_within_1f1b_memory(ring_run):
    """Features replay: a synchronous step's replay backprops the forward's own graph where stock
    1F1B's memory allows (``synchronous_kept``), and recomputes only the other micro-batches; the
    update stays the Reference's (test_engine_with_sync_steps_equals_reference)."""
    from ouroboros_ds.ring.memory import synchronous_kept

    _, ranks = ring_run(2)
    for M in M_VALUES:
        for r in ranks:
            run = r[("recompute", M)]
            kept = synchronous_kept(run["blocks"], M)
            assert run["sync_kept"] == kept
            local = [k for k in run["forwards"] if k < len(run["blocks"])]  # module K runs its losses once
            assert local and all(run["forwards"][k] == 2 * M - kept[k] for k in local), (M, run["forwards"], kept)
    # the test model (blocks [1, 2, 1]) at M = 4 keeps some graphs and recomputes others
    assert synchronous_kept([1, 2, 1], 4) == {1: 3, 2: 2}
    # stash replay keeps its own graphs
    assert ranks[0][("stash", 4)]["sync_kept"] == {}


def _module1_moves(G) -> list:
    """Steps at which module 1 moves: not at step 0 (WarmupCosineLR's LR is 0 there), nor in its pause."""
    return [0 < t and not SYNC <= t < SYNC + G for t in range(steps_of(G))]


@pytest.mark.parametrize("G", G_VALUES, ids=lambda g: f"G{g}")
def test_nothing_is_held_after_a_synchronous_step(ring_run, G):
    _, ranks = ring_run(G)
    for replay, M in _cases(G):
        for r in ranks:
            run = r[(replay, M)]
            assert run["synchronous"] == [t < SYNC for t in range(steps_of(G))]
            assert run["held"][:SYNC] == [0] * SYNC, f"G={G} M={M} {replay} stage {run['stage']}: {run['held']}"
            # from the first ring step on, every stage stashes for its delayed modules
            assert all(n > 0 for n in run["held"][SYNC:]), run["held"]
        # module 1 moves during the synchronous steps, keeps still for G steps, then moves again
        moved = ranks[0][(replay, M)]["module1_moved"]
        assert moved == _module1_moves(G), f"G={G} M={M} {replay}: {moved}"


def test_zero1_keeps_module_1_still_after_the_synchronous_steps(ring_run):
    _, ranks = ring_run(RESUME_G)
    G, M = RESUME_G, RESUME_M
    runs = [r["zero1"] for r in ranks]
    assert {r["optimizer"] for r in runs} == {"DeepSpeedZeroOptimizer"}
    # ZeRO turns the missing gradients into zeros: the hook must drop them again in the pause
    assert runs[0]["module1_moved"] == _module1_moves(G), runs[0]["module1_moved"]
    ref, ref_losses = _reference(G, M, "recompute", SYNC)
    torch.testing.assert_close(torch.tensor(runs[0]["losses"]), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    for r in runs:
        for name, p in r["params"].items():
            torch.testing.assert_close(p, ref[name].detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# a save after the synchronous steps, resumed in the ring: test_resilience_train's preemption test;
# a save inside them: this test, with --full
@FULL
def test_resume_with_sync_steps_is_bitwise(ring_run, tmp_path):
    out, full = ring_run(RESUME_G)
    ckpt = os.path.join(out, "ckpt")
    for at in SAVES:
        with open(os.path.join(ckpt, "recompute", f"at{at}", "latest")) as f:
            tag = f.read().strip()
        with open(os.path.join(ckpt, "recompute", f"at{at}", tag, "ouroboros_meta.json")) as f:
            assert json.load(f)["sync_steps"] == SYNC
    run_ranks(resume_worker, RESUME_G, str(tmp_path), ckpt, tmpdir=str(tmp_path), timeout=300, fresh=True)
    for r in range(RESUME_G):
        res = torch.load(tmp_path / f"resume{r}.pt")
        assert res["refused"] and f"sync_steps: checkpoint {SYNC}, this run 0" in res["refused"], res["refused"]
        for replay, _ in [c for c in _cases(RESUME_G) if c[1] == RESUME_M]:
            uninterrupted = full[r][(replay, RESUME_M)]
            for at in SAVES:
                got = res[(replay, at)]
                assert got["start"] == at
                assert got["losses"] == uninterrupted["losses"][at:], f"rank {r} {replay} saved at {at}"
                for name, p in uninterrupted["params"].items():
                    assert torch.equal(p, got["params"][name]), \
                        f"rank {r} {replay} saved at {at} {name}: resumed != uninterrupted"


def test_initialize_reads_sync_steps_like_lookahead(ring_run):
    _, ranks = ring_run(1)
    init = ranks[0]["initialize"]
    assert init["object"] == 5  # the config's "ouroboros" object
    assert init["argument"] == 3  # ring=RingConfig(sync_steps=3)
    assert init["paper"] == 0  # the paper's update has no synchronous steps
    assert init["none"] == 100  # neither: RingConfig()'s default, train.py's too
    assert init["bad"].startswith("sync_steps: must be an integer >= 0"), init["bad"]
    _assert_one_source(init)


def _assert_one_source(init):
    """Only one of ring= and the object may set the ring's options; the paper's switch takes no
    mitigation; the 1F1B engine ignores a shared config's object and refuses ring=."""
    assert init["both"].startswith("ring= and the config's \"ouroboros\" object both set"), init["both"]
    assert "the paper's update has no staleness mitigation" in init["paper and option"], init["paper and option"]
    assert init["baseline, object"] is None
    assert init["baseline, argument"].startswith("ring / replay_plan: only an OuroborosPipelineModule"), \
        init["baseline, argument"]
