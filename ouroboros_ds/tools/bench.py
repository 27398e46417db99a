"""Side-by-side benchmark: DeepSpeed's stock 1F1B (with and without activation checkpointing) and
DualPipeV, the Ouroboros engine in each replay mode (features replay, stash, and the memory-bounded
plan under ``--activation-budget``), and a single process, on the same model and data, in one run.

    python -m ouroboros_ds.tools.bench                       # G=2, M=4, 8 blocks d_model 256, seq 128, CPU
    python -m ouroboros_ds.tools.bench -G 2 -M 8 --rounds 3 --steps 2 --activation-budget 1f1b 1.3x --out bench.json

How it measures (so that the ratios come from one run):
- G ranks are spawned once (gloo on CPU; NCCL when there is one GPU per rank). Every rank builds all
  engines on the same layer specs (same seed: same initial weights) and the same token batches.
  DualPipeV (DeepSpeed's ``DualPipeVModule`` + ``DualPipeVEngine``, keyed dropout) runs when M >= 2G.
- Rounds interleave the configurations: round r runs ``--steps`` steps of each engine in turn (and the
  single-process baseline on rank 0 while the others wait), so a change of load on a shared machine
  hits all configurations alike. The first ``--warmup`` rounds are discarded; reported numbers are
  medians over the remaining rounds of the mean step time.
- Utilization per stage = busy time of the compute instructions (timers around the forward,
  backward/replay, loss and optimizer handlers, minus the time an Ouroboros handler spends waiting
  for a message) / wall time of the timed steps, summed over the timed rounds. Next to it, the
  simulator's prediction from the *measured* mean cost of each instruction: the ring schedule through
  :mod:`ouroboros_ds.core.simulate`, DeepSpeed's 1F1B and DualPipeV through their own instruction lists
  (:mod:`ouroboros_ds.tools.rivals`).
- Memory per stage, measured: after the timed rounds, G + 2 more steps of each engine with one
  counter (:class:`ouroboros_ds.ring.saved_bytes.SavedBytes`) of the activations autograd saves, the stashed
  inputs and the weight snapshots (each storage once, parameters excluded): its peak is the "peak
  activation memory" column (CUDA: ``torch.cuda.max_memory_allocated``). The process's peak RSS
  during those steps (VmHWM, restarted per engine; it includes every engine's weights).
- eta = (one process, one thread, same work) / (G x step time): 1.0 is the physical limit.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import traceback

from .bench_report import SINGLE, report

CONFIGS = ("1f1b", "1f1b+ckpt", "dualpipev", "ouro-recompute", "ouro-stash", "ouro-bounded", "ouro-recompute-pred",
           "ouro-stash-pred")
# ouro-recompute-pred: the default mitigation (weight prediction through features replay, fresh partition);
# ouro-stash-pred: the same with every graph kept (train.py --replay stash --activation-budget inf)
PRED = ("ouro-recompute-pred", "ouro-stash-pred")
VOCAB = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ouroboros_ds.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", "-G", type=int, default=2)
    p.add_argument("--micro-batches", "-M", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--model", default="small", help="a named size of models.SIZES or JSON of GPT2Config fields")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (after --warmup rounds)")
    p.add_argument("--warmup", type=int, default=1, help="rounds discarded at the start")
    p.add_argument("--steps", type=int, default=3, help="steps of each configuration per round")
    p.add_argument("--partition", choices=["balanced", "authors"], default="balanced")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default cores // G)")
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c not in PRED] + list(SINGLE),
                   choices=list(CONFIGS) + list(SINGLE),
                   help="dualpipev is left out when M < 2G (DeepSpeed's DualPipeV cannot run there)")
    p.add_argument("--activation-budget", nargs="+", default=["1f1b"],
                   help="ouro-bounded: peak activation memory per stage ('1f1b': stock 1F1B's busiest stage; '1.5x', "
                        "'300MB', 'inf'); several values: one ouro-bounded configuration each; see ouroboros_ds.ring.memory")
    p.add_argument("--out", default=None, help="also write the raw results as JSON here")
    return p.parse_args(argv)


# ------------------------------------------------------------------ on each rank
def _ds_config(args) -> dict:
    return {"train_micro_batch_size_per_gpu": args.micro_batch_size,
            "gradient_accumulation_steps": args.micro_batches,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            # no clip: the stock clip is a cross-stage all-reduce inside the optimizer handler, which
            # would count as busy time; both engines do the same optimizer work without it
            "gradient_clipping": 0.0, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def _data(args, n: int) -> list:
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (args.micro_batch_size, args.seq_len)
    return [(torch.randint(0, VOCAB, shape, generator=g), torch.randint(0, VOCAB, shape, generator=g))
            for _ in range(n)]


class _Cycle:
    """An endless iterator over the same micro-batches (every engine sees the same data)."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __iter__(self):
        return self

    def __next__(self):
        x = self.items[self.i % len(self.items)]
        self.i += 1
        return x


class _Timers:
    """Wraps an engine's instruction handlers (a per-instance ``_INSTRUCTION_MAP``): per (kind,
    module) the durations of the compute instructions, minus the time spent waiting on receives."""

    def __init__(self, engine, kinds: dict, sync):
        self.durations: dict = {}
        self.engine = engine
        self.on = False
        self.sync = sync
        table = dict(engine._INSTRUCTION_MAP)
        for cls, name in kinds.items():
            table[cls] = self._wrap(table[cls], name)
        engine._INSTRUCTION_MAP = table
        from ..train.runlog import track_waits
        track_waits(engine)  # engine.wait_seconds: time blocked on receives (stock 1F1B has none)

    @property
    def waited(self) -> float:
        return getattr(self.engine, "wait_seconds", 0.0)

    def _wrap(self, fn, name):
        timers = self

        def handler(engine, **kw):
            if not timers.on:
                return fn(engine, **kw)
            timers.sync()
            w0, t0 = timers.waited, time.perf_counter()
            out = fn(engine, **kw)
            timers.sync()
            dt = time.perf_counter() - t0 - (timers.waited - w0)
            module = kw.get("k", kw.get("phase", 0))  # stock instructions: a buffer id (and DualPipeV's phase)
            timers.durations.setdefault((name, module), []).append(dt)
            return out
        return handler

    def busy(self) -> float:
        return sum(sum(v) for v in self.durations.values())

    def reset(self):
        self.durations = {}


def _build(args, name, plan, cfg, G, data):
    from deepspeed.pipe import PipelineModule
    from ..pipe.baseline import BaselineDualPipeVModule
    from ..pipe.launch import initialize
    from ..models.gpt2 import lm_loss
    from ..core.partition import balanced_blocks_per_module, layer_costs
    from ..pipe.module import OuroborosPipelineModule
    from ..ring.config import RingConfig

    # the ring rows run the paper's update (with weight prediction for "-pred"): the steady state's
    # cost without the synchronous warm-up steps
    replay_plan, ring, pred = None, name.startswith("ouro"), False
    if name == "dualpipev":
        model = BaselineDualPipeVModule(plan.specs, num_stages=G, loss_fn=lm_loss, partition_method="type:Block")
        replay = "recompute"
    elif name.startswith("1f1b"):
        model = PipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, partition_method="type:Block",
                               activation_checkpoint_interval=1 if name == "1f1b+ckpt" else 0,
                               checkpointable_layers=["Block"])  # the embedding's int input cannot be checkpointed
        replay = "recompute"
    elif name.startswith("ouro-bounded"):
        from ..ring.memory import plan_partition
        from ..ring.reference import build_layers

        replay = "stash"
        bpm, chosen = plan_partition(build_layers(plan), plan.block_indices, data[0][0], G, args.micro_batches,
                                     layer_costs(cfg.n_embd, VOCAB, args.seq_len), _budget_of(name))
        replay_plan = chosen.plan
        model = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss,
                                        block_indices=plan.block_indices, blocks_per_module=bpm)
    else:
        replay = name.split("-")[1]
        pred = name.endswith("-pred")
        bpm = None
        if args.partition == "balanced":
            bpm = balanced_blocks_per_module(cfg.n_layer, G, layer_costs(cfg.n_embd, VOCAB, args.seq_len), replay,
                                             fresh=pred)
        model = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss,
                                        block_indices=plan.block_indices, blocks_per_module=bpm)
    engine, *_ = initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                            config=_ds_config(args), seed=0, replay_plan=replay_plan,
                            ring=RingConfig.paper(replay=replay, weight_prediction=float(pred)) if ring else None)
    if replay_plan is not None:
        engine.plan_note = chosen.describe()
    return engine


def engine_names(args) -> list[str]:
    """The engine configurations of a run: ``ouro-bounded`` once per ``--activation-budget``."""
    out = []
    for c in args.configs:
        if c == "ouro-bounded":
            out += [c if b == "1f1b" else f"{c}({b})" for b in args.activation_budget]
        elif c in CONFIGS:
            out.append(c)
    return out


def _budget_of(name: str) -> str:
    return name[name.index("(") + 1:-1] if "(" in name else "1f1b"


def _reset_peak_rss() -> None:
    """Linux: restart the process's peak RSS (VmHWM) count, so each engine's memory steps get
    their own peak (it still includes everything the process holds: all engines' weights)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """Bytes: VmHWM since the last :func:`_reset_peak_rss` (ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _single_process_step(layers, opt, batches, M):
    """The same work on one process: M micro-batches forward + backward through the whole model,
    one optimizer step (ordinary training, no pipeline)."""
    from ..models.gpt2 import lm_loss

    for inp, lab in batches[:M]:
        h = inp
        for layer in layers:
            h = layer(h)
        (lm_loss(h, lab) / M).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _rank_main(rank, args, outdir):
    import datetime

    import torch
    import torch.distributed as tdist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.pipe import schedule as ds_schedule

    from ..pipe import instructions as E
    from ..pipe.launch import init_distributed
    from ..models.gpt2 import gpt2_config, gpt2_layer_specs
    from ..ring.reference import build_layers
    from ..ring.saved_bytes import SavedBytes

    G = args.stages
    cuda = get_accelerator().device_name() == "cuda"
    threads = args.threads or max(1, (os.cpu_count() or 1) // G)
    torch.set_num_threads(threads)
    # long timeout: the other ranks wait at a barrier while rank 0 runs the single-process baseline
    init_distributed(timeout=datetime.timedelta(seconds=3600))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = gpt2_config(args.model, VOCAB, dropout=0.1)
    plan = gpt2_layer_specs(cfg, seed=0)
    data = _data(args, 4 * args.micro_batches)
    M = args.micro_batches
    engines, timers, iters = {}, {}, {}
    for name in (c for c in engine_names(args)):
        eng = engines[name] = _build(args, name, plan, cfg, G, data)
        if name.startswith("1f1b") or name == "dualpipev":
            kinds = {ds_schedule.ForwardPass: "F", ds_schedule.BackwardPass: "B", ds_schedule.OptimizerStep: "STEP"}
        else:
            kinds = {E.RingForward: "F", E.RingReplay: "B", E.RingLoss: "L", ds_schedule.OptimizerStep: "STEP"}
        timers[name] = _Timers(eng, kinds, sync)
        iters[name] = _Cycle(data)
    single = [c for c in args.configs if c in SINGLE]
    if rank == 0 and single:
        layers = build_layers(plan)
        from ..ring.utils import unique_parameters
        params = unique_parameters(layers)
        sp_opt = torch.optim.AdamW(params, lr=1e-4)
        sp_layers = layers
    res = {name: {"step_times": [], "busy": [], "wall": [], "page_faults": [], "durations": {}}
           for name in list(engines) + single}

    def run_single(name, steps):
        t = 1 if name == "1proc-1thread" else (os.cpu_count() or 1)
        torch.set_num_threads(t)
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                _single_process_step(sp_layers, sp_opt, data, M)
            return (time.perf_counter() - t0) / steps
        finally:
            torch.set_num_threads(threads)

    for r in range(args.warmup + args.rounds):
        timed = r >= args.warmup
        for name in list(engines) + single:
            tdist.barrier()
            if name in SINGLE:
                if rank == 0:
                    dt = run_single(name, args.steps)
                    if timed:
                        res[name]["step_times"].append(dt)
                continue
            eng, tm = engines[name], timers[name]
            tm.reset()
            tm.on = timed
            sync()
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(args.steps):
                eng.train_batch(iters[name])
            sync()
            wall = time.perf_counter() - t0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
            tm.on = False
            if timed:
                res[name]["step_times"].append(wall / args.steps)
                res[name]["busy"].append(tm.busy())
                res[name]["wall"].append(wall)
                res[name]["page_faults"].append(faults / args.steps)
                for key, v in tm.durations.items():
                    res[name]["durations"].setdefault(f"{key[0]}:{key[1]}", []).extend(v)
        if rank == 0:
            print(f"bench: round {r + 1}/{args.warmup + args.rounds} done{' (warm-up)' if not timed else ''}",
                  flush=True)

    # memory: K + 1 more steps per engine with the saved-tensor counter on
    for name, eng in engines.items():
        tdist.barrier()
        sb = SavedBytes()
        sb.exclude = {p.untyped_storage().data_ptr() for p in eng.module.parameters()}
        if hasattr(eng, "saved_bytes"):
            eng.saved_bytes = sb
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        held = {}
        _reset_peak_rss()
        for _ in range(G + 2):
            with sb.hooks():
                eng.train_batch(iters[name])
            if hasattr(eng, "stash_memory"):
                held = eng.stash_memory()
        res[name]["memory"] = {"saved_activations_peak": sb.peak, "stashed_inputs": held.get("inputs", 0),
                               "weight_snapshots": held.get("snapshots", 0),
                               "kept_graph_activations": held.get("saved_activations", 0),
                               "params": sum(p.numel() * p.element_size() for p in eng.module.parameters())}
        res[name]["memory"]["peak_rss"] = _peak_rss()
        if cuda:
            res[name]["memory"]["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        if hasattr(eng, "saved_bytes"):
            eng.saved_bytes = None
    for name, eng in engines.items():
        if getattr(eng, "plan_note", None):
            res[name]["plan"] = eng.plan_note
        if hasattr(eng.module, "module_bounds"):
            res[name]["blocks_per_module"] = eng.module.blocks_per_module()
    res["_rank"] = {"rank": rank, "threads": threads, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    "device": "cuda" if cuda else "cpu"}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    tdist.barrier()


def _entry(rank, world, port, args, outdir):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    try:
        _rank_main(rank, args, outdir)
    except BaseException:
        with open(os.path.join(outdir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    from ..ring.utils import free_port

    args = parse_args(argv)
    if args.stages < 1 or args.micro_batches < 1 or args.rounds < 1:
        print("error: --stages, --micro-batches and --rounds must be >= 1", file=sys.stderr)
        return 2
    if "dualpipev" in args.configs and args.micro_batches < 2 * args.stages:
        print(f"bench: dualpipev left out (DualPipeV needs M >= 2G = {2 * args.stages})", flush=True)
        args.configs = [c for c in args.configs if c != "dualpipev"]
    if args.stages < 2:
        args.configs = [c for c in args.configs if c != "ouro-bounded"]  # the plan needs a ring of G >= 2
    port = free_port()
    outdir = tempfile.mkdtemp(prefix="ouroboros_bench_")
    print(f"bench: G={args.stages} M={args.micro_batches} micro-batch {args.micro_batch_size} seq {args.seq_len} "
          f"model {args.model}; configs {' '.join(args.configs)}; {args.warmup} warm-up + {args.rounds} rounds of "
          f"{args.steps} steps each", flush=True)
    try:
        mp.start_processes(_entry, args=(args.stages, port, args, outdir), nprocs=args.stages, join=True,
                           start_method="spawn")
    except Exception:
        for r in range(args.stages):
            p = os.path.join(outdir, f"error{r}.txt")
            if os.path.exists(p):
                print(f"--- rank {r}:\n" + open(p).read(), file=sys.stderr)
        return 1
    ranks = [json.load(open(os.path.join(outdir, f"rank{r}.json"))) for r in range(args.stages)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "ranks": ranks}, f)
    print(report(args, ranks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
