"""Train a GPT-2-style or Llama-style language model with the Ouroboros pipeline on DeepSpeed (or,
for the baseline, with DeepSpeed's stock synchronous 1F1B pipeline on the same model and data).

The job, for the flags of ``ouroboros_ds.train.config.TrainConfig`` (launch commands: train.py)::

    trainer = Trainer(parse_config(argv))
    trainer.build()    # DeepSpeed JSON, data, model config: every check before any process group;
                       # then the process group, the pipeline module, the engine, the resume (--load)
    trainer.train()    # the steps: metrics, stage stats, saves, evaluations; every rank stops after
                       # the same step on SIGTERM/SIGUSR1; a lost peer raises PeerFailure
    trainer.export()   # --export: a Hugging Face model
    trainer.close()

``cli`` is the command (train.py, the ``ouroboros-train`` script, ``python -m ouroboros_ds.train.trainer``):
bad input ends with one ``error: ...`` line (exit 2), a lost peer with one line (exit 1).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from ouroboros_ds.train.config import TrainConfig, check_model, load_deepspeed_config, model_config, parse_config
from ouroboros_ds.train.resilience import PeerFailure, StopAgreement, Watchdog


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.out = None  # the metrics file (global rank 0, --metrics)
        self.bar = None  # the progress bar (global rank 0)

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """One pass: check every input, start the process group, build the module and the engine,
        say what runs, resume. The checks come before the process group, so a bad launch ends at
        once, on every rank, with the same line."""
        pretrained = self._check_inputs()
        self._start_process_group()
        model, replay_plan, notes = self._module()
        self.engine = self._engine(model, replay_plan, pretrained)
        self._batches()
        self._announce(pretrained, notes)
        self._resume()

    def _check_inputs(self) -> bool:
        """The DeepSpeed config, the data and the model checked against each other; returns whether
        --model is a Hugging Face directory."""
        from ouroboros_ds.train import data as D

        c = self.config
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.ds = ds = load_deepspeed_config(c)
        c.pipeline.stages(world)
        self.tok = D.load_token_data(c.data.name, c.data.tokenizer, max_bytes=c.data.max_bytes)
        self.mcfg, pretrained = model_config(c, self.tok.vocab_size)
        check_model(c, self.mcfg, self.tok, ds["train_micro_batch_size_per_gpu"], world)
        # Transformer-XL's memory needs each row to continue its own text
        self.recurrent = getattr(self.mcfg, "arch", "gpt2") == "transfo-xl"
        self.val = D.eval_batches(self.tok.val, c.training.seq_len, ds["train_micro_batch_size_per_gpu"],
                                  max_batches=c.training.eval_batches, ordered=self.recurrent)
        if c.pipeline.schedule == "dualpipev":
            from ouroboros_ds.pipe.baseline import check_dualpipev
            check_dualpipev(ds["gradient_accumulation_steps"], c.pipeline.stages(world), len(self.val))
        return pretrained

    def _start_process_group(self) -> None:
        import datetime

        import torch
        from deepspeed.accelerator import get_accelerator

        from ouroboros_ds.pipe.launch import init_distributed
        from ouroboros_ds.train import runlog

        c = self.config
        runlog.wandb_mode_default(self.ds)  # before initialize: DeepSpeed's monitor calls wandb.init
        if get_accelerator().device_name() == "cpu":
            # Ranks share the cores; oversubscribed threads make steps 2-4x slower and erratic.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        if "RANK" not in os.environ:  # plain `python train.py`: a world of one (else DeepSpeed tries MPI)
            from ouroboros_ds.ring.utils import free_port
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        # The timeout bounds every process-group wait (gloo receives included): a dead or hung peer
        # ends this rank with an error instead of a hang.
        init_distributed(timeout=datetime.timedelta(seconds=c.training.comm_timeout))
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.G = c.pipeline.stages(self.world)
        self.log = self.rank == 0

    def _engine(self, model, replay_plan, pretrained: bool):
        from ouroboros_ds import initialize
        from ouroboros_ds.train import hf

        c = self.config
        if pretrained and hf.has_weights(c.model.name):
            hf.load_pretrained_weights(model, c.model.name, self.mcfg)  # before initialize: fp16/ZeRO copy them
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = initialize(model=model, model_parameters=params, config=self.ds, seed=c.training.seed,
                                ring=c.ring if c.pipeline.schedule == "ouroboros" else None, replay_plan=replay_plan)
        return engine

    def _batches(self) -> None:
        """The training stream of this replica, and where the metrics go."""
        from ouroboros_ds.train import data as D

        c, engine = self.config, self.engine
        mb, M = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        dp, dp_rank = engine.dp_world_size, engine.mpu.get_data_parallel_rank()
        self.stream = D.BatchStream(self.tok.train, c.training.seq_len, mb, M, dp_rank=dp_rank, dp_size=dp,
                                    seed=c.training.seed, ordered=self.recurrent)
        self.tokens_per_step = mb * M * dp * c.training.seq_len
        self.out = open(c.logging.metrics, "a") if (self.log and c.logging.metrics) else None

    def _announce(self, pretrained: bool, notes: list) -> None:
        """Rank 0 prints the run's settings and every stage's summary (a collective: every rank
        reports), and writes the delays to the metrics."""
        from ouroboros_ds.train import hf, runlog

        c, engine, tok = self.config, self.engine, self.tok
        runlog.track_waits(engine)  # per-stage utilization for --stage-stats-every
        self.peak = runlog.PeakMemory(engine)  # per-stage peak memory for --stage-stats-every
        summary = runlog.startup_summary(engine)
        dims = hf.dims(self.mcfg)
        self.ckpt_meta = {"model": dims}
        if not self.log:
            return
        ring = c.pipeline.schedule == "ouroboros"
        seq_len = c.training.seq_len
        print(f"ouroboros-ds: schedule={c.pipeline.schedule} "
              + (f"replay={c.ring.replay} weight_prediction={c.ring.weight_prediction} lookahead={engine.lookahead} "
                 f"sync_steps={c.ring.sync_steps} stage_clip={c.ring.stage_clip} stale_lr_scale={engine.stale_lr_scale:g} "
                 if ring else
                 f"activation_checkpointing={c.pipeline.activation_checkpointing} ")
              + f"G={self.G} dp={engine.dp_world_size} M={engine.gradient_accumulation_steps()} "
              f"micro-batch={engine.train_micro_batch_size_per_gpu()} seq={seq_len} vocab={tok.vocab_size} "
              f"layers={dims['n_layer']} d={dims['n_embd']} train_tokens={len(tok.train):,} "
              f"unigram_entropy={tok.unigram_entropy_bits:.3f} bits/token", flush=True)
        if "model_type" in dims:
            print(f"  model: {dims['model_type']} ({'tied' if dims['tied'] else 'untied'} head, "
                  f"{dims['n_head']} heads / {dims['n_kv_head']} key-value heads, vocab_size={dims['vocab_size']})",
                  flush=True)
            if seq_len > dims["n_positions"]:
                print(f"  note: --seq-len {seq_len} > max_position_embeddings={dims['n_positions']}: rotary "
                      "positions beyond the model's configured context", flush=True)
        if pretrained:
            print(f"  initialized from {c.model.name}" if hf.has_weights(c.model.name)
                  else f"  config from {c.model.name} (no weights there: random init)", flush=True)
        for line in notes:
            print(f"  {line}", flush=True)
        for line in summary:
            print(line, flush=True)
        self.emit({"step": 0, "delays": runlog.delays(engine)})

    def _resume(self) -> None:
        c, engine = self.config, self.engine
        self.first = 0
        load = c.checkpoint.load
        # `--save DIR --load DIR` on every launch of a requeued job: the first launch finds no save yet.
        if load and not c.checkpoint.has_save():
            if self.log:
                print(f"no save in {load} yet: starting from step 0", flush=True)
        elif load:
            client = engine.load_ring_checkpoint(load, meta=self.ckpt_meta)
            self.stream.load_state_dict(client["data"])
            self.first = engine.global_steps
            if self.log:
                print(f"resumed from {load} at step {self.first}", flush=True)

    def _module(self):
        """(the pipeline module, its replay plan or None, lines that describe its split): the
        Ouroboros ring or, for the baseline, DeepSpeed's PipelineModule over the same layers."""
        from ouroboros_ds.train import hf
        from ouroboros_ds.models import families as models_hf
        from ouroboros_ds.models.gpt2 import lm_loss

        c, mcfg, G = self.config, self.mcfg, self.G
        plan = hf.layer_specs_of(mcfg, seed=c.training.seed)  # GPT-2's layers or a family's
        if c.pipeline.schedule == "ouroboros":
            from ouroboros_ds.core.partition import balanced_blocks_per_module, stage_costs_of
            from ouroboros_ds.pipe.module import OuroborosPipelineModule
            bpm, notes, chosen = None, [], None
            if c.ring.partition == "budget":  # blocks and kept graphs chosen together
                bpm, chosen = self._budget_partition(plan)
                notes.append(f"partition budget: blocks of modules 1..K {bpm}")
            if c.ring.partition in ("balanced", "fresh"):
                costs = hf.layer_costs_of(mcfg, self.tok.vocab_size, c.training.seq_len)
                bpm = balanced_blocks_per_module(len(plan.block_indices), G, costs, c.ring.replay,
                                                 fresh=c.ring.partition == "fresh")
                work = stage_costs_of(bpm, costs, c.ring.replay)
                notes.append(f"partition {c.ring.partition}: blocks of modules 1..K {bpm}; modelled work per stage "
                             f"(block forwards per micro-batch) " + ", ".join(f"{w / costs['block']:.2f}" for w in work))
            model = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss,
                                            block_indices=plan.block_indices, blocks_per_module=bpm)
            if c.ring.replay != "stash":
                return model, None, notes
            if chosen is None:  # the memory-bounded replay: which forwards keep their graph, for this partition
                from ouroboros_ds.ring.memory import plan_replay
                from ouroboros_ds.ring.reference import build_layers
                chosen = plan_replay(build_layers(plan), plan.block_indices, self._sample(), G,
                                     self._micro_batches(), model.module_bounds, self._budget())
            return model, chosen.plan, [*notes, chosen.describe()]
        if c.pipeline.schedule == "dualpipev":
            from ouroboros_ds.pipe.baseline import BaselineDualPipeVModule
            return BaselineDualPipeVModule(plan.specs, num_stages=G, loss_fn=lm_loss,
                                           partition_method="type:Block"), None, []
        from ouroboros_ds.pipe.baseline import BaselinePipelineModule
        return BaselinePipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, partition_method="type:Block",
                                      activation_checkpoint_interval=1 if c.pipeline.activation_checkpointing else 0,
                                      # only the blocks: reentrant checkpointing of the embedding (integer
                                      # input) would cut it off from autograd
                                      checkpointable_layers=["Block", "XLBlock", models_hf.BLOCK_CLASS]), None, []

    def _budget(self) -> str:
        return self.config.ring.activation_budget or "1f1b"

    def _micro_batches(self) -> int:
        return self.ds["gradient_accumulation_steps"]

    def _sample(self):
        """One micro-batch of token ids: what the replay planner measures the layers on."""
        import torch

        mb = self.ds["train_micro_batch_size_per_gpu"]
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, self.tok.vocab_size, (mb, self.config.training.seq_len), generator=g)

    def _budget_partition(self, plan):
        """--partition budget: ``(blocks per module, memory.BudgetPlan)`` chosen together."""
        c = self.config
        from ouroboros_ds.train import hf
        from ouroboros_ds.ring.memory import plan_partition
        from ouroboros_ds.ring.reference import build_layers

        bpm, chosen = plan_partition(build_layers(plan), plan.block_indices, self._sample(), self.G,
                                     self._micro_batches(),
                                     hf.layer_costs_of(self.mcfg, self.tok.vocab_size, c.training.seq_len),
                                     self._budget())
        return bpm, chosen

    # ------------------------------------------------------------------ records
    def emit(self, rec: dict) -> None:
        """One metrics line (global rank 0 with --metrics) and the same record to DeepSpeed's monitor."""
        from ouroboros_ds.train import runlog

        self.write(rec)
        runlog.monitor_events(self.engine, rec)

    def write(self, rec: dict) -> None:
        if self.out:
            self.out.write(json.dumps(rec) + "\n")
            self.out.flush()

    # ------------------------------------------------------------------ train
    def train(self) -> bool:
        """Steps ``first .. --steps - 1``, then the final evaluation; False when a signal stopped
        the run first (after a save with --save).

            for step:
                train_batch (the data on stage 0; every stage for 1F1B)   # the watchdog bounds it
                rank 0: a metrics line {step, loss, tokens, seconds, train_seconds, tokens_per_s, lr}, the bar
                every --stage-stats-every steps: per-stage stats gathered to rank 0
                the ranks agree to stop (SIGTERM/SIGUSR1): save, return False
                every --save-every steps: save; every --eval-every steps: evaluate
            save (--save); evaluate; the summary line
        """
        import signal

        import torch

        from ouroboros_ds.train import runlog

        c, engine, log = self.config, self.engine, self.log
        steps, first, tokens_per_step = c.training.steps, self.first, self.tokens_per_step
        self.stopper = stopper = StopAgreement(self.world)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, stopper.handler)
        watchdog = Watchdog(c.training.comm_timeout, self.rank)
        if log and not c.logging.no_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=steps, initial=first, unit="step", dynamic_ncols=True)
        start = time.perf_counter()
        last, seen_events, step = None, 0, first
        # time inside train_batch, cumulative (wall-clock curves that evaluations and saves do not bend);
        # the per-stage stats take the part since their last report
        train_clock, stats_clock, stats_from = 0.0, 0.0, first
        stats_every, save_every, eval_every = c.logging.stage_stats_every, c.checkpoint.save_every, c.training.eval_every
        try:
            for step in range(first, steps):
                watchdog.started = t0 = time.monotonic()
                # the peak-memory hooks cost Python work per saved tensor: count on the step that
                # closes a stats window only (in the steady state every step is alike)
                closes_window = stats_every and ((step + 1) % stats_every == 0 or step + 1 == steps)
                with self.peak.track(engine) if closes_window else contextlib.nullcontext():
                    loss = engine.train_batch(self.stream if (c.pipeline.schedule != "ouroboros" or engine.stage_id == 0)
                                              else None)
                watchdog.started = None
                train_clock += time.monotonic() - t0
                events = getattr(engine, "nonfinite_events", [])[seen_events:]
                seen_events += len(events)
                if log:
                    secs = time.perf_counter() - start
                    last = float(loss)
                    tok_s = (step + 1 - first) * tokens_per_step / secs
                    self.write({"step": step, "loss": last, "tokens": (step + 1) * tokens_per_step, "seconds": secs,
                                "train_seconds": train_clock, "tokens_per_s": tok_s, "lr": engine.get_lr()[0]})
                    if events:  # this rank's part; other stages print theirs as warnings
                        self.write({"step": step, "nonfinite": events})
                    runlog.monitor_events(engine, {"tokens_per_s": tok_s})
                    if self.bar:
                        self.bar.set_postfix(loss=f"{last:.3f}", tok_s=f"{tok_s:,.0f}")
                        self.bar.update(1)
                if stats_every and ((step + 1) % stats_every == 0 or step + 1 == steps):
                    stats = runlog.stage_stats(engine, train_clock - stats_clock, step + 1 - stats_from,  # collective
                                               peak=self.peak)
                    stats_clock, stats_from = train_clock, step + 1
                    for rec in stats or []:  # the window's throughput next to each stage's peak memory
                        tps = tokens_per_step / rec["step_seconds"] if rec["step_seconds"] > 0 else None
                        self.emit({"step": step + 1, **rec, "tokens_per_s": tps})
                if stopper.after_step():
                    stopper.close()
                    if c.checkpoint.save:
                        self.save(step + 1, f"stopped by {stopper.signal or 'a signal on another rank'}")
                    elif log:
                        print("stopped by a signal; no --save, so this run's progress is not kept", flush=True)
                    return False
                if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                    self.save(step + 1, f"every {save_every} steps")
                if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                    self.evaluate(step + 1)
            stopper.close()
            if c.checkpoint.save:
                self.save(steps, "end of run")
        except RuntimeError as e:
            dist_error = getattr(torch.distributed, "DistError", ())
            if isinstance(e, dist_error) or any(w in str(e) for w in ("gloo", "NCCL", "Connection", "imed out")):
                line = (str(e).strip().splitlines() or [""])[0][:300]
                raise PeerFailure(f"rank {self.rank} (stage {getattr(engine, 'stage_id', '?')}) lost a peer at step "
                                  f"{step}: {line}; a rank died or hung (waits give up after --comm-timeout "
                                  f"{c.training.comm_timeout:g} s)") from None
            raise
        final = self.evaluate(steps)
        elapsed = time.perf_counter() - start
        if self.bar:
            self.bar.close()
            self.bar = None
        if log:
            n = steps - first
            print(f"done: {n} steps in {elapsed:.1f} s ({n / elapsed:.2f} steps/s, "
                  f"{n * tokens_per_step / elapsed:,.0f} tokens/s); last train loss {last:.4f}; "
                  f"val loss {final['val_loss']:.4f} nats/token, val {final['val_bpb']:.4f} bits/byte", flush=True)
        return True

    def evaluate(self, step: int) -> dict | None:
        """Validation loss over --eval-batches micro-batches (collective); rank 0 gets the record."""
        loss = self.engine.eval_batch(iter(self.val), num_micro_batches=len(self.val))
        if self.log and loss is not None:
            v = float(loss)
            rec = {"step": step, "val_loss": v, "val_bpb": self.tok.bits_per_byte(v)}
            self.emit(rec)
            return rec
        return None

    def save(self, step: int, why: str) -> None:
        """A ring checkpoint in --save (collective), with the data stream's position."""
        save = self.config.checkpoint.save
        tag = self.engine.save_ring_checkpoint(save, client_state={"data": self.stream.state_dict()},
                                               meta=self.ckpt_meta)
        if self.log:
            print(f"saved {os.path.join(save, tag)} ({why}); resume with --load {save}", flush=True)

    def export(self) -> None:
        """--export: the trained model as a Hugging Face directory of its family (collective)."""
        from ouroboros_ds.train import hf

        out = self.config.model.export
        if hf.export_pretrained(self.engine.module, self.mcfg, out) and self.log:
            print(f"exported to {out} (AutoModelForCausalLM.from_pretrained loads it)", flush=True)

    def close(self) -> None:
        """The progress bar and the metrics file (local: safe after a lost peer too)."""
        if self.bar:
            self.bar.close()
            self.bar = None
        if self.out:
            self.out.close()
            self.out = None


def main(argv=None) -> int:
    config = parse_config(argv, description=__doc__.split("\n\n")[0])
    trainer = Trainer(config)
    try:
        trainer.build()
        if trainer.train():
            if config.model.export:
                trainer.export()
            engine = trainer.engine
            if trainer.log and engine.monitor.enabled and getattr(engine.monitor, "wandb_monitor", None) is not None:
                import wandb
                wandb.finish()  # flush the run now rather than in an exit hook after the process group is gone
    finally:
        trainer.close()
    return 0


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
