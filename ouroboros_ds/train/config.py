"""The training job's options: one typed dataclass per concern, each field documented once.

``TrainConfig`` holds the groups; the command line is built from them (``build_parser``: one flag
per field, its help the field's docstring) and turned back into one (``config_from_args``). Each
group's ``__post_init__`` checks its own fields, ``TrainConfig.__post_init__`` the combinations;
every message names the flag and the fix, so a bad launch ends before any rank starts::

    config = parse_config(argv)                  # flags -> TrainConfig (raises ValueError)
    ds = load_deepspeed_config(config)           # the JSON, checked and adjusted to the flags
    mcfg, pretrained = model_config(config, vocab_size)
    check_model(config, mcfg, tok, micro_batch, world)

Only the standard library is imported here; the model checks import their modules when called.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from ..ring.config import FIELDS, RingConfig

# The repository root: the default --deepspeed_config (ds_configs/...) lives there.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class DataConfig:
    name: str = field(default="shakespeare", metadata={"flag": "--data"})
    """'shakespeare' (built in), 'enwik8-sample', a local text file, or a hub data set name"""
    tokenizer: str = "bytes"
    """'bytes' (vocab 256) or a local Hugging Face tokenizer path"""
    max_bytes: int | None = None
    """use only the first N bytes of the corpus"""


@dataclass
class ModelConfig:
    name: str = field(default="tiny", metadata={"flag": "--model"})
    """a named size (GPT-2: tiny, small, gpt2, ...; Llama-style: llama-tiny, qwen2-tiny, mistral-tiny,
    ...), JSON of GPT2Config fields or of a family's config with its model_type, or a local Hugging
    Face model directory of GPT-2 or a supported family (config.json, and its weights if saved:
    they initialize the stages); see docs/families.md"""
    export: str | None = field(default=None, metadata={"metavar": "DIR"})
    """after training, write the model where AutoModelForCausalLM.from_pretrained loads it"""


def auto_or_number(text: str):
    """The argument of --lookahead and --stale-lr-scale: "auto" or a number."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class PipelineConfig:
    schedule: Literal["ouroboros", "1f1b", "dualpipev"] = "ouroboros"
    """'ouroboros' (the delayed-gradient ring), '1f1b' (DeepSpeed's stock synchronous pipeline,
    the baseline) or 'dualpipev' (DeepSpeed's DualPipeV, synchronous; needs M >= 2G)"""
    pipeline_parallel_size: int | None = None
    """G, stages (default: all ranks)"""
    paper: bool = False
    """the paper's exact update (no weight prediction, no look-ahead, no synchronous steps, the
    balanced partition, each stage clipped at gradient_clipping); the ring's defaults otherwise add
    the measured staleness mitigation (docs/parity.md). ds_configs/paper.json sets it too, with the
    paper's optimizer"""
    activation_checkpointing: bool = False
    """1f1b: checkpoint every layer (activation_checkpoint_interval=1), the fair rival of
    --replay recompute"""

    def __post_init__(self):
        if self.schedule != "1f1b" and self.activation_checkpointing:
            raise ValueError("--activation-checkpointing applies to --schedule 1f1b (the Ouroboros replay "
                             "already recomputes; --replay stash keeps the graph instead)")

    def stages(self, world: int) -> int:
        """G: --pipeline-parallel-size, or every rank (0 and unset mean all ranks)."""
        G = self.pipeline_parallel_size or world
        if G < 1 or world % G:
            raise ValueError(f"--pipeline-parallel-size: {G} must divide the world size {world} "
                             f"(world = stages x data-parallel replicas); launch a multiple of {G} ranks or change it")
        return G


def resolve_ring(pipeline: PipelineConfig, given: dict, section: dict | None) -> RingConfig:
    """The run's RingConfig: the DeepSpeed JSON's ``"ouroboros"`` object ``section``, then the
    ring flags ``given`` (not None) on top; ``--paper`` is the object's ``paper``. A baseline
    schedule runs no ring: it takes no ring flag, and its record is the paper's (no mitigation).
    Every message names the flag."""
    given = {k: v for k, v in given.items() if v is not None}
    if pipeline.schedule != "ouroboros":
        if given:
            name = next(iter(given))
            raise ValueError(f"{_flag(name)}: only the ouroboros schedule has a ring with delays to configure "
                             f"({pipeline.schedule} is synchronous throughout); drop it")
        return RingConfig.paper()
    if pipeline.paper:
        clash = [k for k, v in given.items() if k in RingConfig.PAPER and v != RingConfig.PAPER[k]]
        if clash:
            raise ValueError("--paper: the paper's update has no staleness mitigation; drop --weight-prediction, "
                             "--lookahead, --sync-steps, --partition fresh, --stage-clip split and --stale-lr-scale "
                             "(or --paper)")
        section = {"paper": True}
    try:
        return RingConfig.from_section(section, **given)
    except ValueError as e:  # "lookahead: ..." -> "--lookahead: ..."
        name, sep, rest = str(e).partition(": ")
        raise ValueError(f"{_flag(name)}: {rest}" if sep and name in FIELDS else str(e)) from None


@dataclass
class TrainingConfig:
    steps: int = 300
    """optimizer steps (train_batch calls)"""
    seq_len: int = 128
    """tokens per training window"""
    dropout: float = 0.1
    """dropout probability of the model"""
    seed: int = 0
    """the same seed gives both schedules the same initial weights, batches and dropout masks"""
    lr: float | None = None
    """override optimizer.params.lr of the config"""
    eval_every: int = 100
    """evaluate every N steps (0: only at the end)"""
    eval_batches: int = 8
    """validation micro-batches per evaluation"""
    comm_timeout: float = 600.0
    """seconds before a process-group operation (start-up included) or a whole step gives up on a
    dead or hung peer"""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"--steps: must be >= 1 (got {self.steps})")
        if self.seq_len < 1:
            raise ValueError(f"--seq-len: must be >= 1 (got {self.seq_len})")
        if self.comm_timeout <= 0:
            raise ValueError(f"--comm-timeout: must be > 0 seconds (got {self.comm_timeout})")


@dataclass
class CheckpointConfig:
    save: str | None = None
    """checkpoint folder (DeepSpeed layout plus the in-flight ring state); written at the end,
    every --save-every steps, and on SIGTERM/SIGUSR1"""
    save_every: int = 0
    """also save every N steps (0: only at the end)"""
    load: str | None = None
    """resume from this checkpoint folder's latest save (--steps stays the total, so the run ends
    where an uninterrupted one does); with --save the same folder, a first launch without a save
    starts from step 0"""

    def __post_init__(self):
        if self.save_every < 0 or (self.save_every and not self.save):
            raise ValueError("--save-every: needs --save DIR and a value >= 1 (0 saves only at the end)")
        if self.load and not self.has_save() and not _same_dir(self.load, self.save):
            raise FileNotFoundError(f"--load: {self.load!r} has no 'latest' file: not a checkpoint folder, or no "
                                    "save finished there; give the folder passed to --save")

    def has_save(self) -> bool:
        """--load names a folder with a finished save (a requeued job's first launch has none yet)."""
        return bool(self.load) and os.path.isfile(os.path.join(self.load, "latest"))


def _same_dir(a, b) -> bool:
    return bool(a and b) and os.path.abspath(a) == os.path.abspath(b)


@dataclass
class LoggingConfig:
    metrics: str | None = None
    """write JSON-lines metrics here"""
    wandb: str | None = field(default=None, metadata={"metavar": "PROJECT"})
    """log to wandb through DeepSpeed's monitor (offline unless WANDB_API_KEY or a login is set)"""
    stage_stats_every: int = 50
    """every N steps gather per-stage stats (in-flight bytes, step seconds, utilization) to rank 0 (0: off)"""
    no_progress: bool = False
    """no progress bar"""


@dataclass
class TrainConfig:
    deepspeed_config: str = field(default="ds_configs/ouroboros.json", metadata={"flag": "--deepspeed_config"})
    """DeepSpeed JSON config (a relative path not found here is looked up in the repository)"""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    ring_flags: dict = field(default_factory=dict, metadata={"flag": None})
    """the ring options given on the command line: they beat the DeepSpeed JSON's "ouroboros" object"""
    ring: RingConfig = field(init=False, metadata={"flag": None})
    """the ring's options, resolved (:func:`resolve_ring`; again with the JSON's object by
    :func:`load_deepspeed_config`)"""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        self.ring = resolve_ring(self.pipeline, self.ring_flags, None)
        if (self.checkpoint.save or self.checkpoint.load) and self.pipeline.schedule != "ouroboros":
            raise ValueError("--save/--load: supported with --schedule ouroboros only; drop them for the baseline")


# ------------------------------------------------------------------ the command line
def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string right after a field), one paragraph each."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: " ".join(nxt.value.value.split())
            for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}


def _add_fields(parser, cls, prefix: str = "", unset: bool = False, types: dict | None = None) -> None:
    """One flag per field: --field-name (or metadata "flag"; None: no flag); Literal -> choices,
    bool -> a switch, X | None -> X; a field holding a config group is skipped (the group adds its
    own). ``unset``: every default None (the flag was not given); ``types``: argument parsers by name."""
    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind) or f.metadata.get("flag", "") is None:
            continue
        flag = f.metadata.get("flag", _flag(f.name))
        kw = dict(dest=prefix + f.name, default=None if unset else f.default,
                  help=docs.get(f.name, "").replace("%", "%%"))
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kw)
            continue
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and typing.get_origin(args[0]) is Literal:  # Literal[...] | None
            kind, args = args[0], list(typing.get_args(args[0]))
        if typing.get_origin(kind) is Literal:
            kw["choices"] = args
        else:
            kw["type"] = (types or {}).get(f.name, f.metadata.get("type", args[0] if args else kind))
            kw["metavar"] = f.metadata.get("metavar", flag.lstrip("-").replace("-", "_").upper())
        parser.add_argument(flag, **kw)


def _groups() -> list[tuple[str, type]]:
    """(field name, dataclass) of each config group in TrainConfig that the flags build directly."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(TrainConfig)
            if f.init and dataclasses.is_dataclass(hints[f.name])]


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of TrainConfig's fields, one argument group per config group; the ring's group is
    RingConfig's fields (ouroboros_ds/ring/config.py), unset unless given."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_fields(p, TrainConfig)
    for name, cls in _groups():
        _add_fields(p.add_argument_group(name), cls, name + ".")
    _add_fields(p.add_argument_group("ring (default: the DeepSpeed JSON's \"ouroboros\" object, else RingConfig's)"),
                RingConfig, "ring.", unset=True, types={"lookahead": auto_or_number, "stale_lr_scale": auto_or_number})
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Parsed flags -> TrainConfig (each group's checks, then the cross-group ones)."""
    ns = vars(args)
    groups = {name: cls(**{f.name: ns[f"{name}.{f.name}"] for f in dataclasses.fields(cls)})
              for name, cls in _groups()}
    top = {f.name: ns[f.name] for f in dataclasses.fields(TrainConfig)
           if f.init and f.name not in groups and f.name != "ring_flags"}
    flags = {name: ns[f"ring.{name}"] for name in FIELDS if ns[f"ring.{name}"] is not None}
    return TrainConfig(**top, **groups, ring_flags=flags)


def parse_config(argv=None, description: str | None = None) -> TrainConfig:
    return config_from_args(build_parser(description).parse_args(argv))


# ------------------------------------------------------------------ checks that need files or the model
def load_deepspeed_config(config: TrainConfig) -> dict:
    """The DeepSpeed JSON, checked, with the flags that override it applied (--lr, --wandb, the
    scheduler's total_num_steps = --steps)."""
    path = config.deepspeed_config
    in_repo = os.path.join(ROOT, path)
    if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(in_repo):
        path = in_repo  # the default ds_configs/ouroboros.json when run from another directory (Slurm jobs)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--deepspeed_config: {path!r} not found")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed_config: {path} is not valid JSON ({e})") from None
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"--deepspeed_config: {key} must be an integer >= 1 (got {cfg.get(key)!r})")
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage in (2, 3):
        raise ValueError(f"--deepspeed_config: zero_optimization.stage {stage} cannot be combined with pipeline "
                         "parallelism (DeepSpeed asserts it); set zero_optimization.stage to 0 or 1")
    fp16 = cfg.get("fp16") or {}
    if fp16.get("enabled") and 0 < fp16.get("loss_scale", 0) <= 1:
        raise ValueError(f"--deepspeed_config: fp16.loss_scale {fp16['loss_scale']} is no loss scaling, so fp16 "
                         "gradients underflow; set fp16.loss_scale to 0 (dynamic) or a power of two such as 65536, "
                         "or use bf16.enabled instead")
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the replicas
    section = cfg.pop("ouroboros", {})  # ours, not DeepSpeed's: the ring's options of this config
    if not isinstance(section, dict):
        raise ValueError(f"--deepspeed_config: 'ouroboros' must be an object of options (got {section!r})")
    try:
        config.ring = resolve_ring(config.pipeline, config.ring_flags, section)
    except ValueError as e:
        raise ValueError(f"--deepspeed_config {path}: {e}") if str(e).startswith("'ouroboros'") else e from None
    if config.training.lr is not None:
        cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = config.training.lr
    if config.logging.wandb:
        cfg["wandb"] = {**cfg.get("wandb", {}), "enabled": True, "project": config.logging.wandb}
    sched = cfg.get("scheduler", {})
    if sched.get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
        sched.setdefault("params", {})["total_num_steps"] = config.training.steps  # the schedule ends with the run
    return cfg


def model_config(config: TrainConfig, vocab_size: int):
    """(the model's config, whether --model is a Hugging Face directory), checked against the
    tokenizer and --export: a GPT-2 or Transformer-XL ``GPT2Config``, or a Llama-style family's
    config (ouroboros_ds/models/families.py)."""
    from ouroboros_ds.train import hf
    from ouroboros_ds.models import gpt2 as models, families as models_hf

    name = config.model.name
    pretrained = hf.is_pretrained_dir(name)
    if pretrained:
        mcfg = hf.config_from_pretrained(name, dropout=config.training.dropout)
        if vocab_size > mcfg.vocab_size:
            raise ValueError(f"--tokenizer: vocabulary {vocab_size} exceeds the model's vocab_size="
                             f"{mcfg.vocab_size} in {name}/config.json; use the model's tokenizer")
    elif models_hf.is_named(name):
        mcfg = models_hf.named_config(name, vocab_size, dropout=config.training.dropout)
        if vocab_size > mcfg.vocab_size:
            raise ValueError(f"--model: vocab_size={mcfg.vocab_size} is smaller than the tokenizer's vocabulary "
                             f"{vocab_size}; drop vocab_size (it defaults to the tokenizer's) or raise it")
    else:
        try:
            mcfg = models.gpt2_config(name, vocab_size, dropout=config.training.dropout)
        except ValueError as e:
            if "neither a named size" not in str(e):
                raise
            raise ValueError(f"--model: {name!r} is neither a named size ({', '.join([*models.SIZES, *models_hf.SIZES])}), "
                             "JSON of config fields (GPT-2's, or a family's with its model_type), a JSON file, nor "
                             "a Hugging Face model directory") from None
    if config.model.export and getattr(mcfg, "arch", "gpt2") != "gpt2":
        raise ValueError(f"--export: writes a Hugging Face GPT-2 model; the {mcfg.arch} layers have no "
                         "GPT2LMHeadModel counterpart; drop --export or use a GPT-2 --model")
    return mcfg, pretrained


def check_model(config: TrainConfig, mcfg, tok, micro_batch: int, world: int) -> None:
    """Model and data checks that need the loaded corpus and the model config."""
    from ouroboros_ds.train import hf

    G = config.pipeline.stages(world)
    seq_len = config.training.seq_len
    d = hf.dims(mcfg)
    if G > d["n_layer"]:
        raise ValueError(f"--pipeline-parallel-size: {G} exceeds the model's {d['n_layer']} blocks (every stage needs "
                         f"a block); use --pipeline-parallel-size <= {d['n_layer']} or a deeper --model")
    # Rotary families compute any position (as AutoModelForCausalLM does); learned positions end.
    if seq_len > d["n_positions"] and "model_type" not in d:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's n_positions={d['n_positions']}; "
                         "use a shorter --seq-len or set n_positions in --model")
    width = seq_len + 1
    if len(tok.train) < width:
        raise ValueError(f"--data: the training split has {len(tok.train)} tokens, fewer than one window of "
                         f"--seq-len + 1 = {width}; give a longer text file or a shorter --seq-len")
    if len(tok.val) // width < micro_batch:
        raise ValueError(f"--data: the validation split (the corpus's last 5%) has {len(tok.val)} tokens, fewer than "
                         f"one eval batch of {micro_batch} x {width}; give a longer text file or a shorter --seq-len")
