"""Memory-bounded replay (``ouroboros_ds.memory.ReplayPlan``): a plan only chooses which stashed
forwards keep their graph; the others are recomputed through the same weight snapshot. So every
plan, mixed ones included, equals the stash-mode Reference bit for bit, resumes bitwise, and
holds less activation memory the fewer graphs it keeps. The planner's arithmetic is checked
against its formula on a grid (pure Python)."""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from ring import run_ranks
from test_equivalence import SEED, _parameters, batches, ds_config, model_plan, steps_for
from test_stash import _reference

from ouroboros_ds.memory import (ModuleMemory, ReplayPlan, budget_bytes, module_peak, onef1b_peaks, parse_budget,
                                 plan_for_budget, stage_peaks)

# per G: the plans run (a module missing from the plan keeps every graph)
PLANS = {2: ["1:0 2:0", "1:1 2:3", "1:4 2:2"], 3: ["1:2 2:0 3:1"]}
M = 4


def _engine(G, M, steps, plan):
    from ouroboros_ds import initialize
    from ouroboros_ds.models import lm_loss
    from ouroboros_ds.module import OuroborosPipelineModule

    p = model_plan()
    mod = OuroborosPipelineModule(p.specs, num_stages=G, loss_fn=lm_loss, block_indices=p.block_indices)
    engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=ds_config(M, steps),
                            seed=SEED, replay="stash", replay_plan=None if plan is None else ReplayPlan.parse(plan))
    return engine, mod


def worker(rank, G, plans, out):
    import deepspeed

    from ouroboros_ds.stash import SavedBytes

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    steps = steps_for(G)
    results = {}
    for plan in [None] + plans:
        engine, mod = _engine(G, M, steps, plan)
        sb = engine.saved_bytes = SavedBytes()
        sb.exclude = {p.untyped_storage().data_ptr() for p in mod.parameters()}
        it = iter([mb for step in batches(steps, M) for mb in step]) if engine.stage_id == 0 else None
        losses, graphs = [], []
        for _ in range(steps):
            with sb.hooks():
                loss = engine.train_batch(it)
            losses.append(None if loss is None else loss.item())
            graphs.append(sorted(engine.graphs))
        results[plan] = {"losses": losses, "params": _parameters(mod), "peak": sb.peak, "graphs": graphs}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


_RUNS: dict = {}


def _run(G, tmp_path_factory):
    if G not in _RUNS:
        out = str(tmp_path_factory.mktemp(f"plan_g{G}"))
        run_ranks(worker, G, G, PLANS[G], out, tmpdir=out, timeout=300)
        _RUNS[G] = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(G)]
    return _RUNS[G]


@pytest.mark.parametrize("G", sorted(PLANS), ids=lambda g: f"G{g}")
def test_every_plan_equals_stash_reference_bitwise(G, tmp_path_factory):
    ranks = _run(G, tmp_path_factory)
    ref, ref_losses = _reference(G, M)
    ref_params = dict(ref.named_parameters())
    for plan in PLANS[G]:
        assert ranks[0][plan]["losses"] == ref_losses, f"plan {plan}"
        for r in ranks:
            for name, p in r[plan]["params"].items():
                assert torch.equal(p, ref_params[name].detach()), f"G={G} plan {plan} {name}: engine != reference"
            # the plan is followed: only kept micro-batches hold a graph between steps
            kept = ReplayPlan.parse(plan)
            for held in r[plan]["graphs"]:
                assert all(kept.keeps(k, mb) for k, _, mb in held), f"plan {plan}: {held}"


@pytest.mark.parametrize("G", sorted(PLANS), ids=lambda g: f"G{g}")
def test_fewer_kept_graphs_hold_less_memory(G, tmp_path_factory):
    ranks = _run(G, tmp_path_factory)
    for r in ranks:
        full = r[None]["peak"]
        for plan in PLANS[G]:
            kept = ReplayPlan.parse(plan).kept
            if all(n < M for n in kept.values()):
                assert r[plan]["peak"] < full, f"plan {plan}: {r[plan]['peak']} >= keep-all {full}"
    if G == 2:  # keeping nothing: below keeping 1 of module 1 and 3 of module 2 on both stages
        for r in ranks:
            assert r["1:0 2:0"]["peak"] < r["1:1 2:3"]["peak"]


# ------------------------------------------------------------------ resume with a mixed plan
G_RES, T, SAVE_AT, RES_PLAN = 2, 6, 3, "1:1 2:2"


def resume_worker(rank, ckpt, out, resume):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    engine, mod = _engine(G_RES, M, T, RES_PLAN)
    start = 0
    if resume:
        engine.load_ring_checkpoint(ckpt)
        start = engine.global_steps
    it = iter([mb for step in batches(T, M)[start:] for mb in step]) if engine.stage_id == 0 else None
    losses = []
    for _ in range(start, T):
        loss = engine.train_batch(it)
        losses.append(None if loss is None else loss.item())
        if not resume and engine.global_steps == SAVE_AT:
            engine.save_ring_checkpoint(ckpt)
    torch.save({"losses": losses, "params": _parameters(mod), "start": start},
               os.path.join(out, f"{'resume' if resume else 'full'}{rank}.pt"))


def test_mixed_plan_resume_is_bitwise(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_ranks(resume_worker, G_RES, ckpt, str(tmp_path), False, tmpdir=str(tmp_path), timeout=300)
    run_ranks(resume_worker, G_RES, ckpt, str(tmp_path), True, tmpdir=str(tmp_path), timeout=300)
    for r in range(G_RES):
        full, res = torch.load(tmp_path / f"full{r}.pt"), torch.load(tmp_path / f"resume{r}.pt")
        assert res["start"] == SAVE_AT
        assert res["losses"] == full["losses"][SAVE_AT:]
        for name, p in full["params"].items():
            assert torch.equal(p, res["params"][name]), f"rank {r} {name}"


# ------------------------------------------------------------------ the planner (pure)
@pytest.mark.parametrize("G", (1, 2, 3, 4, 8))
@pytest.mark.parametrize("Mb", (1, 2, 4, 8))
def test_plan_is_the_most_kept_within_budget(G, Mb):
    mems = {k: ModuleMemory(graph=10.0 * (k % 3 + 1), inputs=0.5, snapshot=3.0) for k in range(1, G + 1)}
    for budget in (0.0, 40.0, 100.0, 400.0, float("inf")):
        plan = plan_for_budget(G, Mb, mems, 25.0, budget)
        peaks = stage_peaks(G, Mb, mems, 25.0, plan)
        for k, n in plan.kept.items():
            assert 0 <= n <= Mb
            s = 0 if k == 1 else k - 1
            if n > 0:  # what was kept fits
                assert peaks[s] <= budget
            if n < Mb:  # one more would not
                more = stage_peaks(G, Mb, mems, 25.0, ReplayPlan({**plan.kept, k: n + 1}))[s]
                assert more > budget
        if budget == float("inf"):
            assert all(n == Mb for n in plan.kept.values())
    # the peak grows with every kept graph, and keeping all is (d + 1) M graphs
    for k in mems:
        peaks = [module_peak(k, G, Mb, mems[k], n) for n in range(Mb + 1)]
        assert peaks == sorted(peaks)
        d = G + 1 - k
        assert peaks[-1] == (d + 1) * (3.0 + Mb * 0.5) + (d + 1) * Mb * mems[k].graph


def test_budget_option():
    assert parse_budget("1f1b") == ("rel", 1.0)
    assert parse_budget("1.5x") == ("rel", 1.5)
    assert parse_budget("300MB") == ("abs", 300 * 2 ** 20)
    assert budget_bytes("2x", 100.0) == 200.0 and budget_bytes("inf", 1.0) == float("inf")
    for bad in ("", "0x", "-1MB", "lots", "1f1b2"):
        with pytest.raises(ValueError, match="--activation-budget"):
            parse_budget(bad)
    assert onef1b_peaks(4, 2, [1.0, 1.0, 1.0, 1.0]) == [2.0, 2.0, 2.0, 1.0]
    assert str(ReplayPlan.parse("1:2 3:0")) == "1:2 3:0"
    with pytest.raises(ValueError, match="k:n"):
        ReplayPlan.parse("1=2")
