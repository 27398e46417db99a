"""Hugging Face models in and out of the pipeline.

* In: ``train.py --model DIR`` where DIR holds a ``config.json`` of the GPT-2 family or of a
  supported Llama-style family (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3, OLMo-2, ...: see
  :mod:`ouroboros_ds.models.families`), and, if present, the weights ``save_pretrained`` wrote.
  :func:`config_from_pretrained` makes the config the layer specs are built from (GPT-2's for
  ``models.gpt2_layer_specs``, the family's for ``models_hf.layer_specs``);
  :func:`load_pretrained_weights` copies each rank's own layers out of the weight files
  (``safe_open`` reads only those tensors), before ``initialize`` so DeepSpeed's fp16/bf16/ZeRO
  copies start from them. Without weights the layers keep their seeded random init.
* Out: ``train.py --export DIR``. :func:`export_pretrained` is a collective: every rank turns its
  local layers into Hugging Face names, global rank 0 gathers them, checks that every tensor of
  the family's ``*ForCausalLM`` is there, and writes a directory
  ``AutoModelForCausalLM.from_pretrained`` loads as the same class (float32 weights). A tied
  model is written tied (no separate ``lm_head.weight``), an untied one with its own head.

The name mapping works on any ``PipelineModule`` built from those layer specs (the ring or
DeepSpeed's stock 1F1B partition) because it reads DeepSpeed's own parameter names: GPT-2
``tied_modules.embed.*`` (embedding), ``{i}.block.*`` (block i, 1-based layer index) and
``{L+1}.ln_f.*`` (final norm); the families ``tied_modules.embed.embed_tokens.*`` or
``0.embed_tokens.*``, ``{i}.layer.*``, ``{L+1}.norm.*`` and, untied, ``{L+2}.lm_head.*``.
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
    """The config of a local Hugging Face model directory, ready for its layer specs: a
    ``GPT2Config`` for ``models.gpt2_layer_specs``, or a family config for
    ``models_hf.layer_specs`` (:func:`layer_specs_of` picks). Other model types are refused
    with the reason."""
    from transformers import AutoConfig, GPT2Config

    from ..models import families as models_hf

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    if cfg.model_type != "gpt2":
        return models_hf.family_config(cfg, dropout)
    if not cfg.tie_word_embeddings:
        raise ValueError(f"--model: {path} is a GPT-2 model with tie_word_embeddings=false; the GPT-2 layers' "
                         "head is the embedding matrix, so only tied GPT-2 models can be loaded")
    fields = cfg.to_dict()
    if dropout is not None:
        fields.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    out = GPT2Config(**{k: v for k, v in fields.items() if k not in ("architectures", "transformers_version")})
    out._attn_implementation = "sdpa"  # as models.gpt2_config: causal without a mask
    return out


class _GPT2:
    """GPT-2 (and Transformer-XL, which shares its config class): ``models.gpt2``'s layers."""
    name, embed = "GPT-2", "transformer.wte.weight"

    @staticmethod
    def accepts(config) -> bool:
        return True  # the last entry of ARCHITECTURES: whatever no family claims

    @staticmethod
    def layer_specs(config, seed: int):
        from ..models.gpt2 import gpt2_layer_specs
        return gpt2_layer_specs(config, seed=seed)

    @staticmethod
    def dims(config) -> dict:
        return {k: getattr(config, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")}

    @staticmethod
    def layer_costs(config, vocab_size: int, seq_len: int) -> dict:
        from ..core.partition import layer_costs
        return layer_costs(config.n_embd, vocab_size, seq_len)

    @staticmethod
    def naming(config):
        """(name function, layer count) of the Hugging Face names."""
        return _gpt2_name, config.n_layer

    @staticmethod
    def causal_lm(config):
        """(an empty ``*ForCausalLM`` of this config, whether its head is tied)."""
        from transformers import GPT2LMHeadModel

        cfg = config.__class__(**config.to_dict())
        cfg.architectures = ["GPT2LMHeadModel"]
        cfg.tie_word_embeddings = True
        return GPT2LMHeadModel(cfg), True


class _Family:
    """A Llama-style family (:mod:`ouroboros_ds.models.families`)."""
    name, embed = None, "model.embed_tokens.weight"  # name: the config's model_type

    @staticmethod
    def accepts(config) -> bool:
        from ..models.families import is_family_config
        return is_family_config(config)

    @staticmethod
    def layer_specs(config, seed: int):
        from ..models.families import layer_specs
        return layer_specs(config, seed=seed)

    @staticmethod
    def dims(config) -> dict:
        from ..models import families
        return {**families.dims(config), "model_type": config.model_type, "tied": families.is_tied(config)}

    @staticmethod
    def layer_costs(config, vocab_size: int, seq_len: int) -> dict:
        from ..models.families import layer_costs
        return layer_costs(config, seq_len)

    @staticmethod
    def naming(config):
        from ..models.families import hf_name
        return hf_name, config.num_hidden_layers

    @staticmethod
    def causal_lm(config):
        from ..models import families
        return families.causal_lm(config), families.is_tied(config)


# Every model kind train.py takes, asked in order: the first whose accepts(config) holds builds it.
ARCHITECTURES = (_Family, _GPT2)


def architecture(config):
    """The entry of :data:`ARCHITECTURES` that builds, measures, names and exports ``config``."""
    return next(a for a in ARCHITECTURES if a.accepts(config))


def layer_specs_of(config, seed: int = 1234):
    """The :class:`~ouroboros_ds.models.gpt2.LayerPlan` of a config: GPT-2's layers or a family's."""
    return architecture(config).layer_specs(config, seed)


def dims(config) -> dict:
    """The shape fields the trainer checks and a checkpoint records, under GPT-2's names, for a
    GPT-2 or a family config (a family adds its ``model_type`` and whether the head is tied)."""
    return architecture(config).dims(config)


def layer_costs_of(config, vocab_size: int, seq_len: int) -> dict:
    """The balanced partition's per-layer cost model for this config (``core.partition.layer_costs`` for
    GPT-2 with the tokenizer's vocabulary, ``models_hf.layer_costs`` for a family)."""
    return architecture(config).layer_costs(config, vocab_size, seq_len)


def _gpt2_name(key: str, n_layer: int) -> str | None:
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


def _naming(config):
    """(name function, layer count, embedding name, family) of a config; an int is a GPT-2 layer count."""
    if isinstance(config, int):
        return _gpt2_name, config, _GPT2.embed, _GPT2.name
    arch = architecture(config)
    name_of, n_layer = arch.naming(config)
    return name_of, n_layer, arch.embed, arch.name or config.model_type


def local_named_tensors(module: torch.nn.Module, config) -> dict[str, torch.Tensor]:
    """This rank's parameters under their Hugging Face names (the tensors themselves, not copies).
    ``config``: the model's config (or, for GPT-2, its layer count)."""
    name_of, n_layer, _, family = _naming(config)
    out = {}
    for key, p in module.named_parameters():
        name = name_of(key, n_layer)
        if name is None:
            raise ValueError(f"parameter {key!r} has no {family} counterpart; was the module built "
                             "with the layer specs of this config (hf.layer_specs_of)?")
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
def load_pretrained_weights(module: torch.nn.Module, path: str, config) -> int:
    """Copy a saved model's weights into this rank's layers; returns how many tensors were
    copied. Call before ``initialize``. Every local parameter must be found. ``config``: the
    config the layers were built from (or, for GPT-2, its layer count)."""
    _, _, embed, family = _naming(config)
    local = local_named_tensors(module, config)
    wanted = set(local)
    # A tied matrix may be stored under either name (older GPT-2 saves keep only lm_head.weight).
    if embed in wanted:
        wanted.add("lm_head.weight")
    found = _read_tensors(path, wanted)
    if embed in local and embed not in found and "lm_head.weight" in found and "lm_head.weight" not in local:
        found[embed] = found["lm_head.weight"]
    missing = sorted(set(local) - set(found))
    if missing:
        hint = (" (the config unties the head but the weights have no lm_head.weight: set tie_word_embeddings "
                "to true)" if missing == ["lm_head.weight"] else "")
        raise ValueError(f"--model: {path} lacks {len(missing)} tensors of this model, e.g. {missing[:3]}{hint}; "
                         f"was it saved from a {family} model with this config?")
    for name, p in local.items():
        src = found[name]
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"--model: {name} has shape {tuple(src.shape)} in {path} but the model "
                             f"built from its config.json needs {tuple(p.shape)}")
        p.copy_(src)
    return len(local)


def _gather(module: torch.nn.Module, config) -> dict | None:
    """All ranks' tensors under Hugging Face names (float32 CPU copies) on global rank 0, else None.
    Data-parallel replicas hold the same values, so rank 0 keeps the first copy of each tensor."""
    import torch.distributed as tdist

    local = {k: v.detach().float().cpu() for k, v in local_named_tensors(module, config).items()}
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
    return merged


def export_pretrained(module: torch.nn.Module, config, out_dir: str) -> str | None:
    """Collective over the world: write the pipeline as a Hugging Face ``*ForCausalLM`` of its family.

    Every rank sends its layers (CPU copies) to global rank 0, which writes ``out_dir`` (config,
    ``model.safetensors``) and returns it; other ranks return None.
    """
    merged = _gather(module, config)
    if merged is None:
        return None
    arch = architecture(config)
    model, tied = arch.causal_lm(config)
    embed = arch.embed
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    missing, extra = expected - set(merged), set(merged) - expected
    if missing or extra:
        raise RuntimeError(f"export: tensors missing {sorted(missing)[:5]} / unexpected {sorted(extra)[:5]}")
    model.load_state_dict(merged, strict=False)  # tied: lm_head.weight is the embedding
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if tied and head.data_ptr() != emb.data_ptr():
        raise RuntimeError(f"export: lm_head is not tied to {embed}")
    if not tied and head.data_ptr() == emb.data_ptr():
        raise RuntimeError("export: an untied model's lm_head shares the embedding's storage")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir
