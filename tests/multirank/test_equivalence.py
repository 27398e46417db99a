"""The DeepSpeed Ouroboros engine equals the single-process Reference, parameter for parameter.

Each G spawns G gloo ranks (CPU, one torch thread each) once and trains two engines in the same
processes, M = 1 then M = 4, for 2K + 2 steps (K = G + 1) with dropout 0.1, AdamW with weight
decay, WarmupCosineLR and a gradient clip that does clip on some steps. The parent then runs
:class:`ouroboros_ds.ring.reference.Reference` on the same batches and compares every parameter and
every per-step loss. The same runs also record, after every step, the engine's in-flight state
(stash and pending error gradients, docs/ring.md#memory) and every ``c10d`` op issued during
``train_batch()`` (no collective may cross pipeline stages; with dp = 1 no collective at all).
"""
from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch

from helpers import (CLIP, P2P_OPS, ApiRecorder, C10dRecorder, batches, ds_config, feed, reference_run, ring_engine,
                     run_once, stage_parameters, steps_for)

G_VALUES = (1, 2, 3)
M_VALUES = (1, 4)


# ------------------------------------------------------------------ what the ranks run
def _in_flight(engine) -> dict:
    """The engine's state between steps: stash and pending error-gradient keys, leftovers."""
    return {"stash": sorted(engine.stash), "grads_in": sorted(engine.grads_in),
            "leftover": {"acts_in": len(engine.acts_in), "outbox": len(engine.outbox), "labels": len(engine.labels)}}


def worker(rank: int, G: int, Ms: tuple, out: str) -> None:
    import deepspeed
    import torch.distributed as tdist


    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    steps = steps_for(G)
    norms: list = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        total = clip(params, max_norm, *args, **kwargs)
        norms.append(float(total))
        return total

    torch.nn.utils.clip_grad_norm_ = recording_clip
    results = {}
    for M in Ms:
        engine, mod = ring_engine(G, ds_config(M, steps))
        it = feed(engine, batches(steps, M))
        losses, in_flight, step_norms = [], [], []
        with ApiRecorder() as api, C10dRecorder() as c10d, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                del norms[:]
                loss = engine.train_batch(it)
                losses.append(None if loss is None else loss.item())
                in_flight.append(_in_flight(engine))
                step_norms.append(list(norms))
        # The recorders are not blind: a deliberate collective is seen by both.
        with ApiRecorder() as api_check, C10dRecorder() as c10d_check:
            tdist.barrier()
        results[M] = {"losses": losses, "in_flight": in_flight, "norms": step_norms, "params": stage_parameters(mod),
                      "stage": engine.stage_id, "local_modules": list(mod.local_modules),
                      "warnings": [str(w.message)[:200] for w in caught],
                      "api_calls": api.calls, "c10d_ops": c10d.ops,
                      "check": (api_check.calls, c10d_check.ops)}
    torch.nn.utils.clip_grad_norm_ = clip
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


# ------------------------------------------------------------------ the runs, once per G
@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    """``ring_run(G)``: per-rank results of the G-rank run (both M)."""
    return lambda G: run_once(tmp_path_factory, f"equivalence_g{G}", worker, G, args=(M_VALUES,))[1]


@pytest.mark.parametrize("M", M_VALUES, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("G", G_VALUES, ids=lambda g: f"G{g}")
def test_engine_equals_reference(ring_run, G, M):
    ranks = [r[M] for r in ring_run(G)]
    ref_params, ref_losses = reference_run(G, M, steps_for(G))

    # every per-step loss, on stage 0 (other stages return None: the loss is not broadcast)
    assert [r["stage"] for r in ranks] == list(range(G))
    assert all(x is None for r in ranks[1:] for x in r["losses"])
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"], dtype=torch.float64),
                               torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-6, atol=0)

    # every parameter: the ranks' parameters partition the reference's full set
    names = [n for r in ranks for n in r["params"]]
    assert len(names) == len(set(names)), "a parameter lives on two stages"
    assert set(names) == set(ref_params)
    worst = 0.0
    for r in ranks:
        for name, p in r["params"].items():
            torch.testing.assert_close(p, ref_params[name].detach(), atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
            worst = max(worst, (p - ref_params[name].detach()).abs().max().item())
    print(f"G={G} M={M}: {len(names)} parameters, max |engine - reference| = {worst:.3g}, loss rel diff {max(abs(a - b) / abs(b) for a, b in zip(ranks[0]['losses'], ref_losses)):.3g}")

    # the clip is per stage, once per step that has a gradient, and it does clip sometimes
    steps = steps_for(G)
    for s, r in enumerate(ranks):
        warmup = 0 if s == 0 else G - s  # stage s >= 1 holds module s + 1, delay K - (s + 1)
        assert [len(n) for n in r["norms"]] == [0] * warmup + [1] * (steps - warmup), f"stage {s}"
    all_norms = [x for r in ranks for n in r["norms"] for x in n]
    print(f"G={G} M={M}: gradient norms before the clip {min(all_norms):.3f}..{max(all_norms):.3f} (clip {CLIP[M]})")
    assert any(x > CLIP[M] for x in all_norms), f"the clip never clips: {all_norms}"
    assert any(x < CLIP[M] for x in all_norms), f"the clip always clips: {all_norms}"


@pytest.mark.parametrize("G", G_VALUES, ids=lambda g: f"G{g}")
def test_in_flight_state(ring_run, G):
    """After step t, module k < K holds the inputs of exactly min(t + 1, K - k) batches (the last
    ones, all M micro-batches), and the error gradient of the batch it replays at step t + 1;
    module K holds nothing between steps (docs/ring.md#memory)."""
    K = G + 1
    for M in M_VALUES:
        for r in (run[M] for run in ring_run(G)):
            for t, state in enumerate(r["in_flight"]):
                where = f"G={G} M={M} stage {r['stage']} after step {t}"
                assert state["leftover"] == {"acts_in": 0, "outbox": 0, "labels": 0}, where
                stash = {m: sorted({(b, j) for (mm, b, j) in state["stash"] if mm == m}) for m in range(1, K + 1)}
                grads = {m: sorted({(b, j) for (mm, b, j) in state["grads_in"] if mm == m}) for m in range(1, K + 1)}
                assert set(m for m, _, _ in state["stash"]) <= set(r["local_modules"]) - {K}, where
                assert set(m for m, _, _ in state["grads_in"]) <= set(r["local_modules"]) - {K}, where
                for k in r["local_modules"]:
                     if k == K:
                        assert stash[k] == [] and grads[k] == [], where
                        continue
                     kept = range(max(0, t - (K - k) + 1), t + 1)
                     assert stash[k] == [(b, j) for b in kept for j in range(M)], f"{where}, module {k}"
                     assert len({b for b, _ in stash[k]}) == min(t + 1, K - k)
                     nxt = t + 1 - (K - k)
                     assert grads[k] == ([(nxt, j) for j in range(M)] if nxt >= 0 else []), f"{where}, module {k}"


@pytest.mark.parametrize("G", G_VALUES, ids=lambda g: f"G{g}")
def test_no_collective_across_stages(ring_run, G):
    """During train_batch() only point-to-point messages flow (dp = 1: no collective at all)."""
    for M in M_VALUES:
        for r in (run[M] for run in ring_run(G)):
            where = f"G={G} M={M} stage {r['stage']}"
            assert r["api_calls"] == [], f"{where}: collectives called during training: {r['api_calls']}"
            assert set(r["c10d_ops"]) <= P2P_OPS, f"{where}: c10d ops during training: {sorted(set(r['c10d_ops']))}"
            if G > 1:  # G = 1 has no peer: nothing at all
                assert r["c10d_ops"], f"{where}: no point-to-point either: is the recorder blind?"
            api_check, c10d_check = r["check"]
            assert [n for n, _ in api_check] == ["barrier"] and "c10d.barrier.default" in c10d_check


@pytest.mark.parametrize("G", G_VALUES, ids=lambda g: f"G{g}")
def test_training_raises_no_warning(ring_run, G):
    """DeepSpeed broadcasts tied weights at construction; done with grad mode on, torch records
    that broadcast and warns at every backward through the tied head that ``c10d::broadcast_``
    has no autograd kernel. The ring module synchronizes them without autograd, so training
    raises no warning at all; that the head's gradient is right is pinned by
    test_engine_equals_reference (``wte`` against the Reference)."""
    for M in M_VALUES:
        for r in (run[M] for run in ring_run(G)):
            assert r["warnings"] == [], f"G={G} M={M} stage {r['stage']}: {r['warnings']}"
