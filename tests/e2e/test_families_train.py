"""train.py with Llama-style models, as a user runs it (torchrun, 2 CPU ranks, a local text file).

- A tiny Llama (untied head, vocabulary larger than the byte tokenizer's, legacy ``rope_scaling``,
  an explicit ``head_dim``, token ids set, bf16 weights) and a tiny Qwen2 (tied head, GQA), saved
  with ``save_pretrained``: ``train.py --model DIR --export OUT`` trains each and OUT loads back
  as the same class; its loss on the run's validation windows is the one train.py reported.
- ``--model llama-tiny --schedule 1f1b --activation-checkpointing`` runs the stock engine on the
  same layers (the decoder blocks are what DeepSpeed's "type:Block" partition cuts).
"""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from helpers import FULL, full, ROOT, run_train

SEQ = 32


def _text(tmp_path) -> str:
    """A local corpus: the repository's documentation (about 100 KB of English and code)."""
    parts = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(parts + [open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()]))
    return str(path)


def _ds_config(tmp_path) -> str:
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
           "gradient_clipping": 1.0, "steps_per_print": 10**9}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _save(kind: str, path: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=SEQ,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=10000.0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    else:
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    return type(model)


@pytest.mark.parametrize("kind", ["llama", full("qwen2", id="qwen2")])  # qwen2: --full
def test_train_py_loads_trains_and_exports(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from ouroboros_ds.train import data as D
    from ouroboros_ds.models.gpt2 import lm_loss

    src, out, metrics = str(tmp_path / "src"), str(tmp_path / "out"), tmp_path / "m.jsonl"
    cls = _save(kind, src)
    text = _text(tmp_path)
    r = run_train(["--model", src, "--export", out, "--data", text, "--deepspeed_config", _ds_config(tmp_path),
              "--steps", "6", "--sync-steps", "2", "--seq-len", str(SEQ), "--eval-every", "0", "--eval-batches", "3",
              "--no-progress", "--metrics", str(metrics)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Warning:" not in r.stderr + r.stdout, (r.stderr + r.stdout)[-3000:]
    assert f"initialized from {src}" in r.stdout and f"exported to {out}" in r.stdout

    original = AutoModelForCausalLM.from_pretrained(src)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported) is cls
    assert exported.config.tie_word_embeddings == original.config.tie_word_embeddings
    assert exported.config.vocab_size == original.config.vocab_size
    if kind == "llama":
        assert exported.config.rope_parameters["rope_type"] == "linear" and exported.config.head_dim == 16
    assert not torch.equal(exported.model.embed_tokens.weight, original.model.embed_tokens.weight.float())

    # the export computes what the pipeline computed: its loss on train.py's validation windows
    val = [x for x in map(json.loads, metrics.read_text().splitlines()) if "val_loss" in x][-1]
    tok = D.load_token_data(text)
    batches = D.eval_batches(tok.val, SEQ, 4, max_batches=3)
    with torch.no_grad():
        loss = torch.stack([lm_loss(exported(x).logits, y) for x, y in batches]).mean().item()
    assert abs(loss - val["val_loss"]) <= 1e-5 * val["val_loss"], (loss, val)


@FULL  # 1F1B with activation checkpointing through train.py: test_bench_and_flags
def test_train_py_named_llama_with_1f1b_and_checkpointing(tmp_path):
    r = run_train(["--model", "llama-tiny-untied", "--schedule", "1f1b", "--activation-checkpointing",
              "--data", _text(tmp_path), "--deepspeed_config", _ds_config(tmp_path), "--steps", "3",
              "--seq-len", str(SEQ), "--eval-every", "0", "--eval-batches", "2", "--no-progress",
              "--export", str(tmp_path / "out")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "model: llama (untied head, 4 heads / 2 key-value heads" in r.stdout
    # DeepSpeed's partition report: each stage holds two decoder blocks
    assert r.stdout.count("DecoderBlock") == 4, r.stdout[-3000:]
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))) is LlamaForCausalLM

