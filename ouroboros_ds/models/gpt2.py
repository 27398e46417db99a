"""GPT-2-style language model as a list of pipeline layers, built from ``transformers`` blocks.

The layer list is ``[Embedding, Block x L, FinalNorm, Head]``; the head is the embedding's
``wte`` matrix (a ``TiedLayerSpec``), so input embedding and output projection are one
parameter. Every engine (Ouroboros, DeepSpeed's stock 1F1B, the single-process reference)
builds these same layers, so one seed gives them identical weights:

layer i initializes under seed ``seed + i`` and draws its dropout masks from the key the engine
sets around each forward (:mod:`ouroboros_ds.models.context`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from .context import init_weights, keyed_rng, seeded_init
from .xl import XLBlock, XLEmbedding

# Named sizes for --model. Anything else: a JSON object or a path to a JSON file of GPT2Config fields.
SIZES = {
    "tiny": dict(n_layer=4, n_embd=64, n_head=4, n_positions=256),
    "small": dict(n_layer=8, n_embd=256, n_head=8, n_positions=512),  # the benchmark's CPU shape
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024),
    # Transformer-XL (models_xl.py): n_positions is the segment length, mem_len the memory
    "xl-tiny": dict(arch="transfo-xl", n_layer=4, n_embd=64, n_head=4, n_positions=256, mem_len=64),
    "xl-base": dict(arch="transfo-xl", n_layer=12, n_embd=512, n_head=8, n_inner=2048, n_positions=512,
                    mem_len=512),  # the paper's enwik8 "base" shape
}


def model_fields(model: str | dict, sizes: dict, what: str) -> dict:
    """The config fields ``--model`` names: a key of ``sizes``, a dict, a JSON file or a JSON
    string (``what``: the config class, for the error message)."""
    if isinstance(model, dict):
        return dict(model)
    if model in sizes:
        return dict(sizes[model])
    if os.path.isfile(model):
        with open(model) as f:
            return json.load(f)
    try:
        return json.loads(model)
    except json.JSONDecodeError:
        raise ValueError(f"--model: {model!r} is neither a named size ({', '.join(sizes)}), "
                         f"a JSON object of {what} fields, nor a JSON file") from None


def gpt2_config(model: str | dict, vocab_size: int, dropout: float | None = None) -> GPT2Config:
    """A ``GPT2Config`` from a named size, a JSON string, a JSON file, or a dict of fields."""
    fields = model_fields(model, SIZES, "GPT2Config")
    fields.setdefault("vocab_size", vocab_size)
    if dropout is not None:
        fields.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    # GPT-2's default token ids (50256) mean nothing for a byte vocabulary.
    fields.setdefault("bos_token_id", None)
    fields.setdefault("eos_token_id", None)
    cfg = GPT2Config(**fields)
    cfg._attn_implementation = "sdpa"  # causal without a mask; eager would need one
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--model: n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
    return cfg


# ------------------------------------------------------------------ the layers
class Embedding(nn.Module):
    """Token + position embedding and dropout. Its ``wte`` is also the output projection."""

    def __init__(self, cfg: GPT2Config, init_seed: int | None = None):
        super().__init__()
        self.layer_idx = 0
        with seeded_init(init_seed):
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
            init_weights(self, cfg)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.n_positions = cfg.n_positions

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[-1]
        if T > self.n_positions:
            raise ValueError(f"sequence length {T} exceeds the model's n_positions={self.n_positions}; "
                             "use a shorter --seq-len or a model with more positions")
        pos = torch.arange(T, device=input_ids.device)
        h = self.wte(input_ids) + self.wpe(pos)
        with keyed_rng(self, h.device):
            return self.drop(h)


def lm_head(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """The tied output projection: logits = h @ wte^T (the ``forward_fn`` of the head's TiedLayerSpec)."""
    return F_.linear(hidden, embedding.wte.weight)


class Block(nn.Module):
    """One ``transformers`` GPT2Block (causal self-attention + MLP) as a pipeline layer."""

    def __init__(self, cfg: GPT2Config, layer_idx: int, init_seed: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        with seeded_init(init_seed):
            self.block = GPT2Block(cfg, layer_idx=layer_idx)
            init_weights(self.block, cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with keyed_rng(self, h.device):
            out = self.block(h)
        return out if torch.is_tensor(out) else out[0]


class FinalNorm(nn.Module):
    def __init__(self, cfg: GPT2Config, init_seed: int | None = None):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln_f(h)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in nats (labels are already shifted by the data)."""
    return F_.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


@dataclass
class LayerPlan:
    """What :func:`gpt2_layer_specs` returns: the specs and which of them are blocks."""

    specs: list
    block_indices: list[int]
    config: GPT2Config


def gpt2_layer_specs(cfg: GPT2Config, seed: int = 1234) -> LayerPlan:
    """``[Embedding, Block x n_layer, FinalNorm, Head]`` as DeepSpeed LayerSpecs, layer i seeded ``seed + i``.

    A config with ``arch="transfo-xl"`` gets the Transformer-XL layers (``models_xl.py``) instead."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embedding, block = Embedding, Block
    if getattr(cfg, "arch", "gpt2") == "transfo-xl":
        embedding, block = XLEmbedding, XLBlock

    specs = [TiedLayerSpec("embed", embedding, cfg, init_seed=seed, tied_weight_attr=["wte.weight"])]
    for i in range(cfg.n_layer):
        specs.append(LayerSpec(block, cfg, i + 1, init_seed=seed + i + 1))
    specs.append(LayerSpec(FinalNorm, cfg, init_seed=seed + cfg.n_layer + 1))
    specs.append(TiedLayerSpec("embed", embedding, cfg, init_seed=seed, forward_fn=lm_head,
                               tied_weight_attr=["wte.weight"]))
    return LayerPlan(specs, list(range(1, cfg.n_layer + 1)), cfg)
