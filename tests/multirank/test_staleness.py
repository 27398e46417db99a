"""The delay-scaled learning rate (``ouroboros_ds/ring/staleness.py``).

The hooks are checked on a plain torch optimizer; then the engine, given the option through
``initialize`` as any user gives it, equals the single-process Reference with the same option,
bit for bit, synchronous first steps included.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from helpers import (SEED, batches, ds_config, feed, model_plan, paper, ring_engine, run_ranks, stage_parameters,
                     steps_for)

C = 1.5
SYNC = 2  # the test's ring starts with two synchronous steps: scaled too


def test_each_group_steps_at_its_delay_scaled_lr_and_the_schedule_keeps_its_lr():
    from ouroboros_ds.ring.staleness import delay_scaled_lr
    from ouroboros_ds.ring.warmup import FIRST_STEP

    fresh, stale = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [fresh], FIRST_STEP: 0}, {"params": [stale], FIRST_STEP: 3}], lr=1.0)
    delay_scaled_lr(opt, C)
    for lr in (1.0, 0.5):  # a schedule sets the groups' lr between steps; the scaling follows it
        for g in opt.param_groups:
            g["lr"] = lr
        fresh.grad, stale.grad = torch.ones(1), torch.ones(1)
        before = fresh.item(), stale.item()
        opt.step()
        assert (before[0] - fresh.item(), before[1] - stale.item()) == (lr, pytest.approx(lr / (1 + 3 * C)))
        assert [g["lr"] for g in opt.param_groups] == [lr, lr]  # the schedule's values, put back
    plain = torch.optim.SGD([{"params": [stale], FIRST_STEP: 3}], lr=1.0)
    delay_scaled_lr(plain, 0.0)  # c = 0: the paper's update, no hook at all
    assert not plain._optimizer_step_pre_hooks
    with pytest.raises(ValueError, match="stale_lr_scale"):
        delay_scaled_lr(plain, -1.0)


def worker(rank: int, G: int, M: int, out: str) -> None:
    import deepspeed

    from ouroboros_ds.ring.config import RingConfig

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    steps = steps_for(G) + SYNC
    # the option as a user sets it: the DeepSpeed JSON's "ouroboros" object, plain parameters
    config = {**ds_config(M, steps), "ouroboros": {**RingConfig.PAPER, "stale_lr_scale": C, "sync_steps": SYNC}}
    engine, mod = ring_engine(G, config)
    it = feed(engine, batches(steps, M))
    losses = [engine.train_batch(it) for _ in range(steps)]
    torch.save({"losses": [None if x is None else x.item() for x in losses], "params": stage_parameters(mod),
                "lrs": [g["lr"] for g in engine.optimizer.param_groups]}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("G,M", [(2, 4)])
def test_engine_with_delay_scaled_lr_equals_reference(tmp_path, G, M):
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.reference import Reference

    run_ranks(worker, G, G, M, str(tmp_path), tmpdir=str(tmp_path), timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(G)]
    torch.set_num_threads(1)
    steps = steps_for(G) + SYNC
    ref = Reference(model_plan(), G, ds_config(M, steps), lm_loss, seed=SEED,
                    ring=paper(stale_lr_scale=C, sync_steps=SYNC))
    ref_losses = [ref.step(b) for b in batches(steps, M)]
    plain = Reference(model_plan(), G, ds_config(M, steps), lm_loss, seed=SEED, ring=paper(sync_steps=SYNC))
    plain_losses = [plain.step(b) for b in batches(steps, M)]

    # stage 0 of G = 2: module 1's group (delay 2) and the fresh one (module 3, the tied weight);
    # after the step the optimizer holds the schedule's lr for both, the scaling is the step's alone
    lrs = ranks[0]["lrs"]
    assert len(lrs) == 2 and lrs[0] == lrs[1]
    assert ranks[0]["losses"] == ref_losses  # bit for bit
    ref_params = dict(ref.named_parameters())
    for r in ranks:
        for name, p in r["params"].items():
            assert torch.equal(p, ref_params[name].detach()), name
    # the rule changed the training (the test is not blind to a no-op)
    assert ranks[0]["losses"][-1] != pytest.approx(plain_losses[-1], rel=1e-6, abs=0)
