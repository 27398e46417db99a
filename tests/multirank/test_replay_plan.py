"""Memory-bounded replay (``ouroboros_ds.ring.memory.ReplayPlan``): a plan only chooses which stashed
forwards keep their graph; the others are recomputed through the same weight snapshot. So every
plan, mixed ones included, equals the stash-mode Reference bit for bit, resumes bitwise, and holds
less activation memory the fewer graphs it keeps."""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from helpers import (FULL, full, SEED, batches, ds_config, feed, model_plan, paper, ring_engine, run_ranks, stage_parameters,
                     steps_for)

# per G: the plans run (a module missing from a plan keeps every graph)
PLANS = {2: ["1:0 2:0", "1:1 2:3", "1:4 2:2"], 3: ["1:2 2:0 3:1"]}
M = 4


def _engine(G, steps, plan):
    from ouroboros_ds.ring.memory import ReplayPlan

    return ring_engine(G, ds_config(M, steps), replay="stash",
                       replay_plan=None if plan is None else ReplayPlan.parse(plan))


def worker(rank, G, plans, out):
    import deepspeed

    from ouroboros_ds.ring.saved_bytes import SavedBytes

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    steps = steps_for(G)
    results = {}
    for plan in [None] + plans:
        engine, mod = _engine(G, steps, plan)
        sb = engine.saved_bytes = SavedBytes()
        sb.exclude = {p.untyped_storage().data_ptr() for p in mod.parameters()}
        it = feed(engine, batches(steps, M))
        losses, graphs = [], []
        for _ in range(steps):
            with sb.hooks():
                loss = engine.train_batch(it)
            losses.append(None if loss is None else loss.item())
            graphs.append(sorted(engine.graphs))
        results[plan] = {"losses": losses, "params": stage_parameters(mod), "peak": sb.peak, "graphs": graphs}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


_RUNS: dict = {}


def _run(G, tmp_path_factory):
    if G not in _RUNS:
        out = str(tmp_path_factory.mktemp(f"plan_g{G}"))
        run_ranks(worker, G, G, PLANS[G], out, tmpdir=out, timeout=300)
        _RUNS[G] = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(G)]
    return _RUNS[G]


def _stash_reference(G):
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.reference import Reference

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        ref = Reference(model_plan(), G, ds_config(M, steps_for(G)), lm_loss, seed=SEED, ring=paper(replay="stash"))
        losses = [ref.step(b) for b in batches(steps_for(G), M)]
    finally:
        torch.set_num_threads(threads)
    return ref, losses


@pytest.mark.parametrize("G", [pytest.param(2, id="G2"), full(3, id="G3")])  # G = 3: --full
def test_every_plan_equals_stash_reference_bitwise(G, tmp_path_factory):
    from ouroboros_ds.ring.memory import ReplayPlan

    ranks = _run(G, tmp_path_factory)
    ref, ref_losses = _stash_reference(G)
    ref_params = dict(ref.named_parameters())
    for plan in [None] + PLANS[G]:
        assert ranks[0][plan]["losses"] == ref_losses, f"plan {plan}"
        for r in ranks:
            for name, p in r[plan]["params"].items():
                assert torch.equal(p, ref_params[name].detach()), f"G={G} plan {plan} {name}: engine != reference"
            if plan is not None:  # the plan is followed: only kept micro-batches hold a graph between steps
                kept = ReplayPlan.parse(plan)
                for held in r[plan]["graphs"]:
                    assert all(kept.keeps(k, mb) for k, _, mb in held), f"plan {plan}: {held}"


@pytest.mark.parametrize("G", [pytest.param(2, id="G2"), full(3, id="G3")])  # G = 3: --full
def test_fewer_kept_graphs_hold_less_memory(G, tmp_path_factory):
    from ouroboros_ds.ring.memory import ReplayPlan

    ranks = _run(G, tmp_path_factory)
    for r in ranks:
        for plan in PLANS[G]:
            if all(n < M for n in ReplayPlan.parse(plan).kept.values()):
                assert r[plan]["peak"] < r[None]["peak"], f"plan {plan}: {r[plan]['peak']} >= keep-all"
    if G == 2:  # keeping nothing: below keeping 1 of module 1 and 3 of module 2, on both stages
        for r in ranks:
            assert r["1:0 2:0"]["peak"] < r["1:1 2:3"]["peak"]


# ------------------------------------------------------------------ resume with a mixed plan
G_RES, T, SAVE_AT, RES_PLAN = 2, 6, 3, "1:1 2:2"


def resume_worker(rank, ckpt, out, resume):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    engine, mod = _engine(G_RES, T, RES_PLAN)
    start = 0
    if resume:
        engine.load_ring_checkpoint(ckpt)
        start = engine.global_steps
    it = feed(engine, batches(T, M)[start:])
    losses = []
    for _ in range(start, T):
        loss = engine.train_batch(it)
        losses.append(None if loss is None else loss.item())
        if not resume and engine.global_steps == SAVE_AT:
            engine.save_ring_checkpoint(ckpt)
    torch.save({"losses": losses, "params": stage_parameters(mod), "start": start},
               os.path.join(out, f"{'resume' if resume else 'full'}{rank}.pt"))


@FULL  # a stash-mode resume: test_stash_resume; every plan's update: test_every_plan_equals_stash_reference_bitwise
def test_mixed_plan_resume_is_bitwise(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_ranks(resume_worker, G_RES, ckpt, str(tmp_path), False, tmpdir=str(tmp_path), timeout=300, fresh=True)
    run_ranks(resume_worker, G_RES, ckpt, str(tmp_path), True, tmpdir=str(tmp_path), timeout=300, fresh=True)
    for r in range(G_RES):
        full, res = torch.load(tmp_path / f"full{r}.pt"), torch.load(tmp_path / f"resume{r}.pt")
        assert res["start"] == SAVE_AT
        assert res["losses"] == full["losses"][SAVE_AT:]
        for name, p in full["params"].items():
            assert torch.equal(p, res["params"][name]), f"rank {r} {name}"
