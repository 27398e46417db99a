"""The per-stage clip threshold in the engine (``stage_clip``: "split" clips each stage at
``gradient_clipping / sqrt(G)``, on by default; "whole" at ``gradient_clipping``, the paper's rule).

- G = 2, M = 4, with the default run's other mitigations (weight prediction, look-ahead, two
  synchronous steps) and a clip that acts: the engine with "split" equals the single-process
  Reference with "split" **bit for bit** (plain fp32 optimizer) and within 1e-6 with ZeRO-1; the
  Reference with "whole" differs (the test is not blind).
- Every clip reads the split threshold: the fp32 path's, ZeRO-1's and BF16_Optimizer's, which take
  it when they are built.
- ``initialize``: None reads the config's ``"ouroboros"`` object, the paper's switch keeps "whole",
  the 1F1B baseline refuses "split" and ignores the object (DeepSpeed's own clip over the whole model).
"""
from __future__ import annotations

import datetime
import math
import os

import pytest
import torch

from helpers import (batches, ds_config, feed, initialize_reads, reference_run, ring_engine, run_once,
                     stage_parameters)

G, M, STEPS = 2, 4, 7
DEFAULT_RUN = dict(weight_prediction=1.0, lookahead=3.0, sync_steps=2)  # the default run's other mitigations


def _train(cfg, **options):
    engine, mod = ring_engine(G, cfg, **DEFAULT_RUN, **options)
    it, losses = feed(engine, batches(STEPS, M)), []
    for _ in range(STEPS):
        loss = engine.train_batch(it)
        losses.append(None if loss is None else loss.item())
    return {"losses": losses, "params": stage_parameters(mod), "stage": engine.stage_id,
            "threshold": engine.gradient_clipping(), "wrapper_clip": getattr(engine.optimizer, "clip_grad", None),
            "optimizer": type(engine.optimizer).__name__}


def worker(rank, G, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    cfg = ds_config(M, STEPS)
    res = {"fp32": _train(cfg, stage_clip="split"),
           "zero1": _train({**cfg, "zero_optimization": {"stage": 1}}, stage_clip="split"),
           "bf16": _train({**cfg, "bf16": {"enabled": True}}, stage_clip="split"),
           "initialize": initialize_reads(G, "stage_clip", "split", "whole",
                                          lambda e: (e.stage_clip, e.gradient_clipping()),
                                          lambda e: e.gradient_clipping(), bad="half")}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_once(tmp_path_factory, "stage_clip", worker, G, timeout=600)[1]


def _params(ranks, name):
    return {n: p for r in ranks for n, p in r[name]["params"].items()}


def test_split_engine_equals_reference_bit_for_bit(ranks):
    want, losses = reference_run(G, M, STEPS, stage_clip="split", **DEFAULT_RUN)
    got = _params(ranks, "fp32")
    assert set(got) == set(want)
    for n in got:
        assert torch.equal(got[n], want[n].detach()), f"{n}: engine and Reference differ"
    assert ranks[0]["fp32"]["losses"] == losses
    whole, _ = reference_run(G, M, STEPS, stage_clip="whole", **DEFAULT_RUN)
    assert any(not torch.equal(got[n], whole[n].detach()) for n in got), "split and whole clip gave the same run"


def test_split_with_zero1_follows_the_reference(ranks):
    want, _ = reference_run(G, M, STEPS, stage_clip="split", **DEFAULT_RUN)
    assert {r["zero1"]["optimizer"] for r in ranks} == {"DeepSpeedZeroOptimizer"}
    got = _params(ranks, "zero1")
    for n in got:
        torch.testing.assert_close(got[n], want[n].detach(), atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name,wrapper", [("fp32", None), ("zero1", "DeepSpeedZeroOptimizer"),
                                          ("bf16", "BF16_Optimizer")])
def test_every_clip_reads_the_split_threshold(ranks, name, wrapper):
    split = ds_config(M, STEPS)["gradient_clipping"] / math.sqrt(G)
    for r in ranks:
        assert r[name]["threshold"] == split
        if wrapper:
            assert r[name]["optimizer"] == wrapper and r[name]["wrapper_clip"] == split


def test_initialize_reads_stage_clip(ranks):
    c = ds_config(1, 4)["gradient_clipping"]  # initialize_reads' config
    got = ranks[0]["initialize"]
    assert got["object"] == ("split", c / math.sqrt(G))
    assert got["argument"] == ("whole", c)
    assert got["paper"] == ("whole", c)
    assert got["none"] == ("split", c / math.sqrt(G))  # RingConfig()'s default, train.py's too
    assert got["bad"].startswith("stage_clip: must be 'split'")
    assert got["baseline, object"] == c  # DeepSpeed's own whole-model clip
    assert got["baseline, argument"].startswith("ring / replay_plan: only an OuroborosPipelineModule")
    assert got["both"].startswith("ring= and the config's")
