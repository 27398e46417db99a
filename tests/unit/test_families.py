"""Llama-style families (ouroboros_ds/models/families.py) in one process.

- Every supported family, tied and untied, saved with ``save_pretrained``: the pipeline's layers
  loaded from the directory give ``AutoModelForCausalLM``'s logits (fp32), and the export loads
  back as the same class with the pipeline's logits.
- With delays forced to 0 the Reference on Llama's layers takes the same steps as training
  ``LlamaForCausalLM`` itself.
- Seeded, keyed layers; named sizes; refused families and config mistakes name the reason.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

from helpers import SEED, VOCAB, batches, ds_config, paper

INIT_SEED = 7
SEQ = 8
LLAMA = dict(model_type="llama", num_hidden_layers=4, hidden_size=16, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=24, max_position_embeddings=SEQ)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "glm", "arcee", "seed_oss",
            "ernie4_5", "smollm3", "exaone4")


def llama_plan(tied: bool, dropout: float = 0.1):
    from ouroboros_ds.models import families as models_hf

    cfg = models_hf.named_config({**LLAMA, "tie_word_embeddings": tied}, VOCAB, dropout=dropout)
    return models_hf.layer_specs(cfg, seed=INIT_SEED)


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

    from ouroboros_ds.train import hf
    from ouroboros_ds.ring.reference import build_layers

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

    from ouroboros_ds.train import hf

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
    from ouroboros_ds.models import families as models_hf

    with pytest.raises(ValueError, match="pad_token_id=300 is outside the vocabulary"):
        models_hf.named_config({**LLAMA, "pad_token_id": 300}, 256)
    with pytest.raises(ValueError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        models_hf.named_config({**LLAMA, "num_key_value_heads": 3}, 256)
    with pytest.raises(ValueError, match="needs a model_type"):
        models_hf.named_config({"hidden_size": 8}, 256)


@pytest.mark.parametrize("name", sorted(__import__("ouroboros_ds.models.families", fromlist=["SIZES"]).SIZES))
def test_named_configs_build(name):
    from ouroboros_ds.models import families as models_hf
    from ouroboros_ds.ring.reference import build_layers

    cfg = models_hf.named_config(name, 256, dropout=0.1)
    plan = models_hf.layer_specs(cfg)
    assert len(plan.block_indices) == cfg.num_hidden_layers
    logits = _run(build_layers(plan), torch.randint(0, 256, (1, 5)))
    assert logits.shape == (1, 5, 256) and torch.isfinite(logits).all()


def test_layers_seeded_and_keyed():
    """Layer i is built under seed + i whatever builds it; with dropout on, a forward under the
    same key repeats its masks exactly and another key draws others."""
    from ouroboros_ds.models.context import dropout_key
    from ouroboros_ds.ring.reference import build_layers

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

    from ouroboros_ds.train import hf
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.reference import Reference, make_optimizer, make_scheduler

    G, M, steps = 2, 4, 4
    cfg_ds = {**ds_config(M, steps), "gradient_clipping": 0.0}  # the Reference clips per stage
    plan = llama_plan(tied, dropout=0.0)
    ref = Reference(plan, G, cfg_ds, lm_loss, seed=SEED, synchronous=True, ring=paper())
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
    from ouroboros_ds.train import hf
    from ouroboros_ds.ring.reference import build_layers

    return {n: p.detach() for n, p in
            hf.local_named_tensors(_as_pipeline(build_layers(llama_plan(tied, dropout=0.0))), config).items()}


def test_bad_family_input_names_the_fix(tmp_path):
    from transformers import MixtralConfig

    from ouroboros_ds.train.config import model_config, parse_config

    def error(model):
        with pytest.raises(ValueError) as e:
            model_config(parse_config(["--model", model]), 256)
        return str(e.value)

    assert "llama-tiny" in error("llama-tny") and "tiny" in error("llama-tny")
    small = json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 16, "num_attention_heads": 2,
                        "num_hidden_layers": 2, "intermediate_size": 32})
    assert "vocab_size=100 is smaller than the tokenizer's vocabulary 256" in error(small)
    MixtralConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32,
                  vocab_size=256).save_pretrained(tmp_path / "moe")
    assert "'mixtral' model is not supported (mixture of experts" in error(str(tmp_path / "moe"))
