"""Helpers shared by the tests (no test file imports another).

- Spawned gloo ranks on the CPU, one torch thread each: :func:`run_ranks`; a run several tests
  read, launched once: :func:`run_once`.
- The tiny ring most multi-rank tests train: :func:`model_plan`, :func:`ds_config`,
  :func:`batches`, :func:`ring_engine`, :func:`stage_parameters` (named like the Reference's), and
  the single-process Reference on the same data: :func:`reference_run`.
- Recorders of what a run sends: :class:`ApiRecorder` (torch.distributed collectives),
  :class:`C10dRecorder` (every ``c10d`` op dispatched).
- ``train.py`` as a user launches it: :func:`train_env`, :func:`launch_train`, :func:`run_train`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from ouroboros_ds.ring.utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs only with `pytest --full` (tests/conftest.py): another point of a grid whose quick point
# stays, or a path a quick test also takes (the comment at each use names that test).
FULL = pytest.mark.full


def full(*values, id=None):
    """A parametrize value that runs only with ``--full``."""
    return pytest.param(*values, marks=FULL, id=id)


def quick_points(values, quick, id):
    """Parametrize values of a grid: those in ``quick`` always run, the others with ``--full``.
    ``values``: tuples; ``id(*value)``: each one's test id."""
    return [pytest.param(*v, id=id(*v), marks=() if v in quick else FULL) for v in values]

TRAIN = os.path.join(ROOT, "train.py")
NCCL_SITE = os.path.join(ROOT, "tests", "nccl_site")  # its sitecustomize.py: tests/nccl_emulation.py in train.py

__all__ = ["FULL", "full", "quick_points", "ROOT", "TRAIN", "free_port", "run_ranks", "run_once", "close_pools", "SEED", "INIT_SEED", "VOCAB",
           "SEQ", "MICRO", "CLIP", "steps_for", "ds_config", "batches", "model_plan", "ring_engine", "feed",
           "stage_parameters", "reference_run", "pipeline_logits", "ApiRecorder", "C10dRecorder", "P2P_OPS",
           "train_env", "launch_train", "run_train", "run_train_single"]


# ------------------------------------------------------------------ spawned ranks
# Starting a rank (importing torch, DeepSpeed and transformers, forming the gloo group) costs
# several seconds; most multi-rank tests need only a clean engine, not a clean process. So jobs
# run in a pool of ranks kept per world size for the whole pytest run, each job building its
# own engines in the pool's process group. A test that needs new processes (a resume that must
# find everything in the checkpoint, a rank that kills itself) passes ``fresh=True``; so should a
# job that leaves threads, signal handlers or collectives behind (train.py's Trainer does). A failed or
# timed-out job ends its pool: the next job of that size starts a new one.
def _set_rank_env(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)


def _nccl_rules():
    """NCCL's point-to-point rules on gloo (tests/nccl_emulation.py), unless OUROBOROS_NCCL_EMULATION=0."""
    import nccl_emulation

    if nccl_emulation.enabled():
        nccl_emulation.install()


def _entry(rank, world, port, fn, args, errfile):
    _set_rank_env(rank, world, port)
    _nccl_rules()
    try:
        fn(rank, *args)
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _pool_rank(rank, world, port, jobs, results):
    import datetime

    from ouroboros_ds.pipe.launch import init_distributed

    _set_rank_env(rank, world, port)
    _nccl_rules()
    init_distributed(timeout=datetime.timedelta(seconds=300), backend="gloo")
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        torch.set_num_threads(1)  # whatever the last job set: float sums in the Reference's order
        _nccl_rules()  # whatever the last job did with it
        try:
            fn(rank, *args)
            results.put((rank, None))
        except BaseException:
            results.put((rank, traceback.format_exc()))
    torch.distributed.destroy_process_group()


class _Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world, self.results = world, ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=_pool_rank, args=(r, world, port, self.jobs[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, args, timeout: float) -> list:
        """Run ``fn(rank, *args)`` on every rank; the tracebacks of the ranks that failed."""
        import queue
        import time

        for q in self.jobs:
            q.put((fn, args))
        errors, done, deadline = [], 0, time.monotonic() + timeout
        while done < self.world:
            # once a rank failed, its peers may wait on it forever: give them a moment, not the timeout
            left = deadline - time.monotonic() if not errors else min(5.0, deadline - time.monotonic())
            try:
                rank, err = self.results.get(timeout=max(0.1, left))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                errors.append(f"no answer within {timeout:.0f} s (ranks that died: {dead})")
                break
            done += 1
            if err:
                errors.append(f"--- rank {rank}:\n{err}")
        return errors

    def close(self, kill: bool = False):
        if not kill:
            for q in self.jobs:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
                p.join()


_POOLS: dict = {}


def close_pools() -> None:
    """End every pooled rank (at the end of the pytest run)."""
    while _POOLS:
        _POOLS.popitem()[1].close()


def run_ranks(fn, world: int, *args, tmpdir: str, timeout: float = 600, fresh: bool = False):
    """Run ``fn(rank, *args)`` on ``world`` gloo ranks (one torch thread each); raise with the
    failing ranks' tracebacks. ``fn`` (a module-level function) may call
    ``deepspeed.init_distributed``: the group exists already. ``fresh``: new processes, ended
    after the job, instead of the run's pool."""
    if fresh:
        errfile = os.path.join(tmpdir, "rank_error")
        ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, errfile), nprocs=world,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as e:
            msgs = [f"--- rank {r}:\n" + open(f"{errfile}.{r}").read()
                    for r in range(world) if os.path.exists(f"{errfile}.{r}")]
            raise RuntimeError("\n".join(msgs) or str(e)) from None
        return
    if world not in _POOLS:
        _POOLS[world] = _Pool(world)
    errors = _POOLS[world].run(fn, args, timeout)
    if errors:
        _POOLS.pop(world).close(kill=True)
        raise RuntimeError("\n".join(errors))
    if max(_threads(p.pid) for p in _POOLS[world].procs) > POOL_THREADS:
        _POOLS.pop(world).close()


# Every engine a pooled rank builds leaves its process groups behind, each with gloo's threads
# polling: past this many threads in a rank its pool is replaced (hundreds of idle groups slow
# every later test, on the ranks and off them).
POOL_THREADS = 300


def _threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    except (OSError, StopIteration, ValueError):
        return 0


_RUNS: dict = {}  # name -> (out, per-rank results); None: that run failed


def run_once(tmp_path_factory, name: str, worker, G: int, timeout: float = 300, prepare=None, args: tuple = (),
             fresh: bool = False) -> tuple:
    """``(out, results)``: ``worker(rank, G, *args, out)`` on G ranks, in a new folder ``out``
    (``prepare(out)`` first, in this process, if given; ``fresh``: as for :func:`run_ranks`);
    ``results[rank]`` is what that rank saved to ``out/rank{rank}.pt``.
    The run is launched once per ``name`` for the whole pytest run, since several tests read it and
    a launch costs more than their checks; a failed run fails every later call without running again."""
    if name not in _RUNS:
        out = str(tmp_path_factory.mktemp(name))
        _RUNS[name] = None
        if prepare is not None:
            prepare(out)
        run_ranks(worker, G, G, *args, out, tmpdir=out, timeout=timeout, fresh=fresh)
        _RUNS[name] = (out, [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(G)])
    if _RUNS[name] is None:
        pytest.fail(f"the {name} run failed (see the first test that used it)")
    return _RUNS[name]


# ------------------------------------------------------------------ the tiny ring
SEED, INIT_SEED = 3, 7
VOCAB, SEQ, MICRO = 64, 8, 2
CLIP = {1: 1.6, 4: 0.8}  # by M: the clip acts on some steps, not all (test_equivalence checks)


def steps_for(G: int) -> int:
    """Enough steps for every module to pass its warm-up and update a few times."""
    return 2 * (G + 1) + 2


def ds_config(M: int, steps: int) -> dict:
    """AdamW with weight decay, warm-up + cosine LR, a clip that acts on some steps."""
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": M,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.05, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": steps, "warmup_num_steps": 2, "warmup_min_ratio": 0.1,
                                 "cos_min_ratio": 0.1}},
        "gradient_clipping": CLIP[M],
        "steps_per_print": 4,  # progress reports happen inside the monitored steps
        "wall_clock_breakdown": False,
    }


def batches(steps: int, M: int) -> list:
    """``steps`` lists of M (input_ids, labels) micro-batches, the same on every call."""
    g = torch.Generator().manual_seed(0)
    return [[(torch.randint(0, VOCAB, (MICRO, SEQ), generator=g), torch.randint(0, VOCAB, (MICRO, SEQ), generator=g))
             for _ in range(M)] for _ in range(steps)]


def model_plan(dropout: float = 0.1, **fields):
    """A 4-block GPT-2 of width 16 (dropout on), the layers every engine builds alike."""
    from ouroboros_ds.models.gpt2 import gpt2_config, gpt2_layer_specs

    cfg = gpt2_config({"n_layer": 4, "n_embd": 16, "n_head": 2, "n_positions": SEQ, **fields}, VOCAB,
                      dropout=dropout)
    return gpt2_layer_specs(cfg, seed=INIT_SEED)


def paper(**changes):
    """The paper's update with ``changes`` (a :class:`RingConfig`): the tests' starting point, so
    that each test names every mitigation it runs (the library's default runs them all)."""
    from ouroboros_ds.ring.config import RingConfig

    return RingConfig.paper(**changes)


def ring_engine(G: int, config: dict, plan=None, loss_fn=None, model_parameters=None, seed: int = SEED,
                replay_plan=None, ring=None, **options):
    """``(engine, module)``: this rank's stage of the ring on ``plan`` (default :func:`model_plan`),
    built with ``ouroboros_ds.initialize``. The ring's options: ``ring``, or :func:`paper` with
    ``options`` (replay, weight_prediction, ...), or none where ``config`` has an "ouroboros" object."""
    from ouroboros_ds import OuroborosPipelineModule, initialize, lm_loss

    if ring is None and "ouroboros" not in config:
        ring = paper(**options)
    elif options:
        raise TypeError("ring_engine: give ring= or options, and no options beside a config's ouroboros object")
    plan = plan or model_plan()
    mod = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=loss_fn or lm_loss,
                                  block_indices=plan.block_indices)
    params = model_parameters(mod) if callable(model_parameters) else list(mod.parameters())
    engine, *_ = initialize(model=mod, model_parameters=params, config=config, seed=seed, ring=ring,
                            replay_plan=replay_plan)
    return engine, mod


def initialize_reads(G: int, option: str, value, other, read, read_baseline, bad=None) -> dict:
    """Where ``ouroboros_ds.initialize`` takes the ring option ``option`` from on G ranks:
    ``read(engine)`` of the ring engine when the config's "ouroboros" object sets ``value``
    ("object"), when ``ring=RingConfig(option=other)`` does ("argument"), with ``{"paper": true}``
    ("paper") and without either ("none"); the error of both at once ("both") and of the object
    with ``paper`` and ``value`` ("paper and option"); ``read_baseline(engine)`` of DeepSpeed's stock
    engine given the object ("baseline, object") and its error given ``ring=`` ("baseline,
    argument"); and the error of ``RingConfig(option=bad)`` ("bad")."""
    from deepspeed.pipe import PipelineModule

    from ouroboros_ds import initialize
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.config import RingConfig

    def error(build):
        try:
            build()
        except ValueError as e:
            return str(e)
        return None

    cfg, out = ds_config(1, 4), {}
    out["object"] = read(ring_engine(G, {**cfg, "ouroboros": {option: value}})[0])
    out["argument"] = read(ring_engine(G, cfg, ring=RingConfig(**{option: other}))[0])
    out["paper"] = read(ring_engine(G, {**cfg, "ouroboros": {"paper": True}})[0])
    out["none"] = read(_default_ring_engine(G, cfg))
    out["both"] = error(lambda: ring_engine(G, {**cfg, "ouroboros": {option: value}}, ring=RingConfig()))
    out["paper and option"] = error(lambda: ring_engine(G, {**cfg, "ouroboros": {"paper": True, option: value}}))
    if bad is not None:
        out["bad"] = error(lambda: RingConfig(**{option: bad}))
    plan = model_plan()
    base = PipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, partition_method="type:Block")
    engine, *_ = initialize(model=base, config={**cfg, "ouroboros": {option: value}}, seed=SEED)
    out["baseline, object"] = read_baseline(engine)
    out["baseline, argument"] = error(lambda: initialize(model=base, config=cfg, seed=SEED,
                                                         ring=RingConfig(**{option: value})))
    return out


def _default_ring_engine(G: int, config: dict):
    """The engine ``ouroboros_ds.initialize`` builds with neither ``ring=`` nor an "ouroboros" object."""
    from ouroboros_ds import OuroborosPipelineModule, initialize, lm_loss

    plan = model_plan()
    mod = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, block_indices=plan.block_indices)
    return initialize(model=mod, model_parameters=list(mod.parameters()), config=config, seed=SEED)[0]


def feed(engine, step_batches: list):
    """The data iterator of stage 0 over ``step_batches`` (lists of micro-batches); None elsewhere."""
    if engine.stage_id != 0:
        return None
    return iter([mb for step in step_batches for mb in step])


def stage_parameters(mod) -> dict:
    """Every parameter of this rank's modules, named ``{layer index}.{name}`` like the Reference."""
    state, seen = {}, set()
    for k in mod.local_modules:
        start, stop = mod.module_bounds[k - 1]
        for i, layer in zip(range(start, stop), mod.module_funcs[k]):
            if isinstance(layer, torch.nn.Module):
                for n, p in layer.named_parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        state[f"{i}.{n}"] = p.detach().clone()
    # nothing the engine trains is left out of the comparison
    assert seen == {id(p) for p in mod.parameters()}, "some engine parameter is not named by its layer"
    return state


def reference_run(G: int, M: int, steps: int, plan=None, before_step=None, ring=None, **options) -> tuple:
    """``(parameters by name, losses)`` of the single-process Reference over ``batches(steps, M)``,
    on ``plan`` (default :func:`model_plan`) with ``ds_config(M, steps)``; ``before_step(t, ref)``,
    if given, runs before step t (an evaluation mid-run). The ring's options: ``ring``, or
    :func:`paper` with the ``options`` that are RingConfig fields; the other ``options`` are the
    Reference's own (synchronous, global_clip, blocks_per_module, ...)."""
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.ring.config import FIELDS
    from ouroboros_ds.ring.reference import Reference

    ring_options = {k: options.pop(k) for k in list(options) if k in FIELDS}
    if ring is None:
        ring = paper(**ring_options)
    elif ring_options:
        raise TypeError("reference_run: give ring= or ring options, not both")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: float sums in the same order, for bitwise checks
    try:
        ref = Reference(plan or model_plan(), G, ds_config(M, steps), lm_loss, seed=SEED, ring=ring, **options)
        losses = []
        for t, b in enumerate(batches(steps, M)):
            if before_step is not None:
                before_step(t, ref)
            losses.append(ref.step(b))
    finally:
        torch.set_num_threads(threads)
    return dict(ref.named_parameters()), losses


@torch.no_grad()
def pipeline_logits(module, G: int, ids, hidden: int):
    """Modules 1..K in ring order across the ranks (eval mode, blocking send/recv of the
    ``[batch, seq, hidden]`` activations); stage 0 returns the logits, other ranks None."""
    import torch.distributed as tdist

    from ouroboros_ds.core.schedule import num_modules, stage_of

    module.eval()
    me, K, x = tdist.get_rank(), num_modules(G), None
    for k in range(1, K + 1):
        s, prev = stage_of(k, G), stage_of(k - 1, G) if k > 1 else None
        if s != me:
            continue
        if k == 1:
            x = ids
        elif prev != me:
            x = torch.empty(ids.shape[0], ids.shape[1], hidden)
            tdist.recv(x, src=prev)
        x = module.forward_module(k, x)
        if k < K and stage_of(k + 1, G) != me:
            tdist.send(x, dst=stage_of(k + 1, G))
    module.train()
    return x if me == 0 else None


# ------------------------------------------------------------------ recorders
P2P_OPS = {"c10d.send.default", "c10d.recv_.default"}
_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "broadcast", "barrier", "monitored_barrier", "all_gather",
                "all_gather_into_tensor", "all_gather_object", "all_gather_coalesced", "reduce_scatter",
                "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
                "broadcast_object_list", "gather_object", "scatter_object_list", "new_group")


class C10dRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Every ``c10d`` op dispatched while active (catches any Python or DeepSpeed API path)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("c10d."):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class ApiRecorder:
    """Wraps torch.distributed's collective functions: (name, ranks of the group) of each call."""

    def __init__(self):
        self.calls: list = []
        self._orig: dict = {}

    def __enter__(self):
        import torch.distributed as tdist

        for name in _COLLECTIVES:
            if hasattr(tdist, name):
                self._orig[name] = fn = getattr(tdist, name)
                setattr(tdist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            import torch.distributed as tdist

            group = kwargs.get("group")
            ranks = sorted(tdist.get_process_group_ranks(group)) if group is not None else "WORLD"
            self.calls.append((name, ranks))
            return fn(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        import torch.distributed as tdist

        for name, fn in self._orig.items():
            setattr(tdist, name, fn)


# ------------------------------------------------------------------ train.py
def train_env(**extra) -> dict:
    """The environment of a launch: one thread per rank, offline data sets, no inherited rank, and
    NCCL's point-to-point rules in every rank (tests/nccl_site/sitecustomize.py installs
    tests/nccl_emulation.py; ``OUROBOROS_NCCL_EMULATION="0"`` turns it off)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=os.pathsep.join([ROOT, NCCL_SITE]))
    env.setdefault("OUROBOROS_NCCL_EMULATION", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    return env


def _torchrun(args, nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), TRAIN, *args]


def launch_train(args, nproc: int = 2, env=None, cwd=ROOT, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Start ``torchrun --nproc_per_node nproc train.py args`` in its own process group."""
    return subprocess.Popen(_torchrun(args, nproc), cwd=cwd, env=env or train_env(), stdout=subprocess.PIPE,
                            stderr=stderr, text=True, process_group=0)


def run_train(args, nproc: int = 2, env=None, cwd=ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node nproc train.py args`` to the end."""
    return subprocess.run(_torchrun(args, nproc), cwd=cwd, env=env or train_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_train_single(args, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python train.py args`` (one process, G = 1): no torchrun traceback around a failed child."""
    return subprocess.run([sys.executable, TRAIN, *args], cwd=ROOT, env=env or train_env(), capture_output=True,
                          text=True, timeout=timeout)
