"""Llama-style decoder families as pipeline layers, built from ``transformers``' own layer classes.

``transformers`` builds Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3, OLMo-2 and their kin from the
same parts: a token embedding, a stack of ``<Family>DecoderLayer`` (RMSNorm, rotary attention with
grouped-query heads, gated MLP), a final ``<Family>RMSNorm`` and a linear head, tied to the
embedding in the small members of a family and untied in the large ones. Their ``<Family>Model``
computes the rotary ``(cos, sin)`` and the causal mask once and hands them to every layer. A ring
sends only hidden states between stages, so here each decoder layer computes them itself, from
the sequence length of its input (a ``(T, head_dim)`` table and, with SDPA, usually no mask at
all: far cheaper than the layer):

    DecoderBlock.forward(h):                     # h: [B, T, hidden]
        pos  = arange(T)[None]
        rope = <Family>RotaryEmbedding(h, pos)   # the family's own rotary (rope_parameters, scaling)
        mask = create_causal_mask(...) or create_sliding_window_causal_mask(...)   # per layer type
        with keyed_rng(layer i): return <Family>DecoderLayer(h, mask, pos, rope)

The layer list is ``[Embedding, DecoderBlock x L, FinalNorm, head]``, as for GPT-2
(:func:`ouroboros_ds.models.gpt2.gpt2_layer_specs`): layer i initializes under seed ``seed + i`` and
draws its dropout masks (``attention_dropout``, Phi-3's residual dropout) from the key the engine
sets around each forward. With ``tie_word_embeddings`` the head is a ``TiedLayerSpec`` of the
embedding (one parameter on stage 0); without, it is a layer of its own (``lm_head``) in module K,
which is on stage 0 too: the ring and the delays are the same, only the tied-gradient sum goes.

No attention, MLP or norm is written here: :func:`layer_classes` finds the family's classes in
``transformers.models.<model_type>.modeling_<model_type>``. Which families are supported, and
why others are refused, is in :data:`FAMILIES` and :func:`check_family` (docs/families.md).
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_

from .context import keyed_rng, seeded_init
from .gpt2 import LayerPlan, model_fields


@dataclass(frozen=True)
class Family:
    """What differs between the supported families outside their layer classes."""

    masks: str = "causal"
    """Which causal mask each layer gets, as the family's ``<Family>Model.forward`` chooses it:
    "causal" (full causal attention), "sliding" (a sliding window when ``config.sliding_window``
    is set, else causal) or "layer_types" (``config.layer_types[i]``: full or sliding)."""
    scaled_embedding: bool = False
    """Gemma: the embedding is ``<Family>TextScaledWordEmbedding`` (times sqrt(hidden_size));
    the tied head uses the unscaled matrix."""


# model_type -> Family. Each entry is checked by tests/unit/test_families.py: the pipeline's logits
# equal AutoModelForCausalLM's on the same weights.
FAMILIES = {
    "llama": Family(),
    "mistral": Family(masks="sliding"),
    "qwen2": Family(masks="layer_types"),
    "qwen3": Family(masks="layer_types"),
    "gemma": Family(scaled_embedding=True),
    "phi3": Family(masks="sliding"),
    "olmo2": Family(),
    "glm": Family(),
    "arcee": Family(),
    "seed_oss": Family(),
    "ernie4_5": Family(),
    "smollm3": Family(masks="layer_types"),
    "exaone4": Family(masks="layer_types"),
}

# model_type -> why it is refused (one line). Anything else that is not in FAMILIES gets the
# generic reason in check_family.
REFUSED = {
    "gpt2": "GPT-2 runs on the GPT-2 layers (ouroboros_ds/models/gpt2.py)",
    "mixtral": "mixture of experts: the router's auxiliary loss and expert balance are not carried through the ring",
    "qwen2_moe": "mixture of experts (see mixtral)",
    "qwen3_moe": "mixture of experts (see mixtral)",
    "olmoe": "mixture of experts (see mixtral)",
    "deepseek_v3": "mixture of experts and multi-head latent attention",
    "gemma2": "soft-capped final logits and alternating sliding/global layers in the model forward",
    "gemma3": "soft-capped logits, per-layer-type rotary tables and a multimodal wrapper",
    "granite": "embedding, residual and logit multipliers applied outside its layers",
    "cohere": "a scaled head and a parallel attention/MLP block with LayerNorm",
    "phi": "a biased head and LayerNorm with partial rotary outside the Llama layout",
    "olmo3": "a rotary table per layer type (sliding and full layers rotate differently)",
    "mamba": "a state-space model: no attention layers to place",
    "t5": "encoder-decoder: the ring carries one decoder stack",
    "bart": "encoder-decoder: the ring carries one decoder stack",
}

# Named tiny configs for --model. llama-tiny has the GPT-2 "tiny" shape (4 layers, width 64,
# 4 heads) and the same parameters per block: GQA with 2 key/value heads and a gated MLP of 192.
_TINY = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=192, max_position_embeddings=256)
SIZES = {
    "llama-tiny": dict(_TINY, model_type="llama", tie_word_embeddings=True),
    "llama-tiny-untied": dict(_TINY, model_type="llama", tie_word_embeddings=False),
    "llama-small": dict(model_type="llama", num_hidden_layers=8, hidden_size=256, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=768, max_position_embeddings=512,
                        tie_word_embeddings=True),
    "mistral-tiny": dict(_TINY, model_type="mistral", sliding_window=128, tie_word_embeddings=False),
    "qwen2-tiny": dict(_TINY, model_type="qwen2", tie_word_embeddings=True),
    "qwen3-tiny": dict(_TINY, model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "gemma-tiny": dict(_TINY, model_type="gemma", num_key_value_heads=1, head_dim=16),
    "phi3-tiny": dict(_TINY, model_type="phi3", tie_word_embeddings=False),
    "olmo2-tiny": dict(_TINY, model_type="olmo2", tie_word_embeddings=False),
}

# Dropout fields a --dropout value sets, where the family's config has them.
DROPOUT_FIELDS = ("attention_dropout", "resid_pdrop", "embd_pdrop")

# DeepSpeed's 1F1B partition ("type:Block") and activation checkpointing find the blocks by class name.
BLOCK_CLASS = "DecoderBlock"


# ------------------------------------------------------------------ configs
def is_family_config(cfg) -> bool:
    """True for a config of a supported decoder family (not GPT-2's)."""
    return getattr(cfg, "model_type", None) in FAMILIES


def check_family(cfg, where: str = "--model") -> Family:
    """The :class:`Family` of a ``transformers`` config, or ValueError with the reason it is refused."""
    mt = getattr(cfg, "model_type", None)
    supported = ", ".join(FAMILIES)
    if mt in FAMILIES:
        return FAMILIES[mt]
    if getattr(cfg, "is_encoder_decoder", False):
        reason = "encoder-decoder: the ring carries one decoder stack"
    elif any(getattr(cfg, f, None) for f in ("num_experts", "num_local_experts", "n_routed_experts")):
        reason = REFUSED["mixtral"]
    else:
        reason = REFUSED.get(mt, "not among the families whose model forward is embed -> decoder layers -> "
                                 "norm -> head with the masks and rotary this adapter computes")
    raise ValueError(f"{where}: a '{mt}' model is not supported ({reason}); supported: gpt2, {supported}")


def family_config(cfg, dropout: float | None = None):
    """A copy of a family config ready for :func:`layer_specs`: SDPA attention (causal without a
    mask, as ``AutoModelForCausalLM`` picks by default), ``dropout`` in the family's dropout fields,
    and the fields a mistake in a saved ``config.json`` would break deep inside checked here."""
    check_family(cfg)
    cfg = cfg.__class__.from_dict(cfg.to_dict())
    if dropout is not None:
        for f in DROPOUT_FIELDS:
            if hasattr(cfg, f):
                setattr(cfg, f, dropout)
    cfg._attn_implementation = "sdpa"
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % kv:
        raise ValueError(f"--model: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}")
    if not getattr(cfg, "head_dim", None) and cfg.hidden_size % heads:
        raise ValueError(f"--model: hidden_size={cfg.hidden_size} must be divisible by num_attention_heads={heads} "
                         "(or set head_dim)")
    pad = getattr(cfg, "pad_token_id", None)
    if pad is not None and not 0 <= pad < cfg.vocab_size:
        raise ValueError(f"--model: pad_token_id={pad} is outside the vocabulary (vocab_size={cfg.vocab_size}); "
                         "set pad_token_id to null or to a token id below vocab_size")
    if cfg.num_hidden_layers < 1:
        raise ValueError(f"--model: num_hidden_layers={cfg.num_hidden_layers} must be >= 1")
    return cfg


def named_config(model: str | dict, vocab_size: int, dropout: float | None = None):
    """A family config from a named size (:data:`SIZES`), a dict or JSON of fields with a
    ``model_type``; ``vocab_size`` (the tokenizer's) unless the fields set one. Token ids are
    unset, as for the GPT-2 sizes: a family's defaults (Llama's bos 1, eos 2) mean nothing for a
    byte vocabulary."""
    from transformers import AutoConfig

    fields = model_fields(model, SIZES, "family config")
    mt = fields.pop("model_type", None)
    if mt is None:
        raise ValueError("--model: a family config needs a model_type (e.g. \"llama\")")
    fields.setdefault("vocab_size", vocab_size)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields.setdefault(k, None)
    cfg = AutoConfig.for_model(mt, **fields)
    return family_config(cfg, dropout)


def is_named(model) -> bool:
    """True if ``model`` names a family config: a :data:`SIZES` key, or a dict / JSON with a model_type."""
    if isinstance(model, dict):
        return model.get("model_type") not in (None, "gpt2")
    if model in SIZES:
        return True
    try:
        if os.path.isfile(model):
            with open(model) as f:
                fields = json.load(f)
        else:
            fields = json.loads(model)
    except (OSError, ValueError):
        return False
    return isinstance(fields, dict) and fields.get("model_type") not in (None, "gpt2")


def dims(cfg) -> dict:
    """The shape fields the trainer checks and a checkpoint records, under GPT-2's names."""
    return {"vocab_size": cfg.vocab_size, "n_positions": cfg.max_position_embeddings, "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_hidden_layers, "n_head": cfg.num_attention_heads, "n_inner": cfg.intermediate_size,
            "n_kv_head": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}


def layer_costs(cfg, seq_len: int) -> dict:
    """Modelled forward FLOPs per token of the layer kinds, as ``core.partition.layer_costs`` gives them for
    GPT-2 (the balanced partition's cost model): a block 2 x its weights (counted on a meta-device
    copy of the family's layer: GQA, gated MLP, biases as they are) + 4 T (heads x head_dim) for
    attention scores and values; the head 2 d V plus ~5 V for softmax cross entropy."""
    with torch.device("meta"):
        n = sum(p.numel() for p in layer_classes(cfg).decoder_layer(cfg, 0).parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d, V, T = cfg.hidden_size, cfg.vocab_size, seq_len
    return {"block": 2 * n + 4 * T * cfg.num_attention_heads * head_dim, "head": 2 * d * V + 5 * V, "embed": 0}


# ------------------------------------------------------------------ the family's classes
@dataclass(frozen=True)
class LayerClasses:
    decoder_layer: type
    rms_norm: type
    rotary: type
    causal_lm: type
    scaled_embedding: type | None


def layer_classes(cfg) -> LayerClasses:
    """``<Family>DecoderLayer``, ``<Family>RMSNorm``, ``<Family>RotaryEmbedding`` and
    ``<Family>ForCausalLM`` from ``transformers.models.<model_type>.modeling_<model_type>``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    fam = check_family(cfg)
    mt = cfg.model_type
    lm_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[mt]
    prefix = lm_name[: -len("ForCausalLM")]
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    return LayerClasses(getattr(mod, f"{prefix}DecoderLayer"), getattr(mod, f"{prefix}RMSNorm"),
                        getattr(mod, f"{prefix}RotaryEmbedding"), getattr(mod, lm_name),
                        getattr(mod, f"{prefix}TextScaledWordEmbedding") if fam.scaled_embedding else None)


def init_weights(module: nn.Module, cfg) -> None:
    """``transformers``' init for these families: linear and embedding weights N(0,
    ``initializer_range``), zero biases, the padding row zero; norms keep the weights their class
    starts with (ones, or zeros for Gemma's ``1 + weight`` norm)."""
    std = getattr(cfg, "initializer_range", 0.02)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


def _mask_function(cfg, i: int):
    """The mask builder layer i (0-based) gets in the family's model forward."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    fam = check_family(cfg)
    if fam.masks == "layer_types":
        kind = cfg.layer_types[i]
    elif fam.masks == "sliding":
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"
    else:
        kind = "full_attention"
    if kind == "full_attention":
        return create_causal_mask
    if kind == "sliding_attention":
        return create_sliding_window_causal_mask
    raise ValueError(f"--model: layer {i} has layer type {kind!r}; only full_attention and sliding_attention are supported")


# ------------------------------------------------------------------ the layers
class Embedding(nn.Module):
    """The token embedding (``embed_tokens``, the family's padding row). Tied: also the head."""

    def __init__(self, cfg, init_seed: int | None = None):
        super().__init__()
        self.layer_idx = 0
        scaled = layer_classes(cfg).scaled_embedding
        with seeded_init(init_seed):
            if scaled is not None:
                self.embed_tokens = scaled(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id,
                                           embed_scale=cfg.hidden_size ** 0.5)
            else:
                self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
            init_weights(self, cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def lm_head(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """The tied head: logits = h @ embed_tokens^T (the ``forward_fn`` of the head's TiedLayerSpec)."""
    return F_.linear(hidden, embedding.embed_tokens.weight)


class DecoderBlock(nn.Module):
    """One ``<Family>DecoderLayer`` as a pipeline layer; it computes its own rotary table and mask.

    ``layer_idx`` is the 1-based position in the layer list (the dropout key, as GPT-2's
    ``Block``); the ``transformers`` layer gets ``layer_idx - 1``, its index in the family's model."""

    def __init__(self, cfg, layer_idx: int, init_seed: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        classes = layer_classes(cfg)
        with seeded_init(init_seed):
            self.layer = classes.decoder_layer(cfg, layer_idx - 1)
            init_weights(self.layer, cfg)
        self.rotary = classes.rotary(config=cfg)  # buffers only (inv_freq), not saved
        self.make_mask = _mask_function(cfg, layer_idx - 1)
        self.config = cfg

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        rope = self.rotary(h, pos)
        mask = self.make_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                              position_ids=pos)
        with keyed_rng(self, h.device):
            out = self.layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        return out if torch.is_tensor(out) else out[0]


class FinalNorm(nn.Module):
    """The family's final RMSNorm (``model.norm``)."""

    def __init__(self, cfg, init_seed: int | None = None):
        super().__init__()
        self.norm = layer_classes(cfg).rms_norm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class Head(nn.Module):
    """The untied output projection (``lm_head``), a layer of module K."""

    def __init__(self, cfg, init_seed: int | None = None):
        super().__init__()
        with seeded_init(init_seed):
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            init_weights(self, cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)


def is_tied(cfg) -> bool:
    return bool(getattr(cfg, "tie_word_embeddings", False))


def layer_specs(cfg, seed: int = 1234) -> LayerPlan:
    """``[Embedding, DecoderBlock x L, FinalNorm, head]`` as DeepSpeed LayerSpecs, layer i seeded
    ``seed + i``; the head is the embedding (TiedLayerSpec) when the config ties them."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    L = cfg.num_hidden_layers
    tied = is_tied(cfg)
    if tied:
        specs = [TiedLayerSpec("embed", Embedding, cfg, init_seed=seed, tied_weight_attr=["embed_tokens.weight"])]
    else:
        specs = [LayerSpec(Embedding, cfg, init_seed=seed)]
    specs += [LayerSpec(DecoderBlock, cfg, i + 1, init_seed=seed + i + 1) for i in range(L)]
    specs.append(LayerSpec(FinalNorm, cfg, init_seed=seed + L + 1))
    if tied:
        specs.append(TiedLayerSpec("embed", Embedding, cfg, init_seed=seed, forward_fn=lm_head,
                                   tied_weight_attr=["embed_tokens.weight"]))
    else:
        specs.append(LayerSpec(Head, cfg, init_seed=seed + L + 2))
    return LayerPlan(specs, list(range(1, L + 1)), cfg)


# ------------------------------------------------------------------ Hugging Face names
def hf_name(key: str, n_layer: int) -> str | None:
    """``<Family>ForCausalLM`` name of a pipeline parameter name (DeepSpeed's: ``tied_modules.embed.*``
    or ``{layer index}.*``), or None for a parameter of another layout."""
    if key.startswith("tied_modules.embed."):
        rest = key[len("tied_modules.embed."):]
        return "model." + rest if rest.startswith("embed_tokens.") else None
    head, _, rest = key.partition(".")
    if not head.isdigit():
        return None
    idx = int(head)
    if idx == 0 and rest.startswith("embed_tokens."):
        return "model." + rest
    if 1 <= idx <= n_layer and rest.startswith("layer."):
        return f"model.layers.{idx - 1}.{rest[len('layer.'):]}"
    if idx == n_layer + 1 and rest.startswith("norm."):
        return "model." + rest
    if idx == n_layer + 2 and rest.startswith("lm_head."):
        return rest
    return None


def causal_lm(cfg):
    """A float32 ``<Family>ForCausalLM`` of this config (for the export: its weights are loaded next).
    The written config says ``dtype: float32``, what the export holds, whatever the source said."""
    cls = layer_classes(cfg).causal_lm
    out = cfg.__class__.from_dict(cfg.to_dict())
    out.architectures = [cls.__name__]
    out.dtype = torch.float32
    return cls(out).float()
