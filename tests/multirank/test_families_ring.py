"""Llama-style families through DeepSpeed's ranks.

- The Ouroboros engine equals the single-process Reference bit for bit (every loss, every
  parameter) for G in {2, 3}, M in {1, 4}, tied and untied head, attention dropout on; in stash
  replay mode too; training raises no warning; a resumed run equals the uninterrupted one bitwise.
- A saved Llama in and out of a 2-stage ring: load, train, export; ``from_pretrained`` gives the
  trained pipeline's logits. DeepSpeed's stock 1F1B runs the same layers (decoder blocks
  activation-checkpointed) and its first loss is the ring's.
- G = 2 stages x D = 2 replicas: ZeRO-1 equals the Reference; bf16 ZeRO-1 stays close to fp32.
"""
from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch

from helpers import (FULL, full, SEED, VOCAB, batches, ds_config, paper, pipeline_logits, reference_run, run_once, run_ranks,
                     stage_parameters, steps_for)

SEQ = 8  # the length of helpers.batches
INIT_SEED = 7
LLAMA = dict(model_type="llama", num_hidden_layers=4, hidden_size=16, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=24, max_position_embeddings=SEQ)


def llama_plan(tied: bool, dropout: float = 0.1):
    from ouroboros_ds.models import families as models_hf

    cfg = models_hf.named_config({**LLAMA, "tie_word_embeddings": tied}, VOCAB, dropout=dropout)
    return models_hf.layer_specs(cfg, seed=INIT_SEED)


# ------------------------------------------------------------------ DeepSpeed ranks
def _engine(G, M, tied, replay="recompute"):
    from ouroboros_ds import initialize
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.pipe.module import OuroborosPipelineModule

    plan = llama_plan(tied)
    mod = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, block_indices=plan.block_indices)
    engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=ds_config(M, steps_for(G)),
                            seed=SEED, ring=paper(replay=replay))
    return engine, mod


def _feed(engine, G, M, start=0):
    return iter([mb for step in batches(steps_for(G), M)[start:] for mb in step]) if engine.stage_id == 0 else None


# (tied, M, replay) cases per G; the untied M = 4 run of G = 2 also saves a checkpoint
CASES = {2: [(True, 1, "recompute"), (True, 4, "recompute"), (False, 1, "recompute"), (False, 4, "recompute"),
             (True, 4, "stash"), (False, 4, "stash")],
         3: [(True, 1, "recompute"), (True, 4, "recompute"), (False, 1, "recompute"), (False, 4, "recompute")]}
RESUME = (2, False, 4, "recompute")
SAVE_AT = 3


def _src(out, tied):
    """Where the G = 2 run's saved Llama (tied head or not) lies."""
    return os.path.join(out, f"src_{tied}")


def ring_worker(rank, G, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    results = {}
    for tied, M, replay in CASES[G]:
        engine, mod = _engine(G, M, tied, replay)
        it, losses = _feed(engine, G, M), []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps_for(G)):
                loss = engine.train_batch(it)
                losses.append(None if loss is None else loss.item())
                if (G, tied, M, replay) == RESUME and engine.global_steps == SAVE_AT:
                    engine.save_ring_checkpoint(os.path.join(out, "ckpt"))
        results[(tied, M, replay)] = {"losses": losses, "params": stage_parameters(mod), "stage": engine.stage_id,
                                      "warnings": [str(w.message)[:200] for w in caught]}
    if G == 2:
        results["1f1b"] = _stock_1f1b_first_loss(G, 4)
        for tied in (True, False):
            results[("round_trip", tied)] = _round_trip(G, _src(out, tied), os.path.join(out, f"export_{tied}"))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def resume_worker(rank, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    G, tied, M, replay = RESUME
    engine, mod = _engine(G, M, tied, replay)
    engine.load_ring_checkpoint(os.path.join(out, "ckpt"))
    start, losses = engine.global_steps, []
    it = _feed(engine, G, M, start)
    for _ in range(start, steps_for(G)):
        loss = engine.train_batch(it)
        losses.append(None if loss is None else loss.item())
    torch.save({"start": start, "losses": losses, "params": stage_parameters(mod)}, os.path.join(out, f"resume{rank}.pt"))


def _stock_1f1b_first_loss(G, M):
    """DeepSpeed's 1F1B on the same layers, decoder blocks activation-checkpointed: step 0's loss."""
    from ouroboros_ds import initialize
    from ouroboros_ds.models import families as models_hf
    from ouroboros_ds.pipe.baseline import BaselinePipelineModule
    from ouroboros_ds.models.gpt2 import lm_loss

    plan = llama_plan(True)
    mod = BaselinePipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, partition_method="type:Block",
                         activation_checkpoint_interval=1, checkpointable_layers=[models_hf.BLOCK_CLASS])
    blocks = [sum(type(f).__name__ == models_hf.BLOCK_CLASS for f in mod.forward_funcs)]
    engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=ds_config(M, steps_for(G)),
                            seed=SEED)
    loss = engine.train_batch(iter(batches(1, M)[0]))
    return {"loss": float(loss), "blocks": blocks}


def _probe():
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(5))


def _round_trip(G, src, out):
    """Load a saved Llama into the ring, train 4 steps, export; logits before and after."""
    from ouroboros_ds.train import hf
    from ouroboros_ds import initialize
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.pipe.module import OuroborosPipelineModule

    cfg = hf.config_from_pretrained(src, dropout=0.1)
    plan = hf.layer_specs_of(cfg, seed=99)  # random init, then overwritten by the loaded weights
    mod = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, block_indices=plan.block_indices)
    hf.load_pretrained_weights(mod, src, cfg)
    before = pipeline_logits(mod, G, _probe(), cfg.hidden_size)
    engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=ds_config(4, 4), seed=1,
                            ring=paper())
    it = _feed(engine, 3, 4)
    for _ in range(4):
        engine.train_batch(it)
    after = pipeline_logits(engine.module, G, _probe(), cfg.hidden_size)
    written = hf.export_pretrained(engine.module, cfg, out)
    return {"before": before, "after": after, "written": written}


def _save_llamas(out):
    """A saved Llama with a tied head and one without, for the round trip through the ring."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    for tied in (True, False):
        fields = {k: v for k, v in LLAMA.items() if k != "model_type"}
        cfg = LlamaConfig(**fields, vocab_size=VOCAB, tie_word_embeddings=tied, head_dim=4,
                          rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
        LlamaForCausalLM(cfg).save_pretrained(_src(out, tied))


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    """``ring_run(G)``: (output folder, per-rank results), computed once per G."""
    return lambda G: run_once(tmp_path_factory, f"families_g{G}", ring_worker, G, timeout=600,
                              prepare=_save_llamas if G == 2 else None)


QUICK = {(2, True, 1, "recompute"), (2, False, 4, "stash"), RESUME}  # the other cases: --full


@pytest.mark.parametrize("case", [pytest.param((G, *c), marks=() if (G, *c) in QUICK else FULL,
                                               id=f"G{G}-{'tied' if c[0] else 'untied'}-M{c[1]}-{c[2]}")
                                  for G in (2, 3) for c in CASES[G]])
def test_llama_engine_equals_reference_bitwise(ring_run, case):
    G, tied, M, replay = case
    ranks = [r[(tied, M, replay)] for r in ring_run(G)[1]]
    ref_params, ref_losses = reference_run(G, M, steps_for(G), plan=llama_plan(tied), replay=replay)
    assert [r["stage"] for r in ranks] == list(range(G))
    assert ranks[0]["losses"] == ref_losses  # floats from .item(): exact
    assert all(x is None for r in ranks[1:] for x in r["losses"])
    names = [n for r in ranks for n in r["params"]]
    assert sorted(names) == sorted(ref_params)
    assert any(".lm_head." in n for n in names) != tied  # the untied head is a layer of its own
    for r in ranks:
        for name, p in r["params"].items():
            assert torch.equal(p, ref_params[name].detach()), f"{case} {name}: engine != reference"
        assert r["warnings"] == [], f"{case}: training warned: {r['warnings']}"
    init = dict(_reference_init(tied))
    assert all(not torch.equal(ref_params[n], init[n]) for n in ref_params), "some parameter never trained"


def _reference_init(tied):
    from ouroboros_ds.ring.reference import build_layers

    seen = set()
    for i, layer in enumerate(build_layers(llama_plan(tied))):
        if isinstance(layer, torch.nn.Module):
            for n, p in layer.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{i}.{n}", p.detach()


@FULL  # resume: test_resilience_checkpoint (GPT-2); the Llama state is the same engine state
def test_llama_resume_is_bitwise(ring_run, tmp_path):
    out, ranks = ring_run(2)
    run_ranks(resume_worker, 2, out, tmpdir=str(tmp_path), timeout=300, fresh=True)
    G, tied, M, replay = RESUME
    for r in range(G):
        full = ranks[r][(tied, M, replay)]
        res = torch.load(os.path.join(out, f"resume{r}.pt"))
        assert res["start"] == SAVE_AT
        assert res["losses"] == full["losses"][SAVE_AT:]
        for name, p in full["params"].items():
            assert torch.equal(p, res["params"][name]), f"rank {r} {name}"


def test_stock_1f1b_runs_the_same_llama(ring_run):
    _, ranks = ring_run(2)
    got = [r["1f1b"] for r in ranks]
    assert [g["blocks"] for g in got] == [[2], [2]]  # "type:Block" finds the decoder blocks
    ours = ranks[0][(True, 4, "recompute")]["losses"][0]
    assert all(abs(g["loss"] - ours) <= 1e-6 * abs(ours) for g in got), (got, ours)


@pytest.mark.parametrize("tied", [pytest.param(True, id="tied"), full(False, id="untied")])
def test_llama_load_train_export_through_the_ring(ring_run, tied):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out, ranks = ring_run(2)
    got = ranks[0][("round_trip", tied)]
    assert got["written"] == os.path.join(out, f"export_{tied}") and ranks[1][("round_trip", tied)]["written"] is None
    original = AutoModelForCausalLM.from_pretrained(_src(out, tied)).eval()
    with torch.no_grad():
        torch.testing.assert_close(got["before"], original(_probe()).logits, rtol=0, atol=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(got["written"]).eval()
    assert type(exported) is LlamaForCausalLM and exported.config.tie_word_embeddings == tied
    assert exported.config.rope_parameters["rope_type"] == "linear"
    with torch.no_grad():
        torch.testing.assert_close(exported(_probe()).logits, got["after"], rtol=0, atol=1e-5)
    assert (got["after"] - got["before"]).abs().max() > 1e-2


# ------------------------------------------------------------------ ZeRO-1 and bf16, G = 2 x D = 2
GLOBAL_MB, DP_STEPS = 4, 7  # global batches of 4 micro-batches; replica r gets micro-batches j * 2 + r


def dp_config(zero: int, bf16: bool) -> dict:
    cfg = {**ds_config(GLOBAL_MB, DP_STEPS), "gradient_accumulation_steps": GLOBAL_MB // 2,
           "zero_optimization": {"stage": zero}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def dp_worker(rank, out):
    """Untied Llama on G = 2 stages x D = 2 replicas: ZeRO-1 in fp32, then ZeRO-1 in bf16."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from ouroboros_ds import initialize
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.pipe.module import OuroborosPipelineModule

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    dp_rank = PipeDataParallelTopology(num_pp=2, num_dp=2).get_coord(rank).data
    results = {}
    for name, bf16 in (("zero1", False), ("bf16_zero1", True)):
        plan = llama_plan(False)
        mod = OuroborosPipelineModule(plan.specs, num_stages=2, loss_fn=lm_loss, block_indices=plan.block_indices)
        engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=dp_config(1, bf16),
                                seed=SEED, ring=paper())
        mine = [step[j * 2 + dp_rank] for step in batches(DP_STEPS, GLOBAL_MB) for j in range(GLOBAL_MB // 2)]
        it = iter(mine) if engine.stage_id == 0 else None
        losses = [engine.train_batch(it) for _ in range(DP_STEPS)]
        results[name] = {"losses": [None if x is None else x.float().item() for x in losses],
                         "params": {n: p.float() for n, p in stage_parameters(mod).items()}, "stage": engine.stage_id,
                         "dp_rank": dp_rank, "optimizer": type(engine.optimizer).__name__,
                         "dtypes": sorted({str(p.dtype) for p in mod.parameters()})}
    torch.save(results, os.path.join(out, f"dp{rank}.pt"))


@FULL  # ZeRO-1 + bf16 on 2 x 2: test_scale_out (GPT-2)
def test_llama_zero1_and_bf16_on_two_replicas(tmp_path):
    run_ranks(dp_worker, 4, str(tmp_path), tmpdir=str(tmp_path), timeout=600)
    ranks = [torch.load(tmp_path / f"dp{r}.pt") for r in range(4)]
    ref_params, ref_losses = reference_run(2, GLOBAL_MB, DP_STEPS, plan=llama_plan(False))
    fp32 = [r["zero1"] for r in ranks]
    assert {r["optimizer"] for r in fp32} == {"DeepSpeedZeroOptimizer"}
    got = {n: p for r in fp32 if r["dp_rank"] == 0 for n, p in r["params"].items()}
    assert set(got) == set(ref_params)
    worst = max((got[n] - ref_params[n].detach()).abs().max().item() for n in got)
    print(f"Llama G=2 x D=2 ZeRO-1 vs reference: max |param diff| = {worst:.3g}")
    for n in got:  # the replicas' gradient reduction sums in another order than one process
        torch.testing.assert_close(got[n], ref_params[n].detach(), atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    l32 = torch.tensor(next(r for r in fp32 if r["stage"] == 0)["losses"], dtype=torch.float64)
    torch.testing.assert_close(l32, torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-6, atol=0)
    bf = [r["bf16_zero1"] for r in ranks]
    assert all(r["dtypes"] == ["torch.bfloat16"] for r in bf)
    lbf = torch.tensor(next(r for r in bf if r["stage"] == 0)["losses"], dtype=torch.float64)
    rel = ((lbf - l32).abs() / l32).max().item()
    print(f"Llama bf16 ZeRO-1: max loss rel diff to fp32 over {DP_STEPS} steps = {rel:.3g}")
    assert torch.isfinite(lbf).all() and rel < 1e-2
