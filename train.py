"""Train a GPT-2-style language model with the Ouroboros pipeline on DeepSpeed (or, for the
baseline, with DeepSpeed's stock synchronous 1F1B pipeline on the same model and data).

Launch:
  CPU-only box (2 ranks on gloo; each rank gets cores / ranks torch threads):
    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/ouroboros.json
    torchrun --nproc_per_node 2 train.py --deepspeed_config ds_configs/ouroboros.json
  One process (G = 1: modules 1 and 2 share stage 0; still the delayed update):
    python train.py --deepspeed_config ds_configs/ouroboros.json
  G = 2 stages x D = 2 data-parallel replicas (world = G x D; bf16 + ZeRO-1 config):
    deepspeed --num_gpus 4 train.py --deepspeed_config ds_configs/ouroboros_bf16_zero1.json --pipeline-parallel-size 2
  GPUs (one rank per GPU, NCCL):
    deepspeed --num_gpus 4 train.py --deepspeed_config ds_configs/ouroboros.json --pipeline-parallel-size 4
  Baseline on the same model, data and seed:
    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/ouroboros.json --schedule 1f1b

The same --seed gives both schedules the same initial weights, the same batches and the same
dropout masks, so their first losses are equal and later differences are the algorithm's.
Checkpoints: --save DIR [--save-every N] saves at the end, every N steps and on SIGTERM/SIGUSR1
(all ranks stop after the same step); --load DIR resumes exactly (--steps is the total).
Metrics (--metrics PATH, JSON lines, written by global rank 0): one line per step
{"step", "loss", "tokens", "seconds", "train_seconds", "lr"} (seconds: wall-clock since the first step;
train_seconds: time inside train_batch only, without evaluations and saves) and one per evaluation {"step", "val_loss", "val_bpb"};
at start {"step": 0, "delays": {module: delay}}, and every --stage-stats-every steps one line per
stage {"step", "stage", "dp_rank", "in_flight_bytes", "step_seconds", "utilization"}.
Plot runs with: python -m ouroboros_ds.plot A.jsonl B.jsonl --out loss.png

Hugging Face: --model DIR (a save_pretrained GPT-2 directory: config and weights), --export DIR.
wandb: --wandb PROJECT (DeepSpeed's monitor; offline without an API key). Slurm:
launch_scripts/ouroboros.sbatch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", default="ds_configs/ouroboros.json", help="DeepSpeed JSON config")
    p.add_argument("--data", default="shakespeare",
                   help="'shakespeare' (built in), 'enwik8-sample', a local text file, or a hub data set name")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (vocab 256) or a local Hugging Face tokenizer path")
    p.add_argument("--model", default="tiny",
                   help="a named size (tiny, small, gpt2, ...), JSON of GPT2Config fields, or a local Hugging Face "
                        "model directory (config.json, and its weights if saved: they initialize the stages)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="after training, write the model where AutoModelForCausalLM.from_pretrained loads it")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="log to wandb through DeepSpeed's monitor (offline unless WANDB_API_KEY or a login is set)")
    p.add_argument("--stage-stats-every", type=int, default=50,
                   help="every N steps gather per-stage stats (in-flight bytes, step seconds, utilization) to rank 0 (0: off)")
    p.add_argument("--pipeline-parallel-size", type=int, default=None, help="G, stages (default: all ranks)")
    p.add_argument("--schedule", choices=["ouroboros", "1f1b"], default="ouroboros")
    p.add_argument("--replay", choices=["recompute", "stash"], default="recompute",
                   help="ouroboros: 'recompute' (features replay, recompute the forward at the current weights) "
                        "or 'stash' (keep the forward's graph and weights: no recompute, more memory)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="1f1b: checkpoint every layer (activation_checkpoint_interval=1), the fair rival of "
                        "--replay recompute")
    p.add_argument("--partition", choices=["balanced", "fresh", "authors"], default="balanced",
                   help="ouroboros: 'balanced' (blocks by modelled per-stage cost, stage 0 also carries the "
                        "head and loss; stage 0's blocks split half/half between modules 1 and K), 'fresh' "
                        "(the same stage loads, stage 0's blocks in module K: fewer stale weights) or "
                        "'authors' (L // G blocks per stage, stage 0's split half/half)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (train_batch calls)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="override optimizer.params.lr of the config")
    p.add_argument("--stale-lr-scale", type=float, default=0.0,
                   help="staleness mitigation (off: 0): module k's lr / (1 + c * delay(k)); see ouroboros_ds/staleness.py")
    p.add_argument("--weight-prediction", type=float, default=0.0,
                   help="staleness mitigation (off: 0; needs --replay stash): module k's forward and delayed backward "
                        "run at its weights predicted H x delay(k) last updates ahead; see ouroboros_ds/stash.py LastUpdate")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation micro-batches per evaluation")
    p.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes of the corpus")
    p.add_argument("--metrics", default=None, help="write JSON-lines metrics here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--save", default=None, help="checkpoint folder (DeepSpeed layout plus the in-flight ring state); "
                   "written at the end, every --save-every steps, and on SIGTERM/SIGUSR1")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--load", default=None, help="resume from this checkpoint folder's latest save "
                   "(--steps stays the total, so the run ends where an uninterrupted one does); with "
                   "--save the same folder, a first launch without a save starts from step 0")
    p.add_argument("--comm-timeout", type=float, default=600.0,
                   help="seconds before a process-group operation (start-up included) or a whole step gives up on a dead or hung peer")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def load_config(args) -> dict:
    path = args.deepspeed_config
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(beside):
        path = beside  # the default ds_configs/ouroboros.json when run from another directory (Slurm jobs)
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
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the replicas
    if args.lr is not None:
        cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
    if args.wandb:
        cfg["wandb"] = {**cfg.get("wandb", {}), "enabled": True, "project": args.wandb}
    sched = cfg.get("scheduler", {})
    if sched.get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
        sched.setdefault("params", {})["total_num_steps"] = args.steps  # the schedule ends with the run
    return cfg


def _same_dir(a, b) -> bool:
    return bool(a and b) and os.path.abspath(a) == os.path.abspath(b)


def check_args(args, cfg: dict) -> None:
    """Options and DeepSpeed config fields that would otherwise fail deep inside DeepSpeed."""
    if args.steps < 1:
        raise ValueError(f"--steps: must be >= 1 (got {args.steps})")
    if args.weight_prediction < 0:
        raise ValueError(f"--weight-prediction: must be >= 0 (0: off), got {args.weight_prediction}")
    if args.weight_prediction and (args.schedule != "ouroboros" or args.replay != "stash"):
        raise ValueError("--weight-prediction: needs --schedule ouroboros --replay stash (it moves the weight "
                         "snapshot the stale modules' forward and delayed backward run through)")
    if args.save_every < 0 or (args.save_every and not args.save):
        raise ValueError("--save-every: needs --save DIR and a value >= 1 (0 saves only at the end)")
    if (args.save or args.load) and args.schedule != "ouroboros":
        raise ValueError("--save/--load: supported with --schedule ouroboros only; drop them for the baseline")
    if args.comm_timeout <= 0:
        raise ValueError(f"--comm-timeout: must be > 0 seconds (got {args.comm_timeout})")
    if args.load and not os.path.isfile(os.path.join(args.load, "latest")) and not _same_dir(args.load, args.save):
        raise FileNotFoundError(f"--load: {args.load!r} has no 'latest' file: not a checkpoint folder, or no save "
                                "finished there; give the folder passed to --save")
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage in (2, 3):
        raise ValueError(f"--deepspeed_config: zero_optimization.stage {stage} cannot be combined with pipeline "
                         "parallelism (DeepSpeed asserts it); set zero_optimization.stage to 0 or 1")
    fp16 = cfg.get("fp16") or {}
    if fp16.get("enabled") and 0 < fp16.get("loss_scale", 0) <= 1:
        raise ValueError(f"--deepspeed_config: fp16.loss_scale {fp16['loss_scale']} is no loss scaling, so fp16 "
                         "gradients underflow; set fp16.loss_scale to 0 (dynamic) or a power of two such as 65536, "
                         "or use bf16.enabled instead")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    G = args.pipeline_parallel_size or world
    if G < 1 or world % G:
        raise ValueError(f"--pipeline-parallel-size: {G} must divide the world size {world} "
                         f"(world = stages x data-parallel replicas); launch a multiple of {G} ranks or change it")


def check_model(args, mcfg, tok, micro_batch: int) -> None:
    """Model and data checks that need the loaded corpus and the model config."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    G = args.pipeline_parallel_size or world
    if G > mcfg.n_layer:
        raise ValueError(f"--pipeline-parallel-size: {G} exceeds the model's {mcfg.n_layer} blocks (every stage needs "
                         f"a block); use --pipeline-parallel-size <= {mcfg.n_layer} or a deeper --model")
    if args.seq_len > mcfg.n_positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's n_positions={mcfg.n_positions}; "
                         "use a shorter --seq-len or set n_positions in --model")
    if args.seq_len < 1:
        raise ValueError(f"--seq-len: must be >= 1 (got {args.seq_len})")
    width = args.seq_len + 1
    if len(tok.train) < width:
        raise ValueError(f"--data: the training split has {len(tok.train)} tokens, fewer than one window of "
                         f"--seq-len + 1 = {width}; give a longer text file or a shorter --seq-len")
    if len(tok.val) // width < micro_batch:
        raise ValueError(f"--data: the validation split (the corpus's last 5%) has {len(tok.val)} tokens, fewer than "
                         f"one eval batch of {micro_batch} x {width}; give a longer text file or a shorter --seq-len")


class StopAgreement:
    """SIGTERM/SIGUSR1 (Slurm's warning) ask for a clean stop; ranks may get it at different steps.

    After step t every rank starts a one-element all-reduce (max) of its stop flag on a gloo
    group of its own, outside ``train_batch``, and reads it after step t + 1: all ranks read the
    same value there, so all stop after the same step, at most two steps after the first signal.
    Cost: one 4-byte all-reduce per step, in flight while the next step computes.
    """

    def __init__(self, world: int):
        import torch.distributed as tdist

        self.signal = None
        self.group = tdist.new_group(backend="gloo") if world > 1 else None
        self.pending = None

    def handler(self, signum, frame):
        import signal
        self.signal = signal.Signals(signum).name

    def after_step(self) -> bool:
        import torch
        import torch.distributed as tdist

        if self.group is None:
            return self.signal is not None
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([int(self.signal is not None)])
        self.pending = (tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop

    def close(self):
        if self.pending is not None:  # every rank started the same reduces: waiting is local
            self.pending[0].wait()
            self.pending = None


class Watchdog:
    """Ends the process when one step takes longer than --comm-timeout: the process-group timeout
    covers waits inside communication, this covers a rank stuck anywhere else in a step."""

    def __init__(self, limit: float, rank: int):
        import threading

        self.limit, self.rank, self.started = limit, rank, None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            time.sleep(min(1.0, self.limit / 4))
            started = self.started
            if started is not None and time.monotonic() - started > self.limit:
                print(f"error: rank {self.rank}: a training step made no progress for {self.limit:.0f} s "
                      "(--comm-timeout): a peer rank died or hung; exiting", file=sys.stderr, flush=True)
                os._exit(3)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ouroboros_ds import data as D
    from ouroboros_ds import hf, runlog
    from ouroboros_ds import initialize
    from ouroboros_ds.models import gpt2_config, gpt2_layer_specs, lm_loss
    from ouroboros_ds.module import OuroborosPipelineModule

    cfg = load_config(args)
    check_args(args, cfg)
    runlog.wandb_mode_default(cfg)  # before initialize: DeepSpeed's monitor calls wandb.init
    tok = D.load_token_data(args.data, args.tokenizer, max_bytes=args.max_bytes)
    pretrained = hf.is_pretrained_dir(args.model)
    if pretrained:
        mcfg = hf.config_from_pretrained(args.model, dropout=args.dropout)
        if tok.vocab_size > mcfg.vocab_size:
            raise ValueError(f"--tokenizer: vocabulary {tok.vocab_size} exceeds the model's vocab_size="
                             f"{mcfg.vocab_size} in {args.model}/config.json; use the model's tokenizer")
    else:
        mcfg = gpt2_config(args.model, tok.vocab_size, dropout=args.dropout)
    if args.export and getattr(mcfg, "arch", "gpt2") != "gpt2":
        raise ValueError(f"--export: writes a Hugging Face GPT-2 model; the {mcfg.arch} layers have no "
                         "GPT2LMHeadModel counterpart; drop --export or use a GPT-2 --model")
    check_model(args, mcfg, tok, cfg["train_micro_batch_size_per_gpu"])
    if get_accelerator().device_name() == "cpu":
        # Ranks share the cores; oversubscribed threads make steps 2-4x slower and erratic.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one (else DeepSpeed tries MPI)
        from ouroboros_ds.utils import free_port
        port = free_port()
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    import datetime
    # The timeout bounds every process-group wait (gloo receives included): a dead or hung peer
    # ends this rank with an error instead of a hang.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=datetime.timedelta(seconds=args.comm_timeout))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    G = args.pipeline_parallel_size or world

    plan = gpt2_layer_specs(mcfg, seed=args.seed)
    if args.schedule != "ouroboros" and (args.replay != "recompute" or args.partition != "balanced"):
        raise ValueError("--replay/--partition apply to --schedule ouroboros only")
    if args.schedule == "ouroboros" and args.activation_checkpointing:
        raise ValueError("--activation-checkpointing applies to --schedule 1f1b (the Ouroboros replay "
                         "already recomputes; --replay stash keeps the graph instead)")
    if args.schedule == "ouroboros":
        from ouroboros_ds.module import balanced_blocks_per_module, layer_costs, stage_costs_of
        bpm, note = None, None
        if args.partition in ("balanced", "fresh"):
            costs = layer_costs(mcfg.n_embd, tok.vocab_size, args.seq_len)
            bpm = balanced_blocks_per_module(mcfg.n_layer, G, costs, args.replay, fresh=args.partition == "fresh")
            work = stage_costs_of(bpm, costs, args.replay)
            note = (f"partition {args.partition}: blocks of modules 1..K {bpm}; modelled work per stage "
                    f"(block forwards per micro-batch) " + ", ".join(f"{w / costs['block']:.2f}" for w in work))
        model = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, block_indices=plan.block_indices,
                                        blocks_per_module=bpm)
        model.partition_note = note
    else:
        from ouroboros_ds.baseline import BaselinePipelineModule
        model = BaselinePipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, partition_method="type:Block",
                               activation_checkpoint_interval=1 if args.activation_checkpointing else 0,
                               # only the blocks: reentrant checkpointing of the embedding (integer input)
                               # would cut it off from autograd
                               checkpointable_layers=["Block", "XLBlock"])
    if pretrained and hf.has_weights(args.model):
        hf.load_pretrained_weights(model, args.model, mcfg.n_layer)  # before initialize: fp16/ZeRO copy them
    params = [p for p in model.parameters() if p.requires_grad]
    if args.stale_lr_scale:
        if args.schedule != "ouroboros":
            raise ValueError("--stale-lr-scale: only the ouroboros schedule has stale modules; drop it for 1f1b")
        from ouroboros_ds.staleness import pipeline_groups
        params = pipeline_groups(model, cfg.get("optimizer", {}).get("params", {}).get("lr", 1e-3), args.stale_lr_scale)
    engine, *_ = initialize(model=model, model_parameters=params, config=cfg, seed=args.seed, replay=args.replay,
                            weight_prediction=args.weight_prediction)

    mb, M = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    dp, dp_rank = engine.dp_world_size, engine.mpu.get_data_parallel_rank()
    recurrent = getattr(mcfg, "arch", "gpt2") == "transfo-xl"  # memory needs each row to continue its text
    stream = D.BatchStream(tok.train, args.seq_len, mb, M, dp_rank=dp_rank, dp_size=dp, seed=args.seed,
                           ordered=recurrent)
    val = D.eval_batches(tok.val, args.seq_len, mb, max_batches=args.eval_batches, ordered=recurrent)
    n_eval = len(val)
    tokens_per_step = mb * M * dp * args.seq_len
    log = rank == 0
    out = open(args.metrics, "a") if (log and args.metrics) else None

    def emit(rec):
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    def evaluate(step):
        loss = engine.eval_batch(iter(val), num_micro_batches=n_eval)
        if log and loss is not None:
            v = float(loss)
            rec = {"step": step, "val_loss": v, "val_bpb": tok.bits_per_byte(v)}
            emit(rec)
            runlog.monitor_events(engine, rec)
            return rec
        return None

    runlog.track_waits(engine)  # per-stage utilization for --stage-stats-every
    summary = runlog.startup_summary(engine)  # collective: every rank reports its stage
    if log:
        print(f"ouroboros-ds: schedule={args.schedule} replay={args.replay if args.schedule == 'ouroboros' else '-'} "
              f"weight_prediction={args.weight_prediction} "
              f"activation_checkpointing={args.activation_checkpointing} G={G} dp={dp} M={M} micro-batch={mb} seq={args.seq_len} "
              f"vocab={tok.vocab_size} layers={mcfg.n_layer} d={mcfg.n_embd} train_tokens={len(tok.train):,} "
              f"unigram_entropy={tok.unigram_entropy_bits:.3f} bits/token", flush=True)
        if pretrained:
            print(f"  initialized from {args.model}" if hf.has_weights(args.model)
                  else f"  config from {args.model} (no weights there: random init)", flush=True)
        if getattr(model, "partition_note", None):
            print(f"  {model.partition_note}", flush=True)
        for line in summary:
            print(line, flush=True)
        rec = {"step": 0, "delays": runlog.delays(engine)}
        emit(rec)
        runlog.monitor_events(engine, rec)
    first = 0
    ckpt_meta = {"model": {k: getattr(mcfg, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                                                         "n_inner")}}
    # `--save DIR --load DIR` on every launch of a requeued job: the first launch finds no save yet.
    if args.load and not os.path.isfile(os.path.join(args.load, "latest")):
        if log:
            print(f"no save in {args.load} yet: starting from step 0", flush=True)
    elif args.load:
        client = engine.load_ring_checkpoint(args.load, meta=ckpt_meta)
        stream.load_state_dict(client["data"])
        first = engine.global_steps
        if log:
            print(f"resumed from {args.load} at step {first}", flush=True)

    def save(step, why):
        tag = engine.save_ring_checkpoint(args.save, client_state={"data": stream.state_dict()}, meta=ckpt_meta)
        if log:
            print(f"saved {os.path.join(args.save, tag)} ({why}); resume with --load {args.save}", flush=True)

    stopper = StopAgreement(world)
    import signal
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stopper.handler)
    watchdog = Watchdog(args.comm_timeout, rank)
    bar = None
    if log and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=first, unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    last, seen_events, step = None, 0, first
    # time inside train_batch, cumulative (wall-clock curves that evaluations and saves do not bend);
    # the per-stage stats take the part since their last report
    train_clock, stats_clock, stats_from = 0.0, 0.0, first
    try:
        for step in range(first, args.steps):
            watchdog.started = t0 = time.monotonic()
            loss = engine.train_batch(stream if (args.schedule == "1f1b" or engine.stage_id == 0) else None)
            watchdog.started = None
            train_clock += time.monotonic() - t0
            events = getattr(engine, "nonfinite_events", [])[seen_events:]
            seen_events += len(events)
            if log:
                secs = time.perf_counter() - start
                last = float(loss)
                emit({"step": step, "loss": last, "tokens": (step + 1) * tokens_per_step, "seconds": secs,
                      "train_seconds": train_clock, "lr": engine.get_lr()[0]})
                if events:  # this rank's part; other stages print theirs as warnings
                    emit({"step": step, "nonfinite": events})
                runlog.monitor_events(engine, {"tokens_per_s": (step + 1 - first) * tokens_per_step / secs})
                if bar:
                    bar.set_postfix(loss=f"{last:.3f}", tok_s=f"{(step + 1 - first) * tokens_per_step / secs:,.0f}")
                    bar.update(1)
            if args.stage_stats_every and ((step + 1) % args.stage_stats_every == 0 or step + 1 == args.steps):
                stats = runlog.stage_stats(engine, train_clock - stats_clock, step + 1 - stats_from)  # collective
                stats_clock, stats_from = train_clock, step + 1
                for rec in stats or []:
                    rec = {"step": step + 1, **rec}
                    emit(rec)
                    runlog.monitor_events(engine, rec)
            if stopper.after_step():
                stopper.close()
                if args.save:
                    save(step + 1, f"stopped by {stopper.signal or 'a signal on another rank'}")
                elif log:
                    print("stopped by a signal; no --save, so this run's progress is not kept", flush=True)
                return 0
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save(step + 1, f"every {args.save_every} steps")
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                evaluate(step + 1)
        stopper.close()
        if args.save:
            save(args.steps, "end of run")
    except RuntimeError as e:
        dist_error = getattr(torch.distributed, "DistError", ())
        if isinstance(e, dist_error) or any(w in str(e) for w in ("gloo", "NCCL", "Connection", "imed out")):
            line = (str(e).strip().splitlines() or [""])[0][:300]
            raise PeerFailure(f"rank {rank} (stage {getattr(engine, 'stage_id', '?')}) lost a peer at step {step}: "
                              f"{line}; a rank died or hung (waits give up after --comm-timeout "
                              f"{args.comm_timeout:g} s)") from None
        raise
    final = evaluate(args.steps)
    elapsed = time.perf_counter() - start
    if bar:
        bar.close()
    if log:
        n = args.steps - first
        print(f"done: {n} steps in {elapsed:.1f} s ({n / elapsed:.2f} steps/s, "
              f"{n * tokens_per_step / elapsed:,.0f} tokens/s); last train loss {last:.4f}; "
              f"val loss {final['val_loss']:.4f} nats/token, val {final['val_bpb']:.4f} bits/byte", flush=True)
    if out:
        out.close()
    if args.export:
        if hf.export_pretrained(engine.module, mcfg, args.export) and log:  # collective
            print(f"exported to {args.export} (AutoModelForCausalLM.from_pretrained loads it)", flush=True)
    if log and engine.monitor.enabled and getattr(engine.monitor, "wandb_monitor", None) is not None:
        import wandb
        wandb.finish()  # flush the run now rather than in an exit hook after the process group is gone
    return 0


class PeerFailure(RuntimeError):
    """A process-group operation failed or timed out: another rank died or hung."""


def cli(argv=None) -> int:
    """``main`` with bad input turned into one ``error: ...`` line (exit 2) and a lost peer into
    one line (exit 1), no stack trace."""
    code = 0
    try:
        code = main(argv)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no stack trace
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except PeerFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # the peers are gone: tearing the process group down could wait on them
    finally:
        import torch.distributed as _d
        if _d.is_available() and _d.is_initialized():
            _d.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(cli())
