"""Exact resume and atomic checkpoints, driving the engine directly on gloo CPU ranks.

Per G in {2, 3}, one spawn trains M = 1 and M = 4 for T = G + 3 steps and saves at global step
1 (inside the warm-up: module 1 first updates at step G) and at step G + 1 (after it), into one
folder; then it tries a third save that crashes halfway (after DeepSpeed wrote its files, before
the ring state and ``latest``). A second spawn (fresh processes) resumes each checkpoint and
finishes the run: losses and parameters must equal the uninterrupted run bitwise. Each tag is
loaded once into a fresh engine and once into an engine that has trained since.
The resume spawn also loads checkpoints of another M, G and model and expects the errors.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from helpers import full, batches, ds_config, model_plan, ring_engine, run_once, stage_parameters

M_VALUES = (1, 4)
MODEL_META = {"model": {"n_layer": 4, "n_embd": 16}}


def total_steps(G: int) -> int:
    return G + 3


def save_steps(G: int) -> tuple:
    return (1, G + 1)  # global_steps at the save: inside the warm-up (< G), and after it


def _engine(G, M):

    return ring_engine(G, ds_config(M, total_steps(G)))


def _feed(engine, G, M, start):
    if engine.stage_id != 0:
        return None
    return iter([mb for step in batches(total_steps(G), M)[start:] for mb in step])


class _Crash(Exception):
    pass


def full_worker(rank, G, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    ckpt, results = os.path.join(out, "ckpt"), {}
    for M in M_VALUES:
        engine, mod = _engine(G, M)
        it = _feed(engine, G, M, 0)
        folder = os.path.join(ckpt, f"m{M}")
        losses = []
        for _ in range(total_steps(G)):
            loss = engine.train_batch(it)
            losses.append(None if loss is None else loss.clone())
            if engine.global_steps in save_steps(G):
                engine.save_ring_checkpoint(folder, client_state={"note": engine.global_steps}, meta=MODEL_META)
                at_save = stage_parameters(mod)
        # A save that dies halfway: DeepSpeed's files are written, the ring state and `latest` not.
        real = engine.save_checkpoint

        def crashing(*a, **k):
            real(*a, **k)
            raise _Crash()
        engine.save_checkpoint = crashing
        try:
            engine.save_ring_checkpoint(folder, meta=MODEL_META)
            raise AssertionError("the crashing save did not crash")
        except _Crash:
            pass
        results[M] = {"losses": losses, "params": stage_parameters(mod), "params_at_save": at_save}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _error(fn):
    try:
        fn()
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return None


def _mismatch_errors(engine, G, ckpt, other_ckpt, out):
    """Loads that must fail before DeepSpeed loads anything (``engine`` has M = 1)."""
    T = total_steps(G)
    errors = {
        "M": _error(lambda: engine.load_ring_checkpoint(os.path.join(ckpt, "m4"), meta=MODEL_META)),
        "model": _error(lambda: engine.load_ring_checkpoint(os.path.join(ckpt, "m1"),
                                                            meta={"model": {"n_layer": 6, "n_embd": 16}})),
        "crashed": _error(lambda: engine.load_ring_checkpoint(os.path.join(ckpt, "m1"), tag=f"global_step{T}",
                                                              meta=MODEL_META)),
        "empty": _error(lambda: engine.load_ring_checkpoint(os.path.join(out, "nothing"), meta=MODEL_META)),
    }
    if other_ckpt:
        errors["G"] = _error(lambda: engine.load_ring_checkpoint(os.path.join(other_ckpt, "m1"), meta=MODEL_META))
    assert engine.global_steps == 0 and not engine.stash
    return errors


def resume_worker(rank, G, ckpt, other_ckpt, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    results, errors = {}, {}
    T = total_steps(G)
    for M in M_VALUES:
        folder = os.path.join(ckpt, f"m{M}")
        tags = (f"global_step{save_steps(G)[0]}", None)  # None: `latest`, the second save
        # One engine per M: its first load is into a fresh engine, its second into one that has
        # trained since (a load must replace all state); M = 1 and M = 4 swap which tag is which.
        engine, mod = _engine(G, M)
        for tag in (tags if M == M_VALUES[0] else tags[::-1]):
            if not errors:  # a failed load changes nothing, so the first engine also checks the errors
                errors = _mismatch_errors(engine, G, ckpt, other_ckpt, out)
            client = engine.load_ring_checkpoint(folder, tag=tag, meta=MODEL_META)
            start = engine.global_steps
            it = _feed(engine, G, M, start)
            losses = [None] * start
            for _ in range(start, T):
                loss = engine.train_batch(it)
                losses.append(None if loss is None else loss.clone())
            results[(M, tag)] = {"losses": losses, "params": stage_parameters(mod), "start": start, "client": client}
    torch.save({"results": results, "errors": errors}, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def uninterrupted(G):
        """(checkpoint folder, per-rank results) of the uninterrupted G-rank run."""
        out, results = run_once(tmp_path_factory, f"checkpoint_full_g{G}", full_worker, G)
        return os.path.join(out, "ckpt"), results

    def get(G):
        ckpt, results = uninterrupted(G)
        other = uninterrupted(2)[0] if G == 3 else None  # a checkpoint of another G, which G = 3 must refuse
        _, resume = run_once(tmp_path_factory, f"checkpoint_resume_g{G}", resume_worker, G, args=(ckpt, other),
                             fresh=True)
        return {"ckpt": ckpt, "full": results, "resume": resume}
    return get


@pytest.mark.parametrize("G", [pytest.param(2, id="G2"), full(3, id="G3")])  # G = 3: --full
def test_resume_is_bitwise_exact(runs, G):
    run = runs(G)
    for M in M_VALUES:
        for tag, expect_start in ((f"global_step{save_steps(G)[0]}", save_steps(G)[0]), (None, save_steps(G)[1])):
            for r in range(G):
                full, res = run["full"][r][M], run["resume"][r]["results"][(M, tag)]
                where = f"G={G} M={M} rank {r} resumed from {tag or 'latest'}"
                assert res["start"] == expect_start, where
                assert res["client"]["note"] == expect_start, where
                for t in range(expect_start, total_steps(G)):
                     a, b = full["losses"][t], res["losses"][t]
                     assert (a is None) == (b is None) == (r != 0), where
                     if a is not None:
                        assert torch.equal(a, b), f"{where}: loss of step {t}: {a.item()!r} != {b.item()!r}"
                assert full["params"].keys() == res["params"].keys()
                for name, p in full["params"].items():
                     assert torch.equal(p, res["params"][name]), f"{where}: parameter {name} differs"
        # the comparison can fail: every rank's parameters moved after the last save
        for r in range(G):
            full = run["full"][r][M]
            assert any(not torch.equal(p, full["params_at_save"][n]) for n, p in full["params"].items())


@pytest.mark.parametrize("G", [pytest.param(2, id="G2"), full(3, id="G3")])  # G = 3: --full
def test_crash_mid_save_keeps_previous_and_mismatch_errors(runs, G):
    run = runs(G)
    T = total_steps(G)
    for M in M_VALUES:
        folder = os.path.join(run["ckpt"], f"m{M}")
        assert open(os.path.join(folder, "latest")).read() == f"global_step{save_steps(G)[1]}"
        assert os.path.isdir(os.path.join(folder, f"global_step{T}"))  # the crashed save wrote part
        assert not os.path.exists(os.path.join(folder, f"global_step{T}", "ouroboros_meta.json"))
    # the layout: DeepSpeed's files (one model/optimizer file per stage, one file per layer with
    # weights), one ring file per rank, the meta file; no two stages share a file name
    names = set(os.listdir(os.path.join(run["ckpt"], "m1", "global_step1")))
    assert {f"mp_rank_{s:02d}_model_states.pt" for s in range(G)} | {f"ouroboros_rank{r:05d}.pt" for r in range(G)} \
        | {"ouroboros_meta.json"} <= names, names
    assert not any(n.endswith(".tmp") or ".tmp" in n for n in names), names
    layers = {n for n in names if n.startswith("layer_")}
    assert len(layers) == len(model_plan().specs) - 1, layers  # every layer but the tied head's lambda
    for r in range(G):
        errors = run["resume"][r]["errors"]
        assert "M: checkpoint 4, this run 1" in errors["M"], errors
        assert "model: checkpoint {'n_layer': 4, 'n_embd': 16}, this run {'n_layer': 6" in errors["model"], errors
        assert "incomplete" in errors["crashed"] and f"global_step{T}" in errors["crashed"], errors
        assert "has no 'latest' file" in errors["empty"], errors
        if G == 3 and "G" in errors:
            assert "G: checkpoint 2, this run 3" in errors["G"], errors
        for e in errors.values():
            assert "\n" not in e, e
    if G == 3:
        assert all("G" in run["resume"][r]["errors"] for r in range(G)), "the G=2 run did not precede G=3"
