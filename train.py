"""Train a GPT-2-style language model with the Ouroboros pipeline on DeepSpeed (or, for the
baseline, with DeepSpeed's stock synchronous 1F1B pipeline on the same model and data).

Launch:
  CPU-only box (2 ranks on gloo; each rank gets cores / ranks torch threads):
    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/ouroboros.json
    torchrun --nproc_per_node 2 train.py --deepspeed_config ds_configs/ouroboros.json
  One process (G = 1: modules 1 and 2 share stage 0; still the delayed update):
    python train.py --deepspeed_config ds_configs/ouroboros.json
  GPUs (one rank per GPU, NCCL):
    deepspeed --num_gpus 4 train.py --deepspeed_config ds_configs/ouroboros.json --pipeline-parallel-size 4
  Baseline on the same model, data and seed:
    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/ouroboros.json --schedule 1f1b

The same --seed gives both schedules the same initial weights, the same batches and the same
dropout masks, so their first losses are equal and later differences are the algorithm's.
Metrics (--metrics PATH, JSON lines, written by global rank 0): one line per step
{"step", "loss", "tokens", "seconds", "lr"} and one per evaluation {"step", "val_loss", "val_bpb"};
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
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (train_batch calls)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="override optimizer.params.lr of the config")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation micro-batches per evaluation")
    p.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes of the corpus")
    p.add_argument("--metrics", default=None, help="write JSON-lines metrics here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ouroboros_ds import data as D
    from ouroboros_ds import hf, runlog
    from ouroboros_ds.engine import initialize
    from ouroboros_ds.models import gpt2_config, gpt2_layer_specs, lm_loss
    from ouroboros_ds.module import OuroborosPipelineModule

    cfg = load_config(args)
    runlog.wandb_mode_default(cfg)  # before initialize: DeepSpeed's monitor calls wandb.init
    if args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if get_accelerator().device_name() == "cpu":
        # Ranks share the cores; oversubscribed threads make steps 2-4x slower and erratic.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one (else DeepSpeed tries MPI)
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    G = args.pipeline_parallel_size or world
    if G < 1 or world % G:
        raise ValueError(f"--pipeline-parallel-size: {G} must divide the world size {world} "
                         f"(world = stages x data-parallel replicas)")

    tok = D.load_token_data(args.data, args.tokenizer, max_bytes=args.max_bytes)
    pretrained = hf.is_pretrained_dir(args.model)
    if pretrained:
        mcfg = hf.config_from_pretrained(args.model, dropout=args.dropout)
        if tok.vocab_size > mcfg.vocab_size:
            raise ValueError(f"--tokenizer: vocabulary {tok.vocab_size} exceeds the model's vocab_size="
                             f"{mcfg.vocab_size} in {args.model}/config.json; use the model's tokenizer")
    else:
        mcfg = gpt2_config(args.model, tok.vocab_size, dropout=args.dropout)
    if args.seq_len > mcfg.n_positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's n_positions={mcfg.n_positions}; "
                         "use a shorter --seq-len or set n_positions in --model")
    plan = gpt2_layer_specs(mcfg, seed=args.seed)
    if args.schedule == "ouroboros":
        model = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, block_indices=plan.block_indices)
    else:
        from deepspeed.pipe import PipelineModule
        if G > mcfg.n_layer:
            raise ValueError(f"--pipeline-parallel-size {G} exceeds the model's {mcfg.n_layer} blocks")
        model = PipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, partition_method="type:Block")
    if pretrained and hf.has_weights(args.model):
        hf.load_pretrained_weights(model, args.model, mcfg.n_layer)  # before initialize: fp16/ZeRO copy them
    engine, *_ = initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                            config=cfg, seed=args.seed)

    mb, M = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    dp, dp_rank = engine.dp_world_size, engine.mpu.get_data_parallel_rank()
    stream = D.BatchStream(tok.train, args.seq_len, mb, M, dp_rank=dp_rank, dp_size=dp, seed=args.seed)
    val = D.eval_batches(tok.val, args.seq_len, mb, max_batches=args.eval_batches)
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
        print(f"ouroboros-ds: schedule={args.schedule} G={G} dp={dp} M={M} micro-batch={mb} seq={args.seq_len} "
              f"vocab={tok.vocab_size} layers={mcfg.n_layer} d={mcfg.n_embd} train_tokens={len(tok.train):,} "
              f"unigram_entropy={tok.unigram_entropy_bits:.3f} bits/token", flush=True)
        if pretrained:
            print(f"  initialized from {args.model}" if hf.has_weights(args.model)
                  else f"  config from {args.model} (no weights there: random init)", flush=True)
        for line in summary:
            print(line, flush=True)
        rec = {"step": 0, "delays": runlog.delays(engine)}
        emit(rec)
        runlog.monitor_events(engine, rec)
    bar = None
    if log and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    last = None
    train_seconds, stats_from = 0.0, 0
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = engine.train_batch(stream if (args.schedule == "1f1b" or engine.stage_id == 0) else None)
        train_seconds += time.perf_counter() - t0
        if log:
            secs = time.perf_counter() - start
            last = float(loss)
            emit({"step": step, "loss": last, "tokens": (step + 1) * tokens_per_step, "seconds": secs,
                  "lr": engine.get_lr()[0]})
            runlog.monitor_events(engine, {"tokens_per_s": (step + 1) * tokens_per_step / secs})
            if bar:
                bar.set_postfix(loss=f"{last:.3f}", tok_s=f"{(step + 1) * tokens_per_step / secs:,.0f}")
                bar.update(1)
        if args.stage_stats_every and ((step + 1) % args.stage_stats_every == 0 or step + 1 == args.steps):
            stats = runlog.stage_stats(engine, train_seconds, step + 1 - stats_from)  # collective
            train_seconds, stats_from = 0.0, step + 1
            for rec in stats or []:
                rec = {"step": step + 1, **rec}
                emit(rec)
                runlog.monitor_events(engine, rec)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            evaluate(step + 1)
    final = evaluate(args.steps)
    elapsed = time.perf_counter() - start
    if bar:
        bar.close()
    if log:
        print(f"done: {args.steps} steps in {elapsed:.1f} s ({args.steps / elapsed:.2f} steps/s, "
              f"{args.steps * tokens_per_step / elapsed:,.0f} tokens/s); last train loss {last:.4f}; "
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


if __name__ == "__main__":
    try:
        code = main()
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no stack trace
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        import torch.distributed as _d
        if _d.is_available() and _d.is_initialized():
            _d.destroy_process_group()
    sys.exit(code)
