"""The optional staleness mitigation (``ouroboros_ds/ring/staleness.py``): delay-scaled learning rates.

The group rule is checked directly; then the engine, given the groups by the same function as
train.py builds them, still equals the single-process Reference with the same rule, bit for bit.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from helpers import (SEED, batches, ds_config, feed, model_plan, paper, ring_engine, run_ranks, stage_parameters,
                     steps_for)

LR = 3e-3  # test_equivalence.ds_config's lr
C = 1.5


def test_groups_scale_by_delay_and_keep_the_tied_weight_fresh():
    from ouroboros_ds.ring.staleness import scaled_by_delay
    from ouroboros_ds.ring.warmup import first_gradient_groups

    a, b, tied, d, unused = (torch.nn.Parameter(torch.zeros(1)) for _ in range(5))
    # stage 0 of G = 3: modules 1 (delay 3) and 4 (delay 0); the tied parameter is used by both, so
    # its first (and every) gradient is module 4's fresh one; a parameter no forward uses goes
    # with the module that holds it
    groups = first_gradient_groups(used={1: [tied, a], 4: [b, tied]}, owned={1: [tied, a, unused], 4: [b]},
                                   num_stages=3)
    assert [(step, [id(p) for p in ps]) for step, ps in groups] == [(0, [id(tied), id(b)]), (3, [id(a), id(unused)])]
    assert [g["lr"] for g in scaled_by_delay(groups, lr=1.0, c=C)] == [1.0, 1.0 / (1 + 3 * C)]
    # stage 2 of G = 3: module 3 (delay 1) alone
    one = first_gradient_groups({3: [d]}, {3: [d]}, 3)
    assert [g["lr"] for g in scaled_by_delay(one, lr=2.0, c=C)] == [2.0 / (1 + C)]
    # c = 0 is the paper's rule: every lr unchanged
    assert {g["lr"] for g in scaled_by_delay(groups, lr=1.0, c=0.0)} == {1.0}
    with pytest.raises(ValueError, match="stale_lr_scale"):
        scaled_by_delay(one, lr=1.0, c=-1.0)


def worker(rank: int, G: int, M: int, out: str) -> None:
    import deepspeed

    from ouroboros_ds.ring.staleness import pipeline_groups

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    steps = steps_for(G)
    engine, mod = ring_engine(G, ds_config(M, steps), model_parameters=lambda mod: pipeline_groups(mod, LR, C))
    opt = engine.optimizer
    it = feed(engine, batches(steps, M))
    losses = [engine.train_batch(it) for _ in range(steps)]
    torch.save({"losses": [None if x is None else x.item() for x in losses], "params": stage_parameters(mod),
                "lrs": sorted(g["lr"] for g in opt.param_groups)}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("G,M", [(2, 4)])
def test_engine_with_delay_scaled_lr_equals_reference(tmp_path, G, M):
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.reference import Reference

    run_ranks(worker, G, G, M, str(tmp_path), tmpdir=str(tmp_path), timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(G)]
    torch.set_num_threads(1)
    ref = Reference(model_plan(), G, ds_config(M, steps_for(G)), lm_loss, seed=SEED, ring=paper(stale_lr_scale=C))
    ref_losses = [ref.step(b) for b in batches(steps_for(G), M)]
    plain = Reference(model_plan(), G, ds_config(M, steps_for(G)), lm_loss, seed=SEED, ring=paper())
    plain_losses = [plain.step(b) for b in batches(steps_for(G), M)]

    # the groups reached DeepSpeed's optimizer (the scheduler rescales them; their ratios stay)
    lrs = ranks[0]["lrs"]  # stage 0 of G = 2: module 1 (delay 2); fresh: module 3 and the tied weight
    assert len(lrs) == 2 and lrs[0] == pytest.approx(lrs[1] / (1 + 2 * C))
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"], dtype=torch.float64),
                               torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-6, atol=0)
    ref_params = dict(ref.named_parameters())
    for r in ranks:
        for name, p in r["params"].items():
            torch.testing.assert_close(p, ref_params[name].detach(), atol=1e-6, rtol=1e-5)
    # and the rule changed the training (this test is not blind to a no-op)
    assert ranks[0]["losses"][-1] != pytest.approx(plain_losses[-1], rel=1e-6, abs=0)
