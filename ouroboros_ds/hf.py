"""Hugging Face models in and out of the pipeline.

* In: ``train.py --model DIR`` where DIR holds a ``config.json`` of the GPT-2 family (and, if
  present, the weights ``save_pretrained`` wrote). :func:`config_from_pretrained` makes the
  ``GPT2Config`` the layer specs are built from; :func:`load_pretrained_weights` copies each
  rank's own layers out of the weight files (``safe_open`` reads only those tensors), before
  ``initialize`` so DeepSpeed's fp16/bf16/ZeRO copies start from them.
* Out: ``train.py --export DIR``. :func:`export_pretrained` is a collective: every rank turns its
  local layers into Hugging Face names, global rank 0 gathers them, checks that every tensor of a
  ``GPT2LMHeadModel`` is there, and writes a directory ``AutoModelForCausalLM.from_pretrained``
  loads. ``lm_head.weight`` is not a separate tensor: it is tied to ``transformer.wte.weight``
  (``tie_word_embeddings``), as the pipeline's head is tied to its embedding.

The name mapping works on any ``PipelineModule`` built from :func:`models.gpt2_layer_specs` (the
ring or DeepSpeed's stock 1F1B partition) because it reads DeepSpeed's own parameter names:
``tied_modules.embed.*`` (embedding), ``{i}.block.*`` (block i, 1-based layer index) and
``{L+1}.ln_f.*`` (final norm).

Llama-style models are not supported: the layer code is GPT-2's (learned absolute positions
added once in the embedding layer, LayerNorm, GELU MLP); a Llama block needs rotary position
ids and a mask at every layer, RMSNorm and a gated MLP, i.e. a second layer family with its own
keyed-dropout and partition tests, and Llama checkpoints usually untie the head, which removes
the reason the ring keeps embedding and head on stage 0. A Llama ``config.json`` is refused with
that reason rather than half-supported.
"""
from __future__ import annotations

import json
import os

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_pretrained_dir(path: str) -> bool:
    """True for a directory with a ``config.json`` (what ``save_pretrained`` writes)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def has_weights(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES)


def config_from_pretrained(path: str, dropout: float | None = None):
    """The ``GPT2Config`` of a local Hugging Face model directory, ready for ``gpt2_layer_specs``."""
    from transformers import AutoConfig, GPT2Config

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    if cfg.model_type != "gpt2":
        raise ValueError(
            f"--model: {path} is a '{cfg.model_type}' model; only the GPT-2 family is supported "
            "(the pipeline's layers are GPT-2 blocks: learned positions, LayerNorm, tied head; "
            "see ouroboros_ds/hf.py for why Llama-style models are not)")
    if not cfg.tie_word_embeddings:
        raise ValueError(f"--model: {path} has tie_word_embeddings=false; the pipeline's head is "
                         "the embedding matrix, so only tied models can be loaded")
    fields = cfg.to_dict()
    if dropout is not None:
        fields.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    out = GPT2Config(**{k: v for k, v in fields.items() if k not in ("architectures", "transformers_version")})
    out._attn_implementation = "sdpa"  # as models.gpt2_config: causal without a mask
    return out


def _hf_name(key: str, n_layer: int) -> str | None:
    """Hugging Face name of a pipeline parameter name, or None for a non-GPT-2 parameter."""
    if key.startswith("tied_modules.embed."):
        return "transformer." + key[len("tied_modules.embed."):]
    head, _, rest = key.partition(".")
    if not head.isdigit():
        return None
    idx = int(head)
    if 1 <= idx <= n_layer and rest.startswith("block."):
        return f"transformer.h.{idx - 1}.{rest[len('block.'):]}"
    if idx == n_layer + 1 and rest.startswith("ln_f."):
        return "transformer." + rest
    return None


def local_named_tensors(module: torch.nn.Module, n_layer: int) -> dict[str, torch.Tensor]:
    """This rank's parameters under their Hugging Face names (the tensors themselves, not copies)."""
    out = {}
    for key, p in module.named_parameters():
        name = _hf_name(key, n_layer)
        if name is None:
            raise ValueError(f"parameter {key!r} has no GPT-2 counterpart; was the module built "
                             "with models.gpt2_layer_specs?")
        out[name] = p
    return out


def _read_tensors(path: str, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` out of a ``save_pretrained`` directory (safetensors, sharded or not,
    or a pickled ``pytorch_model.bin``)."""
    st, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(st) or os.path.isfile(index):
        from safetensors import safe_open

        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            with safe_open(st, "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        out = {}
        for file in sorted(set(weight_map.values())):
            with safe_open(os.path.join(path, file), "pt") as f:
                for k in f.keys():
                    if k in names:
                        out[k] = f.get_tensor(k)
        return out
    bin_ = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(bin_):
        sd = torch.load(bin_, map_location="cpu", weights_only=True)
        return {k: v for k, v in sd.items() if k in names}
    raise FileNotFoundError(f"--model: {path} has a config.json but no weights ({', '.join(WEIGHT_FILES)})")


@torch.no_grad()
def load_pretrained_weights(module: torch.nn.Module, path: str, n_layer: int) -> int:
    """Copy a saved ``GPT2LMHeadModel``'s weights into this rank's layers; returns how many
    tensors were copied. Call before ``initialize``. Every local parameter must be found."""
    local = local_named_tensors(module, n_layer)
    wanted = set(local)
    # Some checkpoints (older GPT-2 saves) store only lm_head.weight for the tied matrix.
    if "transformer.wte.weight" in wanted:
        wanted.add("lm_head.weight")
    found = _read_tensors(path, wanted)
    if "transformer.wte.weight" in local and "transformer.wte.weight" not in found and "lm_head.weight" in found:
        found["transformer.wte.weight"] = found["lm_head.weight"]
    missing = sorted(set(local) - set(found))
    if missing:
        raise ValueError(f"--model: {path} lacks {len(missing)} tensors of this model, e.g. {missing[:3]}; "
                         "was it saved from a GPT2LMHeadModel with this config?")
    for name, p in local.items():
        src = found[name]
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"--model: {name} has shape {tuple(src.shape)} in {path} but the model "
                             f"built from its config.json needs {tuple(p.shape)}")
        p.copy_(src)
    return len(local)


def export_pretrained(module: torch.nn.Module, config, out_dir: str) -> str | None:
    """Collective over the world: write the pipeline as a Hugging Face ``GPT2LMHeadModel``.

    Every rank sends its layers (CPU copies) to global rank 0, which writes ``out_dir`` (config,
    ``model.safetensors``) and returns it; other ranks return None. Data-parallel replicas hold
    the same values, so rank 0 keeps the first copy of each tensor it receives.
    """
    import torch.distributed as tdist
    from transformers import GPT2LMHeadModel

    local = {k: v.detach().float().cpu() for k, v in local_named_tensors(module, config.n_layer).items()}
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        parts = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
        tdist.gather_object(local, parts, dst=0)
        if tdist.get_rank() != 0:
            return None
    else:
        parts = [local]
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            merged.setdefault(k, v)
    cfg = config.__class__(**config.to_dict())
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg.tie_word_embeddings = True
    model = GPT2LMHeadModel(cfg)
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    missing, extra = expected - set(merged), set(merged) - expected
    if missing or extra:
        raise RuntimeError(f"export: tensors missing {sorted(missing)[:5]} / unexpected {sorted(extra)[:5]}")
    model.load_state_dict(merged, strict=False)  # lm_head.weight is wte.weight (tied)
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise RuntimeError("export: lm_head is not tied to transformer.wte")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir
