"""Hugging Face in and out: a saved GPT2LMHeadModel loads into a 2-stage ring, trains,
exports, and ``AutoModelForCausalLM.from_pretrained`` gives the pipeline's logits."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import paper, pipeline_logits, run_ranks

VOCAB, SEQ, MICRO, M = 48, 8, 2, 2
HF_FIELDS = dict(n_layer=3, n_embd=16, n_head=2, n_positions=SEQ, vocab_size=VOCAB,
                 bos_token_id=None, eos_token_id=None)


def _ds_config():
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": M,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "gradient_clipping": 1.0, "steps_per_print": 10**9}


def _probe():
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(5))


def _ranks(rank, G, src, out, tmp, steps):
    import deepspeed
    from ouroboros_ds.train import hf
    from ouroboros_ds import initialize
    from ouroboros_ds.models.gpt2 import gpt2_layer_specs, lm_loss
    from ouroboros_ds.pipe.module import OuroborosPipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = hf.config_from_pretrained(src, dropout=0.0)
    plan = gpt2_layer_specs(cfg, seed=99)  # random init, then overwritten by the loaded weights
    model = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, block_indices=plan.block_indices)
    n = hf.load_pretrained_weights(model, src, cfg)
    assert n == len(list(model.parameters()))
    before = pipeline_logits(model, G, _probe(), HF_FIELDS["n_embd"])
    engine, *_ = initialize(model=model, model_parameters=list(model.parameters()), config=_ds_config(), seed=1,
                            ring=paper())
    g = torch.Generator().manual_seed(0)
    data = iter([(torch.randint(0, VOCAB, (MICRO, SEQ), generator=g), torch.randint(0, VOCAB, (MICRO, SEQ), generator=g))
                 for _ in range(steps * M)])
    for _ in range(steps):
        engine.train_batch(data if engine.stage_id == 0 else None)
    after = pipeline_logits(engine.module, G, _probe(), HF_FIELDS["n_embd"])
    written = hf.export_pretrained(engine.module, cfg, out)
    if rank == 0:
        assert written == out
        torch.save({"before": before, "after": after}, os.path.join(tmp, "logits.pt"))
    else:
        assert written is None
    _stock_1f1b(rank, src, out + "_1f1b", tmp)


@pytest.mark.parametrize("G", [2])
def test_save_pretrained_load_train_export_round_trip(tmp_path, G):
    """Ring: load, train, export, logits equal; then the stock partition in the same ranks."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    original = GPT2LMHeadModel(GPT2Config(**HF_FIELDS)).eval()
    original.save_pretrained(src)
    run_ranks(_ranks, G, G, src, out, str(tmp_path), 4, tmpdir=str(tmp_path))
    got = torch.load(tmp_path / "logits.pt")

    # Loading: the pipeline computes what the saved model computes.
    with torch.no_grad():
        ref = original(_probe()).logits
    torch.testing.assert_close(got["before"], ref, rtol=0, atol=2e-6)

    # Export: from_pretrained gives the trained pipeline's logits, and training changed them.
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        logits = exported(_probe()).logits
    torch.testing.assert_close(logits, got["after"], rtol=0, atol=2e-6)
    assert (got["after"] - got["before"]).abs().max() > 1e-2

    # The tied embedding stays tied: one tensor, and it was trained.
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() == exported.transformer.wte.weight.data_ptr()
    assert not torch.equal(exported.transformer.wte.weight, original.transformer.wte.weight)

    # DeepSpeed's stock 1F1B partition (tied embedding copied on the first and last stage), run
    # in the same ranks: it maps and exports the same way; the export's loss is the engine's.
    from ouroboros_ds.models.gpt2 import lm_loss

    got = torch.load(tmp_path / "eval.pt")
    exported = AutoModelForCausalLM.from_pretrained(out + "_1f1b").eval()
    with torch.no_grad():
        losses = [lm_loss(exported(x).logits, y) for x, y in got["batches"]]
    torch.testing.assert_close(torch.stack(losses).mean(), got["loss"].float().reshape(()), rtol=0, atol=2e-6)
    assert exported.lm_head.weight.data_ptr() == exported.transformer.wte.weight.data_ptr()


def test_untied_gpt2_is_refused_with_the_reason(tmp_path):
    """The GPT-2 layers' head is the embedding matrix; Llama-style families (tied or not) go
    through ouroboros_ds/models/families.py (tests/unit/test_families.py)."""
    from transformers import GPT2Config

    from ouroboros_ds.train import hf

    GPT2Config(**HF_FIELDS, tie_word_embeddings=False).save_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match="tie_word_embeddings=false"):
        hf.config_from_pretrained(str(tmp_path / "untied"))


def _stock_1f1b(rank, src, out, tmp):
    """DeepSpeed's stock 1F1B partition of the same saved model: load, train 2 steps, eval, export."""
    from deepspeed.pipe import PipelineModule

    from ouroboros_ds.train import hf
    from ouroboros_ds import initialize
    from ouroboros_ds.models.gpt2 import gpt2_layer_specs, lm_loss

    cfg = hf.config_from_pretrained(src, dropout=0.0)
    plan = gpt2_layer_specs(cfg, seed=99)
    model = PipelineModule(plan.specs, num_stages=2, loss_fn=lm_loss, partition_method="type:Block")
    hf.load_pretrained_weights(model, src, cfg)
    engine, *_ = initialize(model=model, model_parameters=list(model.parameters()), config=_ds_config(), seed=1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCAB, (MICRO, SEQ), generator=g), torch.randint(0, VOCAB, (MICRO, SEQ), generator=g))
               for _ in range(3 * M)]
    for s in range(2):
        engine.train_batch(iter(batches[s * M:(s + 1) * M]))
    loss = engine.eval_batch(iter(batches[2 * M:]), num_micro_batches=M)  # broadcast to all stages
    hf.export_pretrained(engine.module, cfg, out)
    if rank == 0:
        torch.save({"loss": loss, "batches": batches[2 * M:]}, os.path.join(tmp, "eval.pt"))
