"""A NaN loss or gradient is dropped coherently around the ring, with no collective.

One G = 2 spawn (K = 3 modules: 1 and 3 on stage 0, 2 on stage 1) runs three engines:

- M = 4 with a NaN loss injected at batch 1, micro-batch 2; and the same run with that loss
  multiplied by 0 instead. Dropping (1, 2) on every module must equal giving it a zero gradient,
  bit for bit, and every module must report the drop at the step its delayed gradient arrives.
- M = 1 with a NaN loss at batch 1 and a NaN parameter gradient injected on stage 1 at step 4:
  each module keeps its weights exactly at the step it would have applied batch 1 (module 3 at
  step 1, module 2 at step 2, module 1 at step 3), stage 1 skips step 4, and all else moves.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from helpers import batches, ds_config, ring_engine, run_ranks, stage_parameters

G, T, BAD_BATCH, BAD_MB, GRAD_NAN_STEP = 2, 6, 1, 2, 4


def _run(M, mode):
    """mode: 'nan' or 'zero' loss at (BAD_BATCH, BAD_MB of M); returns per-step snapshots."""
    from ouroboros_ds.models.gpt2 import lm_loss

    calls = [0]
    bad_mb = min(BAD_MB, M - 1)

    def loss_fn(out, labels):
        loss = lm_loss(out, labels)
        t, j = divmod(calls[0], M)
        calls[0] += 1
        if (t, j) == (BAD_BATCH, bad_mb):
            loss = loss * (float("nan") if mode == "nan" else 0.0)
        return loss

    engine, mod = ring_engine(G, ds_config(M, T), loss_fn=loss_fn)
    if M == 1 and engine.stage_id == 1:  # an overflow inside stage 1's own backward at step 4
        p = mod.module_parameters(2)[0]
        p.register_hook(lambda g: g * float("nan") if engine.global_steps == GRAD_NAN_STEP else g)
    it = iter([mb for step in batches(T, M) for mb in step]) if engine.stage_id == 0 else None
    local = mod.local_modules
    tied = ({id(p) for p in mod.module_parameters(1)} & {id(p) for p in mod.module_parameters(G + 1)}
            if 1 in local else set())

    def own(k):  # module k's parameters, without the embedding modules 1 and K share
        return torch.cat([p.detach().flatten().clone() for p in mod.module_parameters(k) if id(p) not in tied])

    snaps = [{k: own(k) for k in mod.local_modules}]
    losses = []
    for _ in range(T):
        loss = engine.train_batch(it)
        losses.append(None if loss is None else loss.item())
        snaps.append({k: own(k) for k in mod.local_modules})
    return {"losses": losses, "snaps": snaps, "params": stage_parameters(mod), "events": list(engine.nonfinite_events),
            "stage": engine.stage_id, "in_flight": (sorted(engine.stash), sorted(engine.grads_in))}


def worker(rank, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    res = {("nan", 4): _run(4, "nan"), ("zero", 4): _run(4, "zero"), ("nan", 1): _run(1, "nan")}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("nonfinite"))
    run_ranks(worker, G, out, tmpdir=out, timeout=300)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(G)]


def _key(e):
    return (e["step"], e["what"], e["module"], e["batch"], e["mb"])


def test_nan_loss_equals_zero_gradient_for_that_micro_batch(ranks):
    K = G + 1
    for r, res in enumerate(ranks):
        nan, zero = res[("nan", 4)], res[("zero", 4)]
        for name, p in nan["params"].items():
            assert torch.isfinite(p).all(), f"rank {r}: {name} is not finite"
            assert torch.equal(p, zero["params"][name]), f"rank {r}: {name} differs from the zero-gradient run"
        assert nan["in_flight"] == zero["in_flight"], f"rank {r}: the in-flight state diverged"
        expected = {0: [(BAD_BATCH, "loss", K, BAD_BATCH, BAD_MB),
                        (BAD_BATCH + K - 1, "error gradient", 1, BAD_BATCH, BAD_MB)],
                    1: [(BAD_BATCH + K - 2, "error gradient", 2, BAD_BATCH, BAD_MB)]}[res[("nan", 4)]["stage"]]
        assert sorted(_key(e) for e in nan["events"]) == expected, nan["events"]
        assert zero["events"] == []
    a, b = ranks[0][("nan", 4)]["losses"], ranks[0][("zero", 4)]["losses"]
    assert a[BAD_BATCH] != a[BAD_BATCH]  # the step's reported loss is NaN: the fault is visible
    assert [x for t, x in enumerate(a) if t != BAD_BATCH] == [x for t, x in enumerate(b) if t != BAD_BATCH]
    # the injection mattered: the zero-gradient micro-batch changed the result against no fault
    assert any(e["what"] == "loss" for e in ranks[0][("nan", 4)]["events"])


def test_nan_drops_each_modules_update_at_its_delay_and_stage_skip(ranks):
    K = G + 1
    # Step 0 moves nothing: DeepSpeed's WarmupCosineLR gives lr 0 before its first step.
    frozen = {K: {0, BAD_BATCH},                              # module K applies batch t at step t
              2: {0, BAD_BATCH + K - 2, GRAD_NAN_STEP},       # warm-up, batch 1 dropped, own NaN grad
              1: {0, 1, BAD_BATCH + K - 1}}                   # warm-up (delay 2), batch 1 dropped
    for res in ranks:
        run = res[("nan", 1)]
        for k in run["snaps"][0]:
            for t in range(T):
                same = torch.equal(run["snaps"][t][k], run["snaps"][t + 1][k])
                assert same == (t in frozen[k]), f"module {k} step {t}: unchanged={same}"
        for p in run["params"].values():
            assert torch.isfinite(p).all()
        if run["stage"] == 1:
            skips = [e for e in run["events"] if e["what"] == "parameter gradient"]
            assert [e["step"] for e in skips] == [GRAD_NAN_STEP] and skips[0]["action"] == "stage update skipped"
