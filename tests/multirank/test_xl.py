"""Transformer-XL on the ring (``ouroboros_ds/models/xl.py``): the recurrence is right, and the
engine, which keeps each stage's memories and stashes the memory a forward read for its replay,
still equals the single-process Reference bit for bit."""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from helpers import (MICRO, SEED, SEQ, VOCAB, batches, ds_config, feed, paper, ring_engine, run_ranks, stage_parameters,
                     steps_for)

MEM_LEN = 6  # shorter than a segment (SEQ = 8): the memory is truncated, as in real runs


def xl_plan(mem_len=MEM_LEN, dropout=0.1):
    from ouroboros_ds.models.gpt2 import gpt2_config, gpt2_layer_specs

    cfg = gpt2_config({"arch": "transfo-xl", "n_layer": 4, "n_embd": 16, "n_head": 2, "n_positions": SEQ,
                       "mem_len": mem_len}, VOCAB, dropout=dropout)
    return gpt2_layer_specs(cfg, seed=7)


def test_memory_continues_the_segment():
    """One block over segment 2 with segment 1 as memory equals the same block over both
    segments at once (relative positions line up), and the written memory is the input's tail."""
    from ouroboros_ds.models.gpt2 import gpt2_config
    from ouroboros_ds.models.context import recurrent_memory
    from ouroboros_ds.models.xl import XLBlock

    cfg = gpt2_config({"arch": "transfo-xl", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64,
                       "mem_len": 16}, VOCAB, dropout=0.0)
    block = XLBlock(cfg, 1, init_seed=0).eval()
    with torch.no_grad():
        block.r_w_bias.normal_()
        block.r_r_bias.normal_()
    x = torch.randn(3, 32, 32)
    with torch.no_grad():
        full = block(x)  # no recurrent_memory context: no memory
        with recurrent_memory({}) as mem:
            first = block(x[:, :16])
        with recurrent_memory(mem) as mem2:
            second = block(x[:, 16:])
    torch.testing.assert_close(first, full[:, :16], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, full[:, 16:], atol=1e-5, rtol=1e-5)
    assert torch.equal(mem[1], x[:, :16]) and torch.equal(mem2[1], x[:, 16:])
    # without the memory, segment 2 is a different function: the test is not blind
    with torch.no_grad():
        alone = block(x[:, 16:])
    assert (alone - full[:, 16:]).abs().max() > 1e-3


def test_no_gradient_flows_into_memory():
    from ouroboros_ds.models.gpt2 import gpt2_config
    from ouroboros_ds.models.context import recurrent_memory
    from ouroboros_ds.models.xl import XLBlock

    cfg = gpt2_config({"arch": "transfo-xl", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 8,
                       "mem_len": 8}, VOCAB, dropout=0.0)
    block = XLBlock(cfg, 1, init_seed=0)
    x1 = torch.randn(2, 8, 16, requires_grad=True)
    with recurrent_memory({}) as mem:
        block(x1)
    assert not mem[1].requires_grad
    with recurrent_memory(mem):
        block(torch.randn(2, 8, 16)).sum().backward()
    assert x1.grad is None


def eval_data() -> list:
    """Three consecutive segments per row (Transformer-XL's evaluation layout)."""
    from ouroboros_ds.train.data import eval_batches

    tokens = torch.randint(0, VOCAB, (3 * MICRO * (SEQ + 1),), generator=torch.Generator().manual_seed(5))
    return eval_batches(tokens, SEQ, MICRO, ordered=True)


def chained_eval(model, K: int, mem: bool = True) -> float:
    """Mean loss over eval_data() through modules 1..K of a Reference, each module's memory
    carried from segment to segment (or none)."""
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.models.context import recurrent_memory

    model.train(False)
    mems, losses = {}, []
    with torch.no_grad():
        for x, y in eval_data():
            for k in range(1, K + 1):
                with recurrent_memory(mems.get(k) if mem else None) as mems[k]:
                     x = model.forward_module(k, x)
            losses.append(lm_loss(x, y))
    return torch.stack(losses).mean().item()


def worker(rank: int, G: int, Ms: tuple, out: str) -> None:
    import deepspeed

    from ouroboros_ds import initialize
    from ouroboros_ds.models.gpt2 import lm_loss

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    steps = steps_for(G)
    results = {}
    for M in (*Ms, "stash"):  # "stash": M = 4 with replay="stash" (kept graphs read the memory once)
        replay, M = ("stash", 4) if M == "stash" else ("recompute", M)
        engine, mod = ring_engine(G, ds_config(M, steps), plan=xl_plan(), replay=replay)
        it = feed(engine, batches(steps, M))
        losses, mem_keys = [], []
        for _ in range(steps):
            loss = engine.train_batch(it)
            losses.append(None if loss is None else loss.item())
            mem_keys.append((sorted(engine.mems), sorted(engine.stash_mems)))
        results[M if replay == "recompute" else "stash"] = {"losses": losses, "params": stage_parameters(mod), "mem_keys": mem_keys,
                      "local_modules": list(mod.local_modules), "in_flight": engine.in_flight_bytes()}
        if (M, replay) == (4, "recompute"):  # evaluation with memory, after training
            before = {k: sorted(v) for k, v in engine.mems.items()}
            loss = engine.eval_batch(iter(eval_data()), num_micro_batches=len(eval_data()))
            results["eval"] = None if loss is None else loss.item()
            assert {k: sorted(v) for k, v in engine.mems.items()} == before  # training memories untouched
    # the 1F1B baseline (KeyedPipelineEngine) evaluates with memory too; at initialization
    from deepspeed.pipe import PipelineModule
    base = PipelineModule(xl_plan().specs, num_stages=G, loss_fn=lm_loss, partition_method="type:XLBlock")
    engine, *_ = initialize(model=base, model_parameters=list(base.parameters()), config=ds_config(4, steps), seed=SEED)
    results["baseline_eval"] = engine.eval_batch(iter(eval_data()), num_micro_batches=len(eval_data())).item()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("G", [2])
def test_xl_engine_equals_reference(tmp_path, G):
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.reference import Reference

    Ms = (1, 4)
    run_ranks(worker, G, G, Ms, str(tmp_path), tmpdir=str(tmp_path), timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(G)]
    torch.set_num_threads(1)
    K, steps = G + 1, steps_for(G)
    for key in (*Ms, "stash"):
        M, replay = (4, "stash") if key == "stash" else (key, "recompute")
        ref = Reference(xl_plan(), G, ds_config(M, steps), lm_loss, seed=SEED, ring=paper(replay=replay))
        ref_losses = [ref.step(b) for b in batches(steps, M)]
        torch.testing.assert_close(torch.tensor(ranks[0][key]["losses"], dtype=torch.float64),
                                   torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-6, atol=0)
        ref_params = dict(ref.named_parameters())
        for r in ranks:
            for name, p in r[key]["params"].items():
                torch.testing.assert_close(p, ref_params[name].detach(), atol=1e-6, rtol=1e-5,
                                           msg=lambda m: f"{key} {name}: {m}")
        # each module keeps one memory per micro-batch stream, and the stash holds the memory of
        # every stashed forward but the very first (batch 0 had none)
        t = steps - 1
        for r in ranks:
            mems, stashed = r[key]["mem_keys"][t]
            assert mems == sorted((k, j) for k in r[key]["local_modules"] for j in range(M))
            want = sorted((k, b, j) for k in r[key]["local_modules"] if k < K
                          for b in range(max(1, t - (K - k) + 1), t + 1) for j in range(M))
            assert stashed == want, f"M={M} modules {r[key]['local_modules']}"
            assert r[key]["in_flight"] > 0

        if key == 4:  # evaluation carries each module's memory from segment to segment
            want = chained_eval(ref, K)
            assert ranks[0]["eval"] == pytest.approx(want, rel=1e-5, abs=0)
            assert abs(chained_eval(ref, K, mem=False) - want) > 1e-4  # not blind: memory matters

    # the baseline at initialization: the same evaluation (its stages hold the same layers)
    init = Reference(xl_plan(), G, ds_config(4, steps), lm_loss, seed=SEED, ring=paper())
    for r in ranks:
        assert r["baseline_eval"] == pytest.approx(chained_eval(init, K), rel=1e-5, abs=0)

    # the recurrence changes training: without memory the losses differ (not blind)
    ref0 = Reference(xl_plan(mem_len=0), G, ds_config(4, steps), lm_loss, seed=SEED, ring=paper())
    no_mem = [ref0.step(b) for b in batches(steps, 4)]
    assert no_mem[-1] != pytest.approx(ranks[0][4]["losses"][-1], rel=1e-6, abs=0)


def test_ordered_eval_batches_continue_each_row():
    from ouroboros_ds.train.data import eval_batches

    tokens = torch.arange(10 * 9 + 4)
    plain, ordered = eval_batches(tokens, 8, 3, ordered=False), eval_batches(tokens, 8, 3, ordered=True)
    assert len(plain) == len(ordered) == 3  # 10 windows: 3 batches of 3, the tenth left out
    # the same windows, laid out as 3 streams: row r of batch i + 1 continues row r of batch i
    assert sorted(plain_row.tolist() for x, _ in plain for plain_row in x) == \
        sorted(row.tolist() for x, _ in ordered for row in x)
    for (x0, _), (x1, _) in zip(ordered, ordered[1:]):
        assert torch.equal(x1[:, 0], x0[:, -1] + 2)  # next window: skips the label-only token


def test_ordered_stream_continues_each_row():
    from ouroboros_ds.train.data import BatchStream

    tokens = torch.arange(1000)
    a = BatchStream(tokens, 9, 2, 3, ordered=True)           # D = 1: 6 streams of 16 windows
    steps = [[next(a) for _ in range(3)] for _ in range(3)]
    for t in range(2):
        for j in range(3):
            x0, x1 = steps[t][j][0], steps[t + 1][j][0]
            assert torch.equal(x1[:, 0], x0[:, -1] + 2)     # next window: skips the label-only token
    # D = 2: replica r's micro-batch j is D = 1's micro-batch j*2 + r (same global batch)
    b = [BatchStream(tokens, 9, 1, 3, dp_rank=r, dp_size=2, ordered=True) for r in range(2)]
    one = BatchStream(tokens, 9, 1, 6, ordered=True)
    flat = [next(one)[0] for _ in range(6)]
    for j in range(3):
        for r in range(2):
            assert torch.equal(next(b[r])[0], flat[j * 2 + r])
