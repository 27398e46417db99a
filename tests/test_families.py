"""Llama-style families (ouroboros_ds/models_hf.py) through the ring.

- Every supported family, tied and untied, saved with ``save_pretrained``: the pipeline's layers
  loaded from the directory give ``AutoModelForCausalLM``'s logits (fp32), and the export loads
  back as the same class with the pipeline's logits.
- Llama through DeepSpeed: the Ouroboros engine equals the single-process Reference bit for bit
  (every loss, every parameter) for G in {2, 3}, M in {1, 4}, tied and untied head, attention
  dropout on; in stash replay mode too; a resumed run equals the uninterrupted one bitwise.
- Llama in and out through a 2-stage ring: load, train, export; ``from_pretrained`` gives the
  trained pipeline's logits. DeepSpeed's stock 1F1B runs the same layers (with activation
  checkpointing of the decoder blocks) and its first loss is the ring's.
- Refused families name the reason.
"""
from __future__ import annotations

import datetime
import functools
import os
import warnings

import pytest
import torch

from ring import run_ranks
from test_equivalence import SEED, _parameters, batches, ds_config, steps_for

VOCAB, SEQ, MICRO = 64, 8, 2  # as test_equivalence's batches
INIT_SEED = 7
LLAMA = dict(model_type="llama", num_hidden_layers=4, hidden_size=16, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=24, max_position_embeddings=SEQ)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "glm", "arcee", "seed_oss",
            "ernie4_5", "smollm3", "exaone4")


def llama_plan(tied: bool, dropout: float = 0.1):
    from ouroboros_ds import models_hf

    cfg = models_hf.named_config({**LLAMA, "tie_word_embeddings": tied}, VOCAB, dropout=dropout)
    return models_hf.layer_specs(cfg, seed=INIT_SEED)


# ------------------------------------------------------------------ single process: every family
def _as_pipeline(layers):
    """The layers of ``reference.build_layers`` under DeepSpeed's parameter names
    (``tied_modules.embed.*`` for a tied embedding, ``{layer index}.*`` otherwise)."""
    root = torch.nn.Module()
    tied = isinstance(layers[-1], functools.partial)
    if tied:
        root.tied_modules = torch.nn.ModuleDict({"embed": layers[0]})
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Module) and not (tied and i == 0):
            root.add_module(str(i), layer)
    return root


def _run(layers, ids):
    for m in layers:
        if isinstance(m, torch.nn.Module):
            m.eval()
    h = ids
    with torch.no_grad():
        for layer in layers:
            h = layer(h)
    return h


def _tiny(model_type: str, tied: bool):
    from transformers import AutoConfig

    # a sliding window shorter than the sequence where the family has one, so its mask matters
    return AutoConfig.for_model(model_type, num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=48, vocab_size=300,
                                max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0,
                                sliding_window=6, use_sliding_window=True, max_window_layers=1)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_auto_model_and_export_round_trip(tmp_path, family, tied):
    from transformers import AutoModelForCausalLM

    from ouroboros_ds import hf
    from ouroboros_ds.reference import build_layers

    torch.manual_seed(0)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    original = AutoModelForCausalLM.from_config(_tiny(family, tied)).eval()
    original.save_pretrained(src)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))  # bytes in a 300 vocab

    cfg = hf.config_from_pretrained(src, dropout=0.0)
    layers = build_layers(hf.layer_specs_of(cfg, seed=3))
    assert isinstance(layers[-1], functools.partial) == tied
    pipe = _as_pipeline(layers)
    assert hf.load_pretrained_weights(pipe, src, cfg) == len(list(pipe.parameters()))
    with torch.no_grad():
        want = original(ids).logits
    got = _run(layers, ids)
    print(f"{family} tied={tied}: max |pipeline - AutoModelForCausalLM| = {(got - want).abs().max().item():.3g}")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    with torch.no_grad():  # as training would: the export must carry the pipeline's weights
        for p in pipe.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved = _run(layers, ids)
    assert hf.export_pretrained(pipe, cfg, out) == out
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported) is type(original)
    assert exported.config.tie_word_embeddings == tied
    head, emb = exported.get_output_embeddings().weight, exported.get_input_embeddings().weight
    assert (head.data_ptr() == emb.data_ptr()) == tied
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, moved, rtol=0, atol=1e-5)
    assert (moved - want).abs().max() > 1e-3


def test_refused_families_name_the_reason(tmp_path):
    from transformers import GPT2Config, MixtralConfig, T5Config

    from ouroboros_ds import hf

    MixtralConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32,
                  vocab_size=64).save_pretrained(tmp_path / "mixtral")
    with pytest.raises(ValueError, match="'mixtral' model is not supported \\(mixture of experts"):
        hf.config_from_pretrained(str(tmp_path / "mixtral"))
    T5Config(d_model=16, num_heads=2, num_layers=1, vocab_size=64).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="'t5' model is not supported \\(encoder-decoder"):
        hf.config_from_pretrained(str(tmp_path / "t5"))
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, tie_word_embeddings=False).save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match="tie_word_embeddings=false"):
        hf.config_from_pretrained(str(tmp_path / "g"))


def test_config_mistakes_are_named():
    from ouroboros_ds import models_hf

    with pytest.raises(ValueError, match="pad_token_id=300 is outside the vocabulary"):
        models_hf.named_config({**LLAMA, "pad_token_id": 300}, 256)
    with pytest.raises(ValueError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        models_hf.named_config({**LLAMA, "num_key_value_heads": 3}, 256)
    with pytest.raises(ValueError, match="needs a model_type"):
        models_hf.named_config({"hidden_size": 8}, 256)


@pytest.mark.parametrize("name", sorted(__import__("ouroboros_ds.models_hf", fromlist=["SIZES"]).SIZES))
def test_named_configs_build(name):
    from ouroboros_ds import models_hf
    from ouroboros_ds.reference import build_layers

    cfg = models_hf.named_config(name, 256, dropout=0.1)
    plan = models_hf.layer_specs(cfg)
    assert len(plan.block_indices) == cfg.num_hidden_layers
    logits = _run(build_layers(plan), torch.randint(0, 256, (1, 5)))
    assert logits.shape == (1, 5, 256) and torch.isfinite(logits).all()


def test_layers_seeded_and_keyed():
    """Layer i is built under seed + i whatever builds it; with dropout on, a forward under the
    same key repeats its masks exactly and another key draws others."""
    from ouroboros_ds.context import dropout_key
    from ouroboros_ds.reference import build_layers

    a, b = build_layers(llama_plan(True)), build_layers(llama_plan(True))
    for la, lb in zip(a, b):
        if isinstance(la, torch.nn.Module):
            assert all(torch.equal(p, q) for p, q in zip(la.parameters(), lb.parameters()))
    block = a[1]
    block.train()
    h = torch.randn(2, SEQ, LLAMA["hidden_size"])
    with dropout_key(1, 0, 0):
        y1 = block(h)
    with dropout_key(1, 0, 0):
        y2 = block(h)
    with dropout_key(1, 0, 1):
        y3 = block(h)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_synchronous_ring_trains_like_the_transformers_model(tied):
    """Delays forced to 0, the Reference on the family's layers (G = 2, M = 4) takes the same steps
    as training ``LlamaForCausalLM`` itself with the same optimizer: the layer wiring (rotary, mask,
    tie, head) is the model's, in the backward too. Dropout off (transformers' is not keyed)."""
    from transformers import AutoModelForCausalLM

    from ouroboros_ds import hf
    from ouroboros_ds.models import lm_loss
    from ouroboros_ds.reference import Reference, make_optimizer, make_scheduler

    G, M, steps = 2, 4, 4
    cfg_ds = {**ds_config(M, steps), "gradient_clipping": 0.0}  # the Reference clips per stage
    plan = llama_plan(tied, dropout=0.0)
    ref = Reference(plan, G, cfg_ds, lm_loss, seed=SEED, synchronous=True)
    model = AutoModelForCausalLM.from_config(plan.config)
    mine = hf.local_named_tensors(_as_pipeline(ref.layers), plan.config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(mine[name])
    opt = make_optimizer(list(model.parameters()), cfg_ds)
    sch = make_scheduler(opt, cfg_ds)
    data = batches(steps, M)
    for micro_batches in data:
        ref_loss = ref.step(micro_batches)
        losses = []
        for ids, labels in micro_batches:
            loss = lm_loss(model(ids).logits, labels)
            (loss / M).backward()
            losses.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sch.step()
        assert abs(torch.stack(losses).mean().item() - ref_loss) <= 1e-6 * ref_loss
    worst = 0.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(mine[name].detach(), p.detach(), atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        worst = max(worst, (mine[name] - p).abs().max().item())
    print(f"tied={tied}: synchronous Reference vs LlamaForCausalLM training, max |param diff| = {worst:.3g}")
    assert any(not torch.equal(mine[n].detach(), p) for n, p in _reference_init_named(tied, plan.config).items())


def _reference_init_named(tied, config):
    from ouroboros_ds import hf
    from ouroboros_ds.reference import build_layers

    return {n: p.detach() for n, p in
            hf.local_named_tensors(_as_pipeline(build_layers(llama_plan(tied, dropout=0.0))), config).items()}


# ------------------------------------------------------------------ DeepSpeed ranks
def _engine(G, M, tied, replay="recompute"):
    from ouroboros_ds import initialize
    from ouroboros_ds.models import lm_loss
    from ouroboros_ds.module import OuroborosPipelineModule

    plan = llama_plan(tied)
    mod = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, block_indices=plan.block_indices)
    engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=ds_config(M, steps_for(G)),
                            seed=SEED, replay=replay)
    return engine, mod


def _feed(engine, G, M, start=0):
    return iter([mb for step in batches(steps_for(G), M)[start:] for mb in step]) if engine.stage_id == 0 else None


# (tied, M, replay) cases per G; the untied M = 4 run of G = 2 also saves a checkpoint
CASES = {2: [(True, 1, "recompute"), (True, 4, "recompute"), (False, 1, "recompute"), (False, 4, "recompute"),
             (True, 4, "stash"), (False, 4, "stash")],
         3: [(True, 1, "recompute"), (True, 4, "recompute"), (False, 1, "recompute"), (False, 4, "recompute")]}
RESUME = (2, False, 4, "recompute")
SAVE_AT = 3


def ring_worker(rank, G, out, srcs):
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
        results[(tied, M, replay)] = {"losses": losses, "params": _parameters(mod), "stage": engine.stage_id,
                                      "warnings": [str(w.message)[:200] for w in caught]}
    if G == 2:
        results["1f1b"] = _stock_1f1b_first_loss(G, 4)
        for tied, src in srcs.items():
            results[("round_trip", tied)] = _round_trip(G, src, os.path.join(out, f"export_{tied}"))
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
    torch.save({"start": start, "losses": losses, "params": _parameters(mod)}, os.path.join(out, f"resume{rank}.pt"))


def _stock_1f1b_first_loss(G, M):
    """DeepSpeed's 1F1B on the same layers, decoder blocks activation-checkpointed: step 0's loss."""
    from ouroboros_ds import initialize, models_hf
    from ouroboros_ds.baseline import BaselinePipelineModule
    from ouroboros_ds.models import lm_loss

    plan = llama_plan(True)
    mod = BaselinePipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, partition_method="type:Block",
                         activation_checkpoint_interval=1, checkpointable_layers=[models_hf.BLOCK_CLASS])
    blocks = [sum(type(f).__name__ == models_hf.BLOCK_CLASS for f in mod.forward_funcs)]
    engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=ds_config(M, steps_for(G)),
                            seed=SEED)
    loss = engine.train_batch(iter(batches(1, M)[0]))
    return {"loss": float(loss), "blocks": blocks}


@torch.no_grad()
def _pipeline_logits(module, G, ids, hidden):
    """Modules 1..K in ring order across the ranks (eval mode); stage 0 returns the logits."""
    import torch.distributed as tdist

    from ouroboros_ds.schedule import num_modules, stage_of

    module.eval()
    me, K, x = tdist.get_rank(), num_modules(G), None
    for k in range(1, K + 1):
        s, prev = stage_of(k, G), stage_of(k - 1, G) if k > 1 else None
        if s != me:
            continue
        if k == 1:
            x = ids
        elif prev != me:
            x = torch.empty(ids.shape[0], ids.shape[1], hidden)
            tdist.recv(x, src=prev)
        x = module.forward_module(k, x)
        if k < K and stage_of(k + 1, G) != me:
            tdist.send(x, dst=stage_of(k + 1, G))
    module.train()
    return x if me == 0 else None


def _probe():
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(5))


def _round_trip(G, src, out):
    """Load a saved Llama into the ring, train 4 steps, export; logits before and after."""
    from ouroboros_ds import hf, initialize
    from ouroboros_ds.models import lm_loss
    from ouroboros_ds.module import OuroborosPipelineModule

    cfg = hf.config_from_pretrained(src, dropout=0.1)
    plan = hf.layer_specs_of(cfg, seed=99)  # random init, then overwritten by the loaded weights
    mod = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, block_indices=plan.block_indices)
    hf.load_pretrained_weights(mod, src, cfg)
    before = _pipeline_logits(mod, G, _probe(), cfg.hidden_size)
    engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=ds_config(4, 4), seed=1)
    it = _feed(engine, 3, 4)
    for _ in range(4):
        engine.train_batch(it)
    after = _pipeline_logits(engine.module, G, _probe(), cfg.hidden_size)
    written = hf.export_pretrained(engine.module, cfg, out)
    return {"before": before, "after": after, "written": written}


_RUNS: dict = {}


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    """``ring_run(G)``: (per-rank results, output folder), computed once per G."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def get(G):
        if G not in _RUNS:
            out = str(tmp_path_factory.mktemp(f"families_g{G}"))
            srcs = {}
            if G == 2:
                torch.manual_seed(0)
                for tied in (True, False):
                    fields = {k: v for k, v in LLAMA.items() if k != "model_type"}
                    cfg = LlamaConfig(**fields, vocab_size=VOCAB, tie_word_embeddings=tied, head_dim=4,
                                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
                    srcs[tied] = os.path.join(out, f"src_{tied}")
                    LlamaForCausalLM(cfg).save_pretrained(srcs[tied])
            _RUNS[G] = None
            run_ranks(ring_worker, G, G, out, srcs, tmpdir=out, timeout=600)
            _RUNS[G] = ([torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(G)], out, srcs)
        if _RUNS[G] is None:
            pytest.fail(f"the G={G} ring run failed (see the first test of G={G})")
        return _RUNS[G]
    return get


def _reference(G, tied, M, replay):
    from ouroboros_ds.models import lm_loss
    from ouroboros_ds.reference import Reference

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        ref = Reference(llama_plan(tied), G, ds_config(M, steps_for(G)), lm_loss, seed=SEED, replay=replay)
        losses = [ref.step(b) for b in batches(steps_for(G), M)]
    finally:
        torch.set_num_threads(threads)
    return ref, losses


@pytest.mark.parametrize("case", [(G, *c) for G in (2, 3) for c in CASES[G]],
                         ids=lambda c: f"G{c[0]}-{'tied' if c[1] else 'untied'}-M{c[2]}-{c[3]}")
def test_llama_engine_equals_reference_bitwise(ring_run, case):
    G, tied, M, replay = case
    ranks = [r[(tied, M, replay)] for r in ring_run(G)[0]]
    ref, ref_losses = _reference(G, tied, M, replay)
    assert [r["stage"] for r in ranks] == list(range(G))
    assert ranks[0]["losses"] == ref_losses  # floats from .item(): exact
    assert all(x is None for r in ranks[1:] for x in r["losses"])
    ref_params = dict(ref.named_parameters())
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
    from ouroboros_ds.reference import build_layers

    seen = set()
    for i, layer in enumerate(build_layers(llama_plan(tied))):
        if isinstance(layer, torch.nn.Module):
            for n, p in layer.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{i}.{n}", p.detach()


def test_llama_resume_is_bitwise(ring_run, tmp_path):
    ranks, out, _ = ring_run(2)
    run_ranks(resume_worker, 2, out, tmpdir=str(tmp_path), timeout=300)
    G, tied, M, replay = RESUME
    for r in range(G):
        full = ranks[r][(tied, M, replay)]
        res = torch.load(os.path.join(out, f"resume{r}.pt"))
        assert res["start"] == SAVE_AT
        assert res["losses"] == full["losses"][SAVE_AT:]
        for name, p in full["params"].items():
            assert torch.equal(p, res["params"][name]), f"rank {r} {name}"


def test_stock_1f1b_runs_the_same_llama(ring_run):
    ranks, _, _ = ring_run(2)
    got = [r["1f1b"] for r in ranks]
    assert [g["blocks"] for g in got] == [[2], [2]]  # "type:Block" finds the decoder blocks
    ours = ranks[0][(True, 4, "recompute")]["losses"][0]
    assert all(abs(g["loss"] - ours) <= 1e-6 * abs(ours) for g in got), (got, ours)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_load_train_export_through_the_ring(ring_run, tied):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ranks, out, srcs = ring_run(2)
    got = ranks[0][("round_trip", tied)]
    assert got["written"] == os.path.join(out, f"export_{tied}") and ranks[1][("round_trip", tied)]["written"] is None
    original = AutoModelForCausalLM.from_pretrained(srcs[tied]).eval()
    with torch.no_grad():
        torch.testing.assert_close(got["before"], original(_probe()).logits, rtol=0, atol=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(got["written"]).eval()
    assert type(exported) is LlamaForCausalLM and exported.config.tie_word_embeddings == tied
    assert exported.config.rope_parameters["rope_type"] == "linear"
    with torch.no_grad():
        torch.testing.assert_close(exported(_probe()).logits, got["after"], rtol=0, atol=1e-5)
    assert (got["after"] - got["before"]).abs().max() > 1e-2


# ------------------------------------------------------------------ ZeRO-1 and bf16, G = 2 x D = 2
def dp_worker(rank, out):
    """Untied Llama on G = 2 stages x D = 2 replicas: ZeRO-1 in fp32, then ZeRO-1 in bf16."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from ouroboros_ds import initialize
    from ouroboros_ds.models import lm_loss
    from ouroboros_ds.module import OuroborosPipelineModule
    from test_scale_out import STEPS, config, replica_stream

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    dp_rank = PipeDataParallelTopology(num_pp=2, num_dp=2).get_coord(rank).data
    results = {}
    for name, bf16 in (("zero1", False), ("bf16_zero1", True)):
        plan = llama_plan(False)
        mod = OuroborosPipelineModule(plan.specs, num_stages=2, loss_fn=lm_loss, block_indices=plan.block_indices)
        engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=config(2, 1, bf16),
                                seed=SEED)
        it = iter(replica_stream(2, dp_rank)) if engine.stage_id == 0 else None
        losses = [engine.train_batch(it) for _ in range(STEPS)]
        results[name] = {"losses": [None if x is None else x.float().item() for x in losses],
                         "params": {n: p.float() for n, p in _parameters(mod).items()}, "stage": engine.stage_id,
                         "dp_rank": dp_rank, "optimizer": type(engine.optimizer).__name__,
                         "dtypes": sorted({str(p.dtype) for p in mod.parameters()})}
    torch.save(results, os.path.join(out, f"dp{rank}.pt"))


def test_llama_zero1_and_bf16_on_two_replicas(tmp_path):
    from ouroboros_ds.models import lm_loss
    from ouroboros_ds.reference import Reference
    from test_scale_out import GLOBAL_MB, STEPS, config, global_batches

    run_ranks(dp_worker, 4, str(tmp_path), tmpdir=str(tmp_path), timeout=600)
    ranks = [torch.load(tmp_path / f"dp{r}.pt") for r in range(4)]
    ref = Reference(llama_plan(False), 2, config(GLOBAL_MB, 0), lm_loss, seed=SEED)
    ref_losses = [ref.step(b) for b in global_batches()]
    ref_params = dict(ref.named_parameters())
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
    print(f"Llama bf16 ZeRO-1: max loss rel diff to fp32 over {STEPS} steps = {rel:.3g}")
    assert torch.isfinite(lbf).all() and rel < 1e-2
