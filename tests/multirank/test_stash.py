"""The weight-stashing replay mode (``replay="stash"``).

- The engine in stash mode equals the single-process Reference in stash mode **bit for bit**
  (every parameter, every loss) for G in {1, 2, 3} x M in {1, 4}, with dropout, clipping and an
  LR schedule, as test_equivalence.py does for features replay. Midway the engine drops its
  cache of kept graphs (what a restore from a checkpoint does); it rebuilds them from the stashed
  input, the weight snapshot and the dropout key, and stays bitwise equal.
- Stashed state is bounded as docs/ring.md#memory says: after step t module k < K holds the inputs, the
  kept graphs and one weight snapshot for each of the last min(t + 1, K - k) batches; module K none.
- Stash mode is a different update (gradient at the forward's weights) except in the synchronous
  limit, where it equals features replay bit for bit.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from helpers import batches, ds_config, feed, model_plan, paper, ring_engine, run_ranks, stage_parameters, steps_for

SEED = 3
M_VALUES = (1, 4)


def worker(rank: int, G: int, Ms: tuple, out: str) -> None:
    import deepspeed


    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    steps = steps_for(G)
    results = {}
    for M in Ms:
        engine, mod = ring_engine(G, ds_config(M, steps), replay="stash")
        it = feed(engine, batches(steps, M))
        losses, state = [], []
        for t in range(steps):
            loss = engine.train_batch(it)
            losses.append(None if loss is None else loss.item())
            state.append({"stash": sorted(engine.stash), "graphs": sorted(engine.graphs),
                          "snapshots": sorted(engine.weight_stash), "memory": engine.stash_memory()})
            if t == steps // 2:
                engine.graphs.clear()  # as after a restore: the cache is rebuilt on demand
        results[M] = {"losses": losses, "state": state, "params": stage_parameters(mod), "stage": engine.stage_id,
                      "local_modules": list(mod.local_modules)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


_RUNS: dict = {}


@pytest.fixture(scope="module")
def stash_run(tmp_path_factory):
    def get(G: int) -> list:
        if G not in _RUNS:
            out = str(tmp_path_factory.mktemp(f"stash_g{G}"))
            _RUNS[G] = None
            run_ranks(worker, G, G, M_VALUES, out, tmpdir=out, timeout=300)
            _RUNS[G] = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(G)]
        if _RUNS[G] is None:
            pytest.fail(f"the G={G} stash run failed (see the first test of G={G})")
        return _RUNS[G]
    return get


def _reference(G: int, M: int, replay: str = "stash", synchronous: bool = False):
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.reference import Reference

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        ref = Reference(model_plan(), G, ds_config(M, steps_for(G)), lm_loss, seed=SEED, synchronous=synchronous,
                        ring=paper(replay=replay))
        losses = [ref.step(b) for b in batches(steps_for(G), M)]
    finally:
        torch.set_num_threads(threads)
    return ref, losses


@pytest.mark.parametrize("M", M_VALUES, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("G", (1, 2, 3), ids=lambda g: f"G{g}")
def test_stash_engine_equals_reference_bitwise(stash_run, G, M):
    ranks = [r[M] for r in stash_run(G)]
    ref, ref_losses = _reference(G, M)
    assert ranks[0]["losses"] == ref_losses  # floats from .item(): exact
    assert all(x is None for r in ranks[1:] for x in r["losses"])
    ref_params = dict(ref.named_parameters())
    names = [n for r in ranks for n in r["params"]]
    assert sorted(names) == sorted(ref_params)
    for r in ranks:
        for name, p in r["params"].items():
            assert torch.equal(p, ref_params[name].detach()), f"G={G} M={M} {name}: engine != reference"
    # and it is not the features-replay update (G >= 1 always has a delayed module 1)
    rec, _ = _reference(G, M, replay="recompute")
    rec_params = dict(rec.named_parameters())
    assert any(not torch.equal(ref_params[n], rec_params[n]) for n in ref_params)


@pytest.mark.parametrize("G", (1, 2, 3), ids=lambda g: f"G{g}")
def test_stashed_state_is_bounded(stash_run, G):
    K = G + 1
    for M in M_VALUES:
        for r in (run[M] for run in stash_run(G)):
            for t, st in enumerate(r["state"]):
                where = f"G={G} M={M} stage {r['stage']} after step {t}"
                want_inputs, want_snaps = [], []
                for k in r["local_modules"]:
                     if k == K:
                        continue
                     kept = range(max(0, t - (K - k) + 1), t + 1)
                     want_inputs += [(k, b, j) for b in kept for j in range(M)]
                     want_snaps += [(k, b) for b in kept]
                assert st["stash"] == sorted(want_inputs), where
                assert st["snapshots"] == sorted(want_snaps), where
                # the graph cache holds the same keys, except those dropped at step `dropped`:
                # a dropped graph is rebuilt only when its replay needs it (and then freed)
                dropped = steps_for(G) // 2
                assert st["graphs"] == [key for key in st["stash"] if t <= dropped or key[1] > dropped], where
                assert st["memory"]["snapshots"] > 0 or not want_snaps, where


@pytest.mark.parametrize("G", (1, 2))
def test_stash_equals_recompute_when_synchronous(G):
    """Delays 0: the forward's weights are the current weights, so the two modes agree exactly."""
    a, la = _reference(G, 4, replay="stash", synchronous=True)
    b, lb = _reference(G, 4, replay="recompute", synchronous=True)
    assert la == lb
    pb = dict(b.named_parameters())
    assert all(torch.equal(p, pb[n]) for n, p in a.named_parameters())


def test_bad_replay_mode_names_the_choices():
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.reference import Reference

    with pytest.raises(ValueError, match="replay: expected one of .*recompute.*stash.*got 'replay'"):
        Reference(model_plan(), 2, ds_config(1, 4), lm_loss, ring=paper(replay="replay"))


def test_snapshot_round_trip_rebuilds_the_same_graph():
    """A checkpoint stores a snapshot's copies (state_dict); from_state + the stashed input + the
    dropout key rebuild the kept graph, whose backward gives bit-identical gradients."""
    from ouroboros_ds.models.context import dropout_key
    from ouroboros_ds.ring.reference import build_layers
    from ouroboros_ds.ring.stash import Snapshot, backward, forward

    torch.manual_seed(0)
    layers = build_layers(model_plan())[:3]  # embedding + 2 blocks: module 1 of a small ring
    for m in layers:
        m.train()
    x = torch.randint(0, 64, (2, 8))
    g = torch.randn(2, 8, 16)
    snap = Snapshot(layers)
    saved = [{n: t.clone() for n, t in d.items()} for d in snap.state_dict()]
    with torch.no_grad():  # the optimizer moves the live weights after the forward
        for m in layers:
            for p in m.parameters():
                p.add_(0.5)

    def grads(s):
        for m in layers:
            for p in m.parameters():
                p.grad = None
        with dropout_key(1, 2, 3):
            xx, y = forward(layers, s, x)
        backward(xx, y, g, s)
        return [p.grad.clone() for m in layers for p in m.parameters()]

    a = grads(snap)
    b = grads(Snapshot.from_state(layers, saved))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = grads(Snapshot(layers))  # a snapshot of the moved weights is a different gradient
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
