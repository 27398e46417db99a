"""The Ouroboros engine: DeepSpeed's ``PipelineEngine`` running the delayed-gradient ring.

What changes against the stock engine, and why (the algorithm: docs/ring.md):

- The schedule is data (:mod:`ouroboros_ds.core.schedule`); :class:`~ouroboros_ds.pipe.instructions.
  OuroborosSchedule` indexes into it, one instruction per action, and the ``_exec_ring_*``
  handlers below are added to ``_INSTRUCTION_MAP`` (the stock entries stay; ``STEP`` is the stock
  ``ReduceGrads`` + ``OptimizerStep``).
- Work spans steps: the stock engine keeps one ``grad_layer`` and flushes every step; here the
  stashed inputs and the received error gradients live in dicts keyed by ``(k, batch, mb)`` that
  stay across ``train_batch()`` calls. Those dicts *are* the in-flight state a checkpoint holds
  (:mod:`ouroboros_ds.pipe.checkpoint`).
- Point-to-point goes through an untagged non-blocking channel (:mod:`ouroboros_ds.pipe.p2p`) whose
  messages match by posting order alone, as on NCCL; the schedule's order is what keeps them
  matched and deadlock-free (:mod:`ouroboros_ds.core.nccl` proves it).
- No collective crosses stages in the steady state: the loss stays on stage 0, gradients are
  clipped per stage (:mod:`ouroboros_ds.ring.optim`), tied weights live on one stage.
- ``replay="stash"`` keeps each forward's graph and weight snapshot (:mod:`ouroboros_ds.ring.stash`;
  within an activation budget, :mod:`ouroboros_ds.ring.memory`). ``weight_prediction`` takes the
  snapshot ahead along the last update; features replay then recomputes through it too.
  ``lookahead`` = L runs module K's losses and backwards L last updates ahead (stage 0 only).
- ``stage_clip``: each stage clips its own gradient norm, at ``gradient_clipping`` ("whole") or
  at that over sqrt(G) ("split": the whole model's norm stays within it, as DeepSpeed's clip).
- ``sync_steps``: the first steps run synchronously (every delay 0, the schedule's synchronous
  list); the step's delays are decided once, at its start (``step_synchronous``). Its error
  gradients come back within the step, so with features replay its forwards keep their graphs
  where stock 1F1B's memory allows (:func:`~ouroboros_ds.ring.memory.synchronous_kept`): 1F1B's work,
  not features replay's extra forward, and the same update.
- A non-finite loss or gradient is dropped batch by batch around the ring, with no collective.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.utils import logger

from ..core import schedule as S
from ..core.schedule import replays_batch
from ..models.context import dropout_key, recurrent_memory
from ..ring import prediction as WP
from ..ring import stash as W
from ..ring.config import RingConfig
from ..ring.memory import synchronous_kept
from . import p2p as P
from .checkpoint import RingCheckpointing
from .evaluation import RingEvaluation
from .instructions import (OuroborosSchedule, RingForward, RingLoad, RingLoss, RingRecvActivation, RingRecvGrad,
                           RingReplay, RingSendActivation, RingSendGrad)
from .module import OuroborosPipelineModule
from .stage_optimizer import StageOptimizer


# ------------------------------------------------------------------ the engine
class OuroborosEngine(RingEvaluation, StageOptimizer, RingCheckpointing, PipelineEngine):
    """Trains an :class:`OuroborosPipelineModule` with Ouroboros delayed gradients.

    ``train_batch()`` is one step t over ``gradient_accumulation_steps`` micro-batches and returns
    the mean loss of batch t on stage 0 (``None`` on other stages: the loss is not broadcast).
    """

    def __init__(self, *args, ring: RingConfig | None = None, seed: int = 0, replay_plan=None, **kwargs):
        # ring: the options, checked where they are defined (ring/config.py); None: the defaults
        self.ring = RingConfig() if ring is None else ring
        self._stages = kwargs["model"].num_stages
        # read before DeepSpeed builds the optimizer: its wrappers take the clip threshold, and its
        # warm-up hook counts from the end of the synchronous steps
        self.replay, self.stage_clip, self.sync_steps = self.ring.replay, self.ring.stage_clip, self.ring.sync_steps
        self.weight_prediction = float(self.ring.weight_prediction)
        self.lookahead = self.ring.lookahead_updates(self._stages)
        self.stale_lr_scale = self.ring.stale_lr_for(self._stages)
        self.step_synchronous = False  # whether the step being run is one of the sync_steps
        if replay_plan is not None and self.replay != "stash":
            raise ValueError("replay_plan / --activation-budget: needs replay='stash' (the plan chooses which stashed "
                             "forwards keep their graph); set replay / --replay to stash")
        # memory.ReplayPlan: which micro-batches keep their graph in stash mode (None: all of them)
        self.replay_plan = replay_plan
        config = kwargs.get("config_class")
        if config is not None and config.float16_config.enabled:
            # fp16's dynamic loss scale skips a step on overflow; on the ring every stage would have to
            # learn of any stage's overflow (a cross-stage collective, or a flag sent around the ring).
            raise ValueError('fp16.enabled: fp16 is not supported by the Ouroboros ring (an overflow skip would have '
                             'to agree on every stage); use "bf16": {"enabled": true} instead')
        super().__init__(*args, **kwargs)
        if not isinstance(self.module, OuroborosPipelineModule):
            raise TypeError("OuroborosEngine needs an OuroborosPipelineModule")
        if self.is_pipe_partitioned or self.is_grad_partitioned:
            raise ValueError("pipeline.pipe_partitioned / grad_partitioned: not supported by the Ouroboros ring; "
                             "set them to false")
        if self.module.activation_checkpoint_interval > 0:
            raise ValueError("activation_checkpoint_interval: the Ouroboros replay already recomputes the "
                             "forward; set it to 0")
        self.seed = seed
        self.K = S.num_modules(self.num_stages)
        # features replay: which forwards of a synchronous step keep their graph (stash mode keeps its own)
        self.sync_kept = synchronous_kept(self.module.blocks_per_module(), self.micro_batches) \
            if self.replay == "recompute" else {}
        self.local_modules = S.modules_of(self.stage_id, self.num_stages)
        self.stash: dict = {}      # (k, batch, mb) -> stashed input of the forward
        self.grads_in: dict = {}   # (k, batch, mb) -> dL/d(output): tensor or p2p.PendingRecv
        self.acts_in: dict = {}    # (k, mb) -> input of this step: tensor or p2p.PendingRecv
        self.outbox: dict = {}     # (kind, k, mb) -> tensor to send
        self.labels: dict = {}     # mb -> labels of this step (stage 0)
        # Recurrent models (Transformer-XL): the memory each (module, micro-batch stream) wrote in
        # its last forward, and the memory each stashed forward read, which its replay must see.
        self.mems: dict = {}        # (k, mb) -> {layer: memory}
        self.stash_mems: dict = {}  # (k, batch, mb) -> {layer: memory}
        self.step_losses: list = []
        self.p2p = P.RingChannel(self.device, lambda stage: self.grid.stage_to_global(stage_id=stage))
        self._out_like: dict = {}  # k -> (shape, dtype) of module k's output: its error gradient's
        self._evals = 0  # evaluations run: each numbers its messages apart
        self.nonfinite_events: list = []  # non-finite losses/gradients met, and what was dropped
        # replay="stash", or weight_prediction in either mode. weight_stash is state (a checkpoint holds it); graphs is a cache that
        # _stash_graph() rebuilds from stash + weight_stash + the dropout key when it is missing.
        self.weight_stash: dict = {}  # (k, batch) -> stash.Snapshot of the forward's weights
        self.graphs: dict = {}        # (k, batch, mb) -> (input leaf, output) with its graph
        self.saved_bytes = None       # a stash.SavedBytes to count the kept graphs' activations
        # weight_prediction only: the delayed modules' weights before the last step (state).
        self.last_update = WP.LastUpdate(WP.delayed_parameters(
            self.module.module_funcs[k] for k in self.local_modules if k < self.K)) if self.weight_prediction else None
        # lookahead only, on the stage that holds module K: its own weights before the last step
        # (state), and during a step the weights the look-ahead moved away from (prediction.look_ahead).
        self.k_update = WP.LastUpdate(WP.own_parameters(self.module.module_funcs[self.K])) \
            if self.lookahead and self.K in self.local_modules else None
        self._k_saved = None
        # Replica r's micro-batch j is micro-batch j*D + r of the global batch (data.BatchStream):
        # dropout is keyed by that index, so D replicas draw the masks of the D = 1 run.
        self._dp_rank = self.grid.get_data_parallel_rank()

    # ---------------------------------------------------------- DeepSpeed hooks we change
    def _train_schedule(self):
        return OuroborosSchedule(micro_batches=self.micro_batches, stages=self.num_stages, stage_id=self.stage_id,
                                 synchronous=self.step_synchronous)

    # Overridden: the data loader lives on stage 0 only (it feeds module 1 and module K's labels);
    # the stock engine also gives one to the topologically last stage.
    def set_dataiterator(self, iterator):
        if self.stage_id == 0:
            self.training_dataloader = None
            self.data_iterator = iterator

    def set_dataloader(self, loader):
        if self.stage_id == 0:
            self.training_dataloader = loader
            self.data_iterator = iter(loader)

    def train_batch(self, data_iter=None):
        """One Ouroboros step. Stage 0 returns the batch's mean loss, other stages ``None``."""
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled; use eval_batch() instead")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self.step_losses = []
        self.step_synchronous = self.global_steps < self.sync_steps
        self.timers("train_batch").start()
        self._exec_schedule(self._train_schedule())
        self.p2p.end_step()
        self.timers("train_batch").stop()
        self.agg_train_loss = None
        if self.stage_id == 0:
            loss = torch.stack(self.step_losses).mean()
            if self.is_data_parallel:
                dist.all_reduce(loss, group=self.mpu.get_data_parallel_group())
                loss /= self.dp_world_size
            self.agg_train_loss = loss
            if self.global_rank == 0 and self.monitor.enabled:
                self.monitor.write_events([("Train/Samples/train_loss", loss.item(), self.global_samples)])
        return self.agg_train_loss

    # ---------------------------------------------------------- helpers
    @property
    def batch_id(self) -> int:
        """t: the step being run (``global_steps`` counts finished optimizer steps)."""
        return self.global_steps

    def _global_mb(self, mb: int) -> int:
        return mb * self.dp_world_size + self._dp_rank

    def _delay(self, k: int) -> int:
        """Module k's delay in the step being run: 0 in a synchronous step."""
        return S.delay(k, self.num_stages, self.step_synchronous)

    # ---------------------------------------------------------- the instructions
    def _exec_ring_load(self, k, mb):
        """``1LOADj``: micro-batch j of batch t from the data iterator (stage 0)."""
        batch = self._next_batch()
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("the data iterator must yield (input_ids, labels) pairs")
        inputs, labels = (t.to(self.device) for t in batch)
        self.acts_in[(1, mb)] = inputs
        self.labels[mb] = labels

    def _exec_ring_recv_activation(self, k, mb):
        """``kRECV_Fj``: post the receive of module k's input (pairs with (k-1)SEND_Fj)."""
        src = S.stage_of(k - 1, self.num_stages)
        self.acts_in[(k, mb)] = self.p2p.irecv(src, P.Msg(P.ACT, k, self.batch_id, mb))

    def _exec_ring_forward(self, k, mb):
        """``kFj``: forward batch t through module k without a graph; stash the input for the replay.
        Stash mode: with a graph, through the batch's weight snapshot (kept for the replay)."""
        t = self.batch_id
        x = self.p2p.wait(self.acts_in.pop((k, mb)))
        self.stash[(k, t, mb)] = x
        if self.saved_bytes is not None:
            self.saved_bytes.track(x)
        mem = self.mems.get((k, mb))
        if mem:
            self.stash_mems[(k, t, mb)] = mem
        with recurrent_memory(mem) as new_mem:
            if self.replay == "stash" and (self.replay_plan is None or self.replay_plan.keeps(k, mb)):
                y = self._stash_graph(k, t, mb)[1].detach()
            elif self.replay == "stash" or (self.last_update is not None and self._delay(k)):
                # a graph the plan does not keep, or weight prediction with features replay: run through
                # the snapshot without a graph; the replay recomputes through the same snapshot (a
                # synchronous step predicts nothing and takes none, as the Reference)
                with torch.no_grad():
                    y = self._stash_graph(k, t, mb, keep=False)[1]
            elif self.step_synchronous and mb < self.sync_kept.get(k, 0):
                # the replay backprops this forward within the step, at these weights: keep the graph
                # (1F1B's work) instead of recomputing it there (ring/memory.synchronous_kept)
                self.graphs[(k, t, mb)] = self._graph_forward(k, t, mb, x)
                y = self.graphs[(k, t, mb)][1].detach()
            else:
                with torch.no_grad(), dropout_key(self.seed, t, self._global_mb(mb)):
                    y = self.module.forward_module(k, x)
        self._keep_memory(k, mb, new_mem)
        self._out_like[k] = (tuple(y.shape), y.dtype)
        if S.stage_of(k + 1, self.num_stages) == self.stage_id:
            self.acts_in[(k + 1, mb)] = y  # G = 1: module K is local
        else:
            self.outbox[(S.SEND_F, k, mb)] = y

    def _keep_memory(self, k, mb, new_mem):
        if new_mem:  # only recurrent layers write one (detached: no gradient flows into memory)
            self.mems[(k, mb)] = new_mem

    def _exec_ring_send_activation(self, k, mb):
        """``kSEND_Fj``: send module k's output downstream (pairs with (k+1)RECV_Fj)."""
        y = self.outbox.pop((S.SEND_F, k, mb))
        self.p2p.isend(y, S.stage_of(k + 1, self.num_stages), P.Msg(P.ACT, k + 1, self.batch_id, mb))

    def _exec_ring_recv_grad(self, k, mb):
        """``kRECV_Bj``: post the receive of dL/d(output of k) for the batch module k replays next
        step, or in a synchronous step for this step's batch (pairs with (k+1)SEND_Bj). Nothing is
        sent for a batch that does not exist yet, nor for one replayed in its synchronous step."""
        if self.step_synchronous:
            b = self.batch_id
        else:
            b = self.batch_id + 1 - self._delay(k)
        # the step that replays b is this one, or the next, a ring step like this one
        if replays_batch(b, self.step_synchronous, self.sync_steps):
            src = S.stage_of(k + 1, self.num_stages)
            # shaped like module k's output, which this step's forward made
            self.grads_in[(k, b, mb)] = self.p2p.irecv(src, P.Msg(P.GRAD, k, b, mb), like=self._out_like[k])

    def _exec_ring_replay(self, k, mb):
        """``kBj``: features replay of batch b = t - delay(k): recompute module k from the stashed
        input with the current weights and the forward's dropout masks, backprop the received
        error gradient. Nothing to do while b < 0 (warm-up), nor in a ring step for a batch that
        was replayed in its own synchronous step (b < sync_steps)."""
        b = self.batch_id - self._delay(k)
        if not replays_batch(b, self.step_synchronous, self.sync_steps):
            return
        g = self.p2p.wait(self.grads_in.pop((k, b, mb)))
        if not torch.isfinite(g).all():  # a non-finite loss or gradient downstream: drop (b, mb)
            self._report_nonfinite("error gradient", k, b, mb)
            x = self._release(k, b, mb)
            if k > 1:  # pass the poison on: module k-1 drops (b, mb) when it replays it
                self.outbox[(S.SEND_B, k, mb)] = torch.full_like(x, float("nan"))
            return
        if self.replay == "stash" or (k, b) in self.weight_stash:  # prediction: recompute at the snapshot
            return self._stash_replay(k, b, mb, g)
        x = self.stash.pop((k, b, mb))
        mem = self.stash_mems.pop((k, b, mb), None)
        kept = self.graphs.pop((k, b, mb), None)  # a synchronous step's forward kept its graph
        if kept is None:
            with recurrent_memory(mem):
                kept = self._graph_forward(k, b, mb, x)
        x, y = kept
        torch.autograd.backward(y, g)
        if k > 1:
            self.outbox[(S.SEND_B, k, mb)] = x.grad

    def _graph_forward(self, k, b, mb, x):
        """Module k's forward of (batch b, mb) with a graph, under the forward's dropout key:
        ``(input, output)``, the input a leaf that requires grad (when floating point) for dL/d(input)."""
        if x.is_floating_point():
            x = x.detach().requires_grad_()
        with dropout_key(self.seed, b, self._global_mb(mb)):
            return x, self.module.forward_module(k, x)

    def _stash_graph(self, k, b, mb, keep=True):
        """The kept graph of (k, batch b, mb): run (or, after a restore or for a micro-batch the
        replay plan does not keep, rerun) the forward of the stashed input through batch b's weight
        snapshot, taken at the batch's first forward. ``keep=False``: run it, do not cache it."""
        key = (k, b, mb)
        if key not in self.graphs or not keep:
            self._snapshot(k, b)
            hooks = self.saved_bytes.hooks() if self.saved_bytes is not None else nullcontext()
            with hooks, dropout_key(self.seed, b, self._global_mb(mb)):
                out = W.forward(self.module.module_funcs[k], self.weight_stash[(k, b)], self.stash[key])
            if not keep:
                return out
            self.graphs[key] = out
        return self.graphs[key]

    def _snapshot(self, k, b):
        """Batch b's weight snapshot of module k, taken (predicted, with weight prediction) at the
        batch's first forward and kept until its last replay."""
        if (k, b) not in self.weight_stash:
            snap = self.weight_stash[(k, b)] = W.take_snapshot(
                self.module.module_funcs[k], self.last_update, self.weight_prediction * self._delay(k))
            if self.saved_bytes is not None:  # counted once, as held state, not per graph
                for c, _ in snap.live:
                    self.saved_bytes.track(c)
        return self.weight_stash[(k, b)]

    def _stash_replay(self, k, b, mb, g):
        """``kBj`` in stash mode: backprop the kept graph of batch b with the received error
        gradient ``g``, at the forward's weights."""
        with recurrent_memory(self.stash_mems.get((k, b, mb))):  # for a graph rebuilt after a restore
            x, y = self._stash_graph(k, b, mb)
        dx = W.backward(x, y, g, self.weight_stash[(k, b)])
        self._release(k, b, mb)
        if k > 1:
            self.outbox[(S.SEND_B, k, mb)] = dx

    def _release(self, k, b, mb):
        """Drop (k, b, mb)'s stashed state once replayed (or dropped as non-finite); the
        weight snapshot goes with the batch's last micro-batch. Returns the stashed input."""
        x = self.stash.pop((k, b, mb))
        self.graphs.pop((k, b, mb), None)
        self.stash_mems.pop((k, b, mb), None)
        if (k, b) in self.weight_stash and not any(key[:2] == (k, b) for key in self.stash):
            self.weight_stash.pop((k, b))
        return x

    def stash_memory(self) -> dict:
        """Bytes of this stage's stashed state now: inputs, weight snapshots, and (stash mode, when
        ``saved_bytes`` is set) the activations the kept graphs hold."""
        out = {"inputs": sum(x.numel() * x.element_size() for x in self.stash.values()),
               "snapshots": sum(s.nbytes() for s in self.weight_stash.values())}
        if self.saved_bytes is not None:
            out["saved_activations"] = self.saved_bytes.live
        return out

    def _exec_ring_send_grad(self, k, mb):
        """``kSEND_Bj``: send dL/d(input of k) upstream (pairs with (k-1)RECV_Bj)."""
        g = self.outbox.pop((S.SEND_B, k, mb), None)
        if g is not None:  # None: the replay was a warm-up no-op, and the peer expects nothing
            b = self.batch_id - (0 if k == self.K else self._delay(k))
            self.p2p.isend(g, S.stage_of(k - 1, self.num_stages), P.Msg(P.GRAD, k - 1, b, mb))

    def _exec_ring_loss(self, k, mb):
        """``KLj``: module K's forward, loss and backward of batch t, at once (no delay)."""
        t = self.batch_id
        x = self.p2p.wait(self.acts_in.pop((k, mb))).detach().requires_grad_()
        if mb == 0 and self.k_update is not None and not self.step_synchronous:
            # lookahead: module K's error gradients reach module k delay(k) steps from now, when module
            # K has moved on, so all of the step's losses and backwards run L last updates ahead (once
            # per step, as the Reference does). _exec_ring_optimizer_step puts the weights back, so the
            # step, evaluation and checkpoints (between steps) see the real ones. The tied embedding is
            # module 1's and stays put; module 1's replays ran before the losses. A synchronous step
            # applies its error gradients at once: nothing to look ahead for.
            self._k_saved = WP.look_ahead(self.k_update, self.lookahead)
        with dropout_key(self.seed, t, self._global_mb(mb)), recurrent_memory(self.mems.get((k, mb))) as new_mem:
            loss = self.module.loss_fn(self.module.forward_module(k, x), self.labels.pop(mb))
        self._keep_memory(k, mb, new_mem)
        self.step_losses.append(loss.detach())
        if torch.isfinite(loss):
            torch.autograd.backward(loss / self.micro_batches)
            g = x.grad
        else:  # drop (t, mb) here and poison its error gradient so every module drops it in turn
            self._report_nonfinite("loss", k, t, mb)
            g = torch.full_like(x, float("nan"))
        if self.num_stages == 1:  # module 1 replays batch t next step, from this local gradient
            self.grads_in[(1, t, mb)] = g
        else:
            self.outbox[(S.SEND_B, k, mb)] = g

    # ---------------------------------------------------------- non-finite values
    # No collective: a non-finite loss of (t, j) is not backpropagated; a NaN error gradient takes
    # its place on the ring, so each module k drops (t, j) exactly when its delayed gradient
    # arrives (step t + K - k), and the stash and receive of (t, j) are consumed as usual. A
    # non-finite parameter gradient that appears inside a stage (an overflow in its own backward)
    # makes that stage skip its update for the step; the LR schedule and step count still advance.
    def _report_nonfinite(self, what, k, batch, mb, action="dropped"):
        event = {"step": self.global_steps, "stage": self.stage_id, "what": what, "module": k,
                 "batch": batch, "mb": mb, "action": action}
        self.nonfinite_events.append(event)
        logger.warning(f"ouroboros: non-finite {what} at step {event['step']} on stage {self.stage_id} "
                       f"(module {k}, batch {batch}, micro-batch {mb}): {action}")

    def _exec_ring_optimizer_step(self, lr_kwargs=None):
        """``STEP``'s optimizer half: skip the stage's update when a gradient is non-finite (after
        the data-parallel reduction, so all replicas of the stage decide alike), then DeepSpeed's
        step. One read of the gradients, as the clip does."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self._report_nonfinite("parameter gradient", None, None, None, action="stage update skipped")
            for p in self.module.parameters():
                p.grad = None  # torch's Adam/AdamW leave a parameter without a gradient untouched
        if self._k_saved is not None:  # lookahead: the gradient of the look-ahead point steps the real weights
            WP.look_back(self.k_update, self._k_saved)
            self._k_saved = None
        for update in (self.last_update, self.k_update):
            if update is not None:
                update.record()
        PipelineEngine._exec_optimizer_step(self, lr_kwargs)

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.ReduceGrads: StageOptimizer._exec_reduce_grads,
        ds_schedule.OptimizerStep: _exec_ring_optimizer_step,
        RingLoad: _exec_ring_load,
        RingForward: _exec_ring_forward,
        RingReplay: _exec_ring_replay,
        RingLoss: _exec_ring_loss,
        RingSendActivation: _exec_ring_send_activation,
        RingRecvActivation: _exec_ring_recv_activation,
        RingSendGrad: _exec_ring_send_grad,
        RingRecvGrad: _exec_ring_recv_grad,
    }
