"""Start-up: the process group, DeepSpeed's config, and the engine that fits the module.

:func:`initialize` is the call to use instead of ``deepspeed.initialize``: DeepSpeed picks the
engine class itself from the module type, so a custom engine has to be constructed directly, with
the config parsed the way ``deepspeed.initialize`` parses it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

import torch.distributed as tdist
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
from deepspeed.runtime.pipe.module import PipelineModule

from ..ring.config import RingConfig
from .baseline import KeyedDualPipeVEngine, KeyedPipelineEngine, check_dualpipev
from .engine import OuroborosEngine
from .module import OuroborosPipelineModule


# DeepSpeed's warm-up LR schedules (WarmupLR, WarmupCosineLR, WarmupDecayLR) call their own
# get_lr() from their constructor, at iteration -1, to set the starting learning rate; that call
# always logs this warning, on every rank, before any step. The value it returns is the intended
# start, so the message says nothing about the run and is dropped, exactly this text only, while
# the engine (and with it the scheduler) is built.
_SCHEDULER_START_MESSAGE = "Attempting to get learning rate from scheduler before it has started"


@contextlib.contextmanager
def _without_scheduler_start_warning():
    from deepspeed.utils import logger

    def keep(record: logging.LogRecord) -> bool:
        return record.getMessage() != _SCHEDULER_START_MESSAGE

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _comm_op_lock():
    """The lock file of torch's JIT build of DeepSpeed's shared-memory comm op (None where the
    accelerator has no such op)."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    from torch.utils import cpp_extension

    return os.path.join(cpp_extension._get_build_directory(builder.name, False), "lock")


def clear_stale_build_lock(stale_after: float = 600.0) -> None:
    """Remove the comm op's build lock when it is older than any build (``stale_after`` seconds).

    On the CPU accelerator ``deepspeed.init_distributed`` JIT-builds that op on first use (about
    30 s). A build that is killed part-way (Ctrl-C, a job's time limit, a killed rank) leaves
    torch's lock file behind, and from then on every start waits on it forever, printing nothing.
    A lock this old belongs to no running build."""
    import time

    path = _comm_op_lock()
    if path is None:
        return
    try:
        age = time.time() - os.path.getmtime(path)
    except OSError:
        return
    if age > stale_after:
        print(f"removing {path}: left {age / 60:.0f} min ago by an interrupted build of DeepSpeed's comm op",
              flush=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def build_comm_op() -> None:
    """Build DeepSpeed's comm op for this accelerator now, once, so no training job waits on it
    (the install script calls this)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    clear_stale_build_lock()
    if get_accelerator().create_op_builder("ShareMemCommBuilder") is not None:
        build_shm_op()


def init_distributed(timeout=None, backend: str | None = None) -> None:
    """``deepspeed.init_distributed`` on the accelerator's backend, without its two traps on CPU:
    a stale build lock (waits forever, see :func:`clear_stale_build_lock`) and the shared-memory
    buffers it never unlinks (see :func:`release_shm_buffers`). ``timeout`` (a timedelta) bounds
    every process-group wait."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    clear_stale_build_lock()
    kwargs = {} if timeout is None else {"timeout": timeout}
    deepspeed.init_distributed(dist_backend=backend or get_accelerator().communication_backend_name(), **kwargs)
    release_shm_buffers()


def release_shm_buffers() -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory all-reduce buffer once every rank has mapped it.

    On the CPU accelerator DeepSpeed's shm comm op creates ``/dev/shm/deepspeed_allreduce_buffer_
    {uid}_{addr}_{port}_{rank}`` (about 66 MB) per rank and never unlinks it, so every launch leaves
    that much RAM behind until reboot; a day of test runs filled 21 GB of a 24 GB box (and then
    swapped). The ranks map every peer's buffer during ``init_distributed`` (after the barrier all
    have); unlinking only removes the name, the mappings live until the processes exit."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or not tdist.is_initialized():
        return
    path = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{tdist.get_rank()}")
    tdist.barrier()  # start-up only: every rank has opened every buffer before any name goes
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _ring_section(config):
    """(the config without its ``"ouroboros"`` object, that object): ours, not DeepSpeed's."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            loaded = json.load(f)
        if "ouroboros" not in loaded:
            return config, {}
        config = loaded
    if isinstance(config, dict) and "ouroboros" in config:
        config = dict(config)
        return config, config.pop("ouroboros") or {}
    return config, {}


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, config=None, seed: int = 0, ring: RingConfig | None = None, replay_plan=None):
    """``deepspeed.initialize`` for pipelines: an :class:`OuroborosPipelineModule` gets the
    :class:`OuroborosEngine`, a ``DualPipeVModule`` DeepSpeed's ``DualPipeVEngine`` with keyed
    dropout, any other ``PipelineModule`` DeepSpeed's stock engine.

    The ring's options: ``ring`` (a :class:`~ouroboros_ds.ring.config.RingConfig`), or else the
    config's ``"ouroboros"`` object (``RingConfig.from_section``), or else ``RingConfig()``'s
    defaults, the same as ``train.py``'s. ``replay_plan``: a
    :class:`ouroboros_ds.ring.memory.ReplayPlan` (which stashed forwards keep their graph), needs
    replay "stash". ``seed`` keys the dropout masks.

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` like DeepSpeed.
    """
    import deepspeed

    if not isinstance(model, PipelineModule):
        raise TypeError("ouroboros_ds.initialize needs a deepspeed PipelineModule (e.g. OuroborosPipelineModule)")
    is_ring = isinstance(model, OuroborosPipelineModule)
    if not is_ring and (ring is not None or replay_plan is not None):
        raise ValueError("ring / replay_plan: only an OuroborosPipelineModule runs the ring with its delays; 1f1b "
                         "and dualpipev are synchronous throughout; drop them")
    init_distributed()
    if config is None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
    if config is None:
        raise ValueError("no DeepSpeed config: pass config= or --deepspeed_config")
    config, section = _ring_section(config)
    if is_ring:
        if ring is not None and section:
            raise ValueError("ring= and the config's \"ouroboros\" object both set the ring's options; give one "
                             "(RingConfig.from_section(section, **changes) merges them)")
        ring = ring if ring is not None else RingConfig.from_section(section)
    config_class = DeepSpeedConfig(config, model.mpu())  # a dict or a JSON path, as DeepSpeed takes
    deepspeed.set_optimizer_flags(config_class, model)
    kwargs = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                  training_data=training_data, lr_scheduler=lr_scheduler, mpu=model.mpu(),
                  config=config, config_class=config_class)
    if isinstance(model, DualPipeVModule):
        check_dualpipev(config_class.gradient_accumulation_steps, model.num_stages // 2)
    with _without_scheduler_start_warning():
        if is_ring:
            engine = OuroborosEngine(seed=seed, ring=ring, replay_plan=replay_plan, **kwargs)
        elif isinstance(model, DualPipeVModule):
            engine = KeyedDualPipeVEngine(seed=seed, **kwargs)
        else:
            engine = KeyedPipelineEngine(seed=seed, **kwargs)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
