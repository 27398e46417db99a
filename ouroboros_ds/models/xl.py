"""Transformer-XL (Dai et al., 2019) as pipeline layers: segment-level recurrence with relative
positional attention, the model the Ouroboros paper trained.

The layer list is ``[XLEmbedding, XLBlock x n_layer, FinalNorm, Head]`` with the same tied
embedding and output projection as the GPT-2 layers (``models.py``), so the ring, the reference
and the checkpoints treat both families alike. Configuration is a ``GPT2Config`` with
``arch="transfo-xl"`` and ``mem_len`` (``--model xl-tiny``, ``xl-base`` or JSON); ``n_positions`` is
the longest segment.

**Memory.** Each block attends over ``[memory, segment]``, where its memory is its own input of
the previous segment(s), the last ``mem_len`` positions, detached (no gradient flows into the
memory, as in the authors' code). Which memory a layer reads and where it writes the next one is
set by whoever runs it, with :func:`ouroboros_ds.models.context.recurrent_memory`, the way :func:`~ouroboros_ds.models.context.dropout_key` sets the
dropout masks: the layers keep no state, so the Ouroboros engine can keep one memory per
(module, micro-batch stream) on the stage that holds the module, stash the memory a forward used
next to its input, and give the replay exactly that memory. Outside ``recurrent_memory`` a block
has no memory (evaluation, GPT-2-style use).

Deviations from the authors' code, all deliberate: pre-LayerNorm blocks (their ``pre_lnorm``
option) for stability at small scale; per-layer ``r_w_bias``/``r_r_bias`` (their ``untie_r``), since
a bias shared by all layers would be a cross-stage tied weight; no adaptive softmax or embedding
scaling (byte vocabularies are small); GPT-2's initialization.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F_

from .context import init_weights, keyed_rng, memory_context, seeded_init

def _sinusoid(klen: int, d: int, device, dtype) -> torch.Tensor:
    """Relative position embeddings for distances klen-1 .. 0 (Transformer-XL's order)."""
    pos = torch.arange(klen - 1, -1, -1.0, device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d, 2.0, device=device) / d))
    ang = pos[:, None] * inv_freq[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).to(dtype)


class XLEmbedding(nn.Module):
    """Token embedding and dropout, no absolute positions (attention is relative). Its ``wte``
    is also the output projection (``models.lm_head``)."""

    def __init__(self, cfg, init_seed: int | None = None):
        super().__init__()
        self.layer_idx = 0
        with seeded_init(init_seed):
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            init_weights(self, cfg)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.n_positions = cfg.n_positions

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] > self.n_positions:
            raise ValueError(f"segment length {input_ids.shape[-1]} exceeds the model's n_positions="
                             f"{self.n_positions}; use a shorter --seq-len or set n_positions in --model")
        h = self.wte(input_ids)
        with keyed_rng(self, h.device):
            return self.drop(h)


class XLBlock(nn.Module):
    """Relative multi-head attention over [memory, segment] + feed-forward, pre-LayerNorm."""

    def __init__(self, cfg, layer_idx: int, init_seed: int | None = None):
        super().__init__()
        self.layer_idx, self.mem_len = layer_idx, int(getattr(cfg, "mem_len", 0))
        d, H = cfg.n_embd, cfg.n_head
        self.n_head, self.d_head = H, d // H
        inner = cfg.n_inner or 4 * d
        with seeded_init(init_seed):
            self.ln_1 = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.r_net = nn.Linear(d, d, bias=False)
            self.c_proj = nn.Linear(d, d, bias=False)
            self.r_w_bias = nn.Parameter(torch.zeros(H, self.d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(H, self.d_head))
            self.ln_2 = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
            self.ff_in = nn.Linear(d, inner)
            self.ff_out = nn.Linear(inner, d)
            init_weights(self, cfg)
            self.ff_out.weight.data.div_(math.sqrt(2 * cfg.n_layer))  # residual projections, as GPT-2's c_proj
        self.drop = nn.Dropout(cfg.resid_pdrop)
        self.dropatt = nn.Dropout(cfg.attn_pdrop)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ctx = memory_context()
        mem = ctx[0].get(self.layer_idx) if ctx else None
        cat = h if mem is None else torch.cat([mem.to(h.dtype), h], dim=1)
        if ctx is not None and self.mem_len > 0:
            ctx[1][self.layer_idx] = cat[:, -self.mem_len:].detach()
        with keyed_rng(self, h.device):
            return self._forward(h, cat)

    def _forward(self, h, cat):
        B, T, d = h.shape
        klen, H, dh = cat.shape[1], self.n_head, self.d_head
        q, k, v = self.qkv(self.ln_1(cat)).split(d, dim=-1)
        q = q[:, -T:].reshape(B, T, H, dh)
        k, v = k.reshape(B, klen, H, dh), v.reshape(B, klen, H, dh)
        r = self.r_net(self.drop(_sinusoid(klen, d, h.device, h.dtype))).reshape(klen, H, dh)
        ac = torch.einsum("bihd,bjhd->bhij", q + self.r_w_bias, k)
        bd = torch.einsum("bihd,jhd->bhij", q + self.r_r_bias, r)
        # query i sits at position klen - T + i; key j at distance klen - T + i - j, which is
        # column (klen - 1) - distance = j + T - 1 - i of bd (columns run from distance klen-1 to 0)
        i = torch.arange(T, device=h.device)[:, None]
        j = torch.arange(klen, device=h.device)[None, :]
        bd = bd.gather(-1, (j + T - 1 - i).clamp(max=klen - 1).expand(B, H, T, klen))
        score = (ac + bd) / math.sqrt(dh)
        score = score.masked_fill(j > klen - T + i, float("-inf"))  # causal: no key after the query
        prob = self.dropatt(score.softmax(dim=-1))
        att = torch.einsum("bhij,bjhd->bihd", prob, v).reshape(B, T, d)
        h = h + self.drop(self.c_proj(att))
        return h + self.drop(self.ff_out(self.drop(F_.relu(self.ff_in(self.ln_2(h))))))

