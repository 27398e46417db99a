"""The Ouroboros engine: DeepSpeed's ``PipelineEngine`` running the delayed-gradient ring.

What changes against the stock engine, and why:

- The schedule is :func:`ouroboros_ds.schedule.ouroboros_schedule`; :class:`OuroborosSchedule`
  only indexes into it, one DeepSpeed instruction per action. The new instructions are added to
  ``_INSTRUCTION_MAP`` (the stock entries stay; ``STEP`` maps to the stock ``ReduceGrads`` and
  ``OptimizerStep``).
- Work spans steps. The stock engine keeps one ``grad_layer`` and flushes every step; here the
  stashed inputs and the received error gradients live in dicts keyed by ``(module, batch,
  micro-batch)`` and stay across ``train_batch()`` calls: that dict *is* the in-flight state.
- Point-to-point is non-blocking (``isend``/``irecv``), posted early, waited for at first use,
  each message with its own tag so nothing depends on the order of unrelated messages.
- No collective crosses stages in the steady state: the loss stays on stage 0 (no broadcast),
  gradients are clipped per stage, tied weights live on one stage.
- ``replay="stash"`` (:mod:`ouroboros_ds.stash`): the forward of module k < K keeps its graph,
  run through a snapshot of the module's weights; the replay backprops it (no recompute), so the
  delayed gradient is taken at the forward's weights (PipeDream-style weight stashing).
  ``weight_prediction`` (off by default) takes that snapshot ahead along the last update
  (:class:`ouroboros_ds.stash.LastUpdate`), so the gradient is nearly the one at the weights it
  is applied to.
- Data parallelism, ZeRO-1 and bf16 stay DeepSpeed's optimizer wrappers; the engine only gives them
  one param group per first-gradient step (so a module in warm-up can be left alone) and a grid
  whose model-parallel group is this stage (so their grad norm is the stage's, reduced over its
  data-parallel group only). See ``_configure_optimizer``. fp16 is refused (use bf16).
- Checkpoints (:meth:`OuroborosEngine.save_ring_checkpoint`) add the in-flight dicts to
  DeepSpeed's layout and switch ``latest`` only when every rank is done; a non-finite loss or
  gradient is dropped batch by batch around the ring with no collective (``_report_nonfinite``).
"""
from __future__ import annotations

import json
import os
import random
from contextlib import nullcontext as _nullcontext

import numpy as np
import torch
import torch.distributed as tdist
from deepspeed import comm as dist
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.schedule import PipeInstruction, PipeSchedule
from deepspeed.utils import logger

from . import schedule as S
from .context import dropout_key, recurrent_memory
from .module import OuroborosPipelineModule
from . import stash as W
from .utils import atomic_write
from .warmup import FIRST_STEP, ring_param_groups

# Message tags: one per (kind, module, micro-batch), so every message matches its own receive.
_ACT, _GRAD, _META, _EVAL, _EVAL_META = 1, 2, 3, 4, 5


def _tag(kind: int, module: int, mb: int) -> int:
    return (kind * 128 + module) * 4096 + mb


class _Recv:
    """A posted (or queued, while the edge's shape is unknown) receive."""

    def __init__(self, stage, tag, meta_tag):
        self.stage, self.tag, self.meta_tag = stage, tag, meta_tag
        self.buf = self.req = None


# ------------------------------------------------------------------ DeepSpeed-facing schedule
class RingInstruction(PipeInstruction):
    """One action of the Ouroboros schedule; ``module`` and ``mb`` as in :class:`schedule.Action`."""


class RingLoad(RingInstruction): pass  # noqa: E701
class RingForward(RingInstruction): pass  # noqa: E701
class RingReplay(RingInstruction): pass  # noqa: E701
class RingLoss(RingInstruction): pass  # noqa: E701
class RingSendActivation(RingInstruction): pass  # noqa: E701
class RingRecvActivation(RingInstruction): pass  # noqa: E701
class RingSendGrad(RingInstruction): pass  # noqa: E701
class RingRecvGrad(RingInstruction): pass  # noqa: E701


_INSTRUCTION_OF = {
    S.LOAD: RingLoad, S.F: RingForward, S.B: RingReplay, S.L: RingLoss,
    S.SEND_F: RingSendActivation, S.RECV_F: RingRecvActivation,
    S.SEND_B: RingSendGrad, S.RECV_B: RingRecvGrad,
}


def instructions_of(action: S.Action) -> list[PipeInstruction]:
    if action.kind == S.STEP:
        return [ds_schedule.ReduceGrads(), ds_schedule.OptimizerStep()]
    return [_INSTRUCTION_OF[action.kind](module=action.module, mb=action.mb)]


class OuroborosSchedule(PipeSchedule):
    """DeepSpeed's view of one stage's Ouroboros step: one atomic instruction list per action."""

    def __init__(self, micro_batches, stages, stage_id):
        super().__init__(micro_batches, stages, stage_id)
        self.actions = S.ouroboros_schedule(stages, micro_batches)[stage_id]

    def steps(self):
        for action in self.actions:
            yield instructions_of(action)

    def num_pipe_buffers(self):
        return 0  # the engine keeps its in-flight state in dicts, not in DeepSpeed's pipe buffers


class _StageGrid:
    """DeepSpeed's pipe grid as the optimizer wrappers (ZeRO, BF16_Optimizer) see it.

    They all-reduce the gradient norm (and fp16's overflow flag) over ``get_model_parallel_group()``,
    which for a pipeline is every stage of the replica: a cross-stage collective each step, and a
    global clip where Ouroboros clips per stage. Here the model-parallel group is this stage's
    tensor-slice group (this rank alone, no tensor parallelism), so the norm a wrapper clips by is
    the stage's own, reduced over the data-parallel group only. Everything else is the grid's."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def get_model_parallel_group(self):
        return self._grid.get_slice_parallel_group()

    def get_model_parallel_world_size(self):
        return self._grid.get_slice_parallel_world_size()

    def get_model_parallel_rank(self):
        return self._grid.get_slice_parallel_rank()


# ------------------------------------------------------------------ the engine
class OuroborosEngine(PipelineEngine):
    """Trains an :class:`OuroborosPipelineModule` with Ouroboros delayed gradients.

    ``train_batch()`` is one step t over ``gradient_accumulation_steps`` micro-batches and returns
    the mean loss of batch t on stage 0 (``None`` on other stages: the loss is not broadcast).
    """

    def __init__(self, *args, seed: int = 0, replay: str = "recompute", weight_prediction: float = 0.0, **kwargs):
        self.replay = W.check_replay(replay)
        self.weight_prediction = W.check_prediction(weight_prediction, self.replay)
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
        self.local_modules = S.modules_of(self.stage_id, self.num_stages)
        self.stash: dict = {}      # (module, batch, mb) -> stashed input of the forward
        self.grads_in: dict = {}   # (module, batch, mb) -> dL/d(output): tensor or _Recv
        self.acts_in: dict = {}    # (module, mb) -> input of this step: tensor or _Recv
        self.outbox: dict = {}     # (kind, module, mb) -> tensor to send
        self.labels: dict = {}     # mb -> labels of this step (stage 0)
        # Recurrent models (Transformer-XL): the memory each (module, micro-batch stream) wrote in
        # its last forward, and the memory each stashed forward read, which its replay must see.
        self.mems: dict = {}        # (module, mb) -> {layer: memory}
        self.stash_mems: dict = {}  # (module, batch, mb) -> {layer: memory}
        self.step_losses: list = []
        self._sends: list = []     # (request, tensor) of the previous and the current step
        self._prev_sends: list = []
        self._queued: dict = {}     # (peer stage, kind) -> receives waiting for the edge's shape
        self._edge_meta: dict = {}  # ("in"|"out", peer stage, kind) -> (shape, dtype) on that edge
        self.nonfinite_events: list = []  # non-finite losses/gradients met, and what was dropped
        # replay="stash" only. weight_stash is state (a checkpoint holds it); graphs is a cache that
        # _stash_graph() rebuilds from stash + weight_stash + the dropout key when it is missing.
        self.weight_stash: dict = {}  # (module, batch) -> stash.Snapshot of the forward's weights
        self.graphs: dict = {}        # (module, batch, mb) -> (input leaf, output) with its graph
        self.saved_bytes = None       # a stash.SavedBytes to count the kept graphs' activations
        # weight_prediction only: the delayed modules' weights before the last step (state).
        self.last_update = W.LastUpdate(W.delayed_parameters(
            self.module.module_funcs[k] for k in self.local_modules if k < self.K)) if self.weight_prediction else None
        # Replica r's micro-batch j is micro-batch j*D + r of the global batch (data.BatchStream):
        # dropout is keyed by that index, so D replicas draw the masks of the D = 1 run.
        self._dp_rank = self.grid.get_data_parallel_rank()

    # ---------------------------------------------------------- DeepSpeed hooks we change
    def _train_schedule(self):
        return OuroborosSchedule(micro_batches=self.micro_batches, stages=self.num_stages, stage_id=self.stage_id)

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

    # Overridden, to keep DeepSpeed's optimizer wrappers (ZeRO-1, bf16) as they are and change only
    # what they are given: (1) one param group per first-gradient step (ring_param_groups), when the
    # caller passes plain parameters, and a step pre-hook that leaves a group in warm-up alone:
    # ZeRO and BF16_Optimizer turn a
    # missing gradient into zeros, and Adam would then move the module (weight decay, step count)
    # before its first delayed gradient; with the gradient set to None the torch optimizer skips it,
    # exactly as it skips the plain parameters in the ZeRO-0 fp32 path and in the Reference.
    # (2) a grid whose model-parallel group is this stage (see _StageGrid): per-stage clip, no
    # cross-stage collective.
    def _configure_optimizer(self, client_optimizer, model_parameters):
        if model_parameters is None or all(torch.is_tensor(p) for p in model_parameters):
            given = None if model_parameters is None else {id(p) for p in model_parameters}
            model_parameters = ring_param_groups(self.module)
            if given is not None and given != {id(p) for g in model_parameters for p in g["params"]}:
                raise ValueError("model_parameters: pass this stage's trainable parameters (module.parameters()) "
                                 "or None; the engine groups them by first-gradient step")
        elif not all(isinstance(g, dict) and FIRST_STEP in g for g in model_parameters):
            raise ValueError(f"model_parameters: param groups need the key {FIRST_STEP!r} (the first step their "
                             "parameters have a gradient); pass plain parameters to get ring_param_groups(module)")
        mpu, self.mpu = self.mpu, _StageGrid(self.mpu)
        try:
            super()._configure_optimizer(client_optimizer, model_parameters)
        finally:
            self.mpu = mpu
        self.basic_optimizer.register_step_pre_hook(self._skip_warmup_groups)

    def _skip_warmup_groups(self, optimizer, args, kwargs):
        """Step pre-hook of the torch optimizer: no gradient for a group whose module is in warm-up."""
        for group in optimizer.param_groups:
            if self.batch_id < group[FIRST_STEP]:
                for p in group["params"]:
                    p.grad = None

    # Overridden: the stock clip all-reduces the norm over all stages (a cross-stage collective);
    # Ouroboros clips each stage's gradient by its own norm. After the data-parallel reduction the
    # gradients agree across replicas, so the local norm is the stage's norm.
    def clip_fp32_gradients(self):
        params = [p for p in self.module.parameters() if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm=self.gradient_clipping())

    # Overridden: the stock reduction turns a missing gradient into zeros, which would make Adam
    # move a module that has no delayed gradient yet (warm-up). Plain torch optimizer (ZeRO-0,
    # fp32): reduce only gradients that exist; all replicas of a stage are in the same warm-up
    # state, so they reduce the same list. ZeRO-1 / BF16_Optimizer: the stock path, see below.
    def _exec_reduce_grads(self):
        if self.using_bf16_optimizer:
            # The stock backward hands each backward's bf16 gradients to the fp32 accumulators;
            # the ring's replays call autograd directly, so hand them over once, before the reduce.
            # A module in warm-up has none: give it zeros, as the stock reduction does (BF16_Optimizer
            # norms only gradients it has seen, and has none at all on a stage in warm-up); the
            # step hook keeps the optimizer off it.
            for p in self.module.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.optimizer.update_hp_grads(clear_lp_grads=True)
        if self.zero_optimization() or self.using_bf16_optimizer:
            # The wrappers own the reduction (over self.mpu's data-parallel group only) and the
            # fp32 gradients; missing gradients become zeros there and the step hook skips them.
            return PipelineEngine._exec_reduce_grads(self)
        if not self.is_data_parallel:
            return
        grads = [p.grad.data for p in self.module.parameters() if p.grad is not None]
        if grads:
            self._force_grad_boundary = True
            self.buffered_allreduce_fallback(grads=grads)
            self._force_grad_boundary = False

    def train_batch(self, data_iter=None):
        """One Ouroboros step. Stage 0 returns the batch's mean loss, other stages ``None``."""
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled; use eval_batch() instead")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self.step_losses = []
        self.timers("train_batch").start()
        self._exec_schedule(self._train_schedule())
        # Sends of the previous step have long been received; keep this step's alive until next.
        for req, _ in self._prev_sends:
            req.wait()
        self._prev_sends, self._sends = self._sends, []
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

    def _peer(self, stage: int) -> int:
        return self.grid.stage_to_global(stage_id=stage)

    def _isend(self, tensor, stage, tag, meta_tag):
        key = ("out", stage, meta_tag)
        if key not in self._edge_meta:  # first message on this edge: tell the peer shape and dtype
            self._edge_meta[key] = (tuple(tensor.shape), tensor.dtype)
            meta = torch.zeros(8, dtype=torch.long)
            meta[:2 + tensor.dim()] = torch.tensor([self.DTYPE_TO_ID[tensor.dtype], tensor.dim(), *tensor.shape])
            meta = meta.to(self.device)
            # Non-blocking like the data: a blocking send would wait for the peer to reach the
            # receive, which it may only do after work that waits on this stage (a deadlock).
            self._sends.append((tdist.isend(meta, self._peer(stage), tag=_tag(meta_tag, 0, 0)), meta))
        tensor = tensor.contiguous()
        self._sends.append((tdist.isend(tensor, self._peer(stage), tag=tag), tensor))

    def _irecv(self, stage, tag, meta_tag) -> "_Recv":
        """Post a receive. While the edge's shape is unknown (its first message is preceded by a
        metadata message) the receive waits in line; posting order decides which message a
        receive gets, so every later receive on the edge first posts the waiting ones in order."""
        r = _Recv(stage, tag, meta_tag)
        self._queued.setdefault((stage, meta_tag), []).append(r)
        if ("in", stage, meta_tag) in self._edge_meta:
            self._post_queued(stage, meta_tag)
        return r

    def _post_queued(self, stage, meta_tag):
        shape, dtype = self._edge_meta[("in", stage, meta_tag)]
        for r in self._queued.pop((stage, meta_tag), []):
            r.buf = torch.empty(shape, dtype=dtype, device=self.device)
            r.req = tdist.irecv(r.buf, self._peer(stage), tag=r.tag)

    def _wait(self, entry):
        """The tensor of a posted receive, or a local tensor as is."""
        if torch.is_tensor(entry):
            return entry
        if entry.req is None:  # the edge's first message: read its metadata, then post in order
            key = ("in", entry.stage, entry.meta_tag)
            meta = torch.zeros(8, dtype=torch.long, device=self.device)
            tdist.recv(meta, self._peer(entry.stage), tag=_tag(entry.meta_tag, 0, 0))
            ndim = int(meta[1])
            self._edge_meta[key] = (tuple(int(d) for d in meta[2:2 + ndim]), self.ID_TO_DTYPE[int(meta[0])])
            self._post_queued(entry.stage, entry.meta_tag)
        entry.req.wait()
        return entry.buf

    # ---------------------------------------------------------- the instructions
    def _exec_ring_load(self, module, mb):
        """``1LOADj``: micro-batch j of batch t from the data iterator (stage 0)."""
        batch = self._next_batch()
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("the data iterator must yield (input_ids, labels) pairs")
        inputs, labels = (t.to(self.device) for t in batch)
        self.acts_in[(1, mb)] = inputs
        self.labels[mb] = labels

    def _exec_ring_recv_activation(self, module, mb):
        """``kRECV_Fj``: post the receive of module k's input (pairs with (k-1)SEND_Fj)."""
        src = S.stage_of(module - 1, self.num_stages)
        self.acts_in[(module, mb)] = self._irecv(src, _tag(_ACT, module, mb), _ACT)

    def _exec_ring_forward(self, module, mb):
        """``kFj``: forward batch t through module k without a graph; stash the input for the replay.
        Stash mode: with a graph, through the batch's weight snapshot (kept for the replay)."""
        t = self.batch_id
        x = self._wait(self.acts_in.pop((module, mb)))
        self.stash[(module, t, mb)] = x
        mem = self.mems.get((module, mb))
        if mem:
            self.stash_mems[(module, t, mb)] = mem
        with recurrent_memory(mem) as new_mem:
            if self.replay == "stash":
                y = self._stash_graph(module, t, mb)[1].detach()
            else:
                with torch.no_grad(), dropout_key(self.seed, t, self._global_mb(mb)):
                    y = self.module.forward_module(module, x)
        self._keep_memory(module, mb, new_mem)
        if S.stage_of(module + 1, self.num_stages) == self.stage_id:
            self.acts_in[(module + 1, mb)] = y  # G = 1: module K is local
        else:
            self.outbox[(S.SEND_F, module, mb)] = y

    def _keep_memory(self, module, mb, new_mem):
        if new_mem:  # only recurrent layers write one (detached: no gradient flows into memory)
            self.mems[(module, mb)] = new_mem

    def _exec_ring_send_activation(self, module, mb):
        """``kSEND_Fj``: send module k's output downstream (pairs with (k+1)RECV_Fj)."""
        y = self.outbox.pop((S.SEND_F, module, mb))
        self._isend(y, S.stage_of(module + 1, self.num_stages), _tag(_ACT, module + 1, mb), _ACT)

    def _exec_ring_recv_grad(self, module, mb):
        """``kRECV_Bj``: post the receive of dL/d(output of k) for the batch module k replays next
        step (pairs with (k+1)SEND_Bj; nothing is sent while that batch does not exist yet)."""
        b = self.batch_id + 1 - S.delay(module, self.num_stages)
        if b >= 0:
            src = S.stage_of(module + 1, self.num_stages)
            self.grads_in[(module, b, mb)] = self._irecv(src, _tag(_GRAD, module, mb), _GRAD)

    def _exec_ring_replay(self, module, mb):
        """``kBj``: features replay of batch b = t - delay(k): recompute module k from the stashed
        input with the current weights and the forward's dropout masks, backprop the received
        error gradient. Nothing to do while b < 0 (warm-up)."""
        b = self.batch_id - S.delay(module, self.num_stages)
        if b < 0:
            return
        g = self._wait(self.grads_in.pop((module, b, mb)))
        if not torch.isfinite(g).all():  # a non-finite loss or gradient downstream: drop (b, mb)
            self._report_nonfinite("error gradient", module, b, mb)
            x = self._release(module, b, mb)
            if module > 1:  # pass the poison on: module k-1 drops (b, mb) when it replays it
                self.outbox[(S.SEND_B, module, mb)] = torch.full_like(x, float("nan"))
            return
        if self.replay == "stash":
            return self._stash_replay(module, b, mb, g)
        x = self.stash.pop((module, b, mb))
        if x.is_floating_point():
            x = x.detach().requires_grad_()
        mem = self.stash_mems.pop((module, b, mb), None)
        with dropout_key(self.seed, b, self._global_mb(mb)), recurrent_memory(mem):
            y = self.module.forward_module(module, x)
        torch.autograd.backward(y, g)
        if module > 1:
            self.outbox[(S.SEND_B, module, mb)] = x.grad

    def _stash_graph(self, module, b, mb):
        """The kept graph of (module, batch b, mb): run (or, after a restore, rerun) the forward of
        the stashed input through batch b's weight snapshot, taken at the batch's first forward."""
        key = (module, b, mb)
        if key not in self.graphs:
            if (module, b) not in self.weight_stash:
                snap = self.weight_stash[(module, b)] = W.take_snapshot(
                    self.module.module_funcs[module], self.last_update,
                    self.weight_prediction * S.delay(module, self.num_stages))
                if self.saved_bytes is not None:
                    self.saved_bytes.exclude |= {c.untyped_storage().data_ptr() for c, _ in snap.live}
            hooks = self.saved_bytes.hooks() if self.saved_bytes is not None else _nullcontext()
            with hooks, dropout_key(self.seed, b, self._global_mb(mb)):
                self.graphs[key] = W.forward(self.module.module_funcs[module], self.weight_stash[(module, b)],
                                             self.stash[key])
        return self.graphs[key]

    def _stash_replay(self, module, b, mb, g):
        """``kBj`` in stash mode: backprop the kept graph of batch b with the received error
        gradient ``g``, at the forward's weights."""
        with recurrent_memory(self.stash_mems.get((module, b, mb))):  # for a graph rebuilt after a restore
            x, y = self._stash_graph(module, b, mb)
        dx = W.backward(x, y, g, self.weight_stash[(module, b)])
        self._release(module, b, mb)
        if module > 1:
            self.outbox[(S.SEND_B, module, mb)] = dx

    def _release(self, module, b, mb):
        """Drop (module, b, mb)'s stashed state once replayed (or dropped as non-finite); the
        weight snapshot goes with the batch's last micro-batch. Returns the stashed input."""
        x = self.stash.pop((module, b, mb))
        self.graphs.pop((module, b, mb), None)
        self.stash_mems.pop((module, b, mb), None)
        if (module, b) in self.weight_stash and not any(k[0] == module and k[1] == b for k in self.stash):
            snap = self.weight_stash.pop((module, b))
            if self.saved_bytes is not None:
                self.saved_bytes.exclude -= {c.untyped_storage().data_ptr() for c, _ in snap.live}
        return x

    def stash_memory(self) -> dict:
        """Bytes of this stage's stashed state now: inputs, weight snapshots, and (stash mode, when
        ``saved_bytes`` is set) the activations the kept graphs hold."""
        def nb(t):
            return t.numel() * t.element_size()
        out = {"inputs": sum(nb(x) for x in self.stash.values()),
               "snapshots": sum(s.nbytes() for s in self.weight_stash.values())}
        if self.saved_bytes is not None:
            out["saved_activations"] = self.saved_bytes.live
        return out

    def _exec_ring_send_grad(self, module, mb):
        """``kSEND_Bj``: send dL/d(input of k) upstream (pairs with (k-1)RECV_Bj)."""
        g = self.outbox.pop((S.SEND_B, module, mb), None)
        if g is not None:  # None: the replay was a warm-up no-op, and the peer expects nothing
            self._isend(g, S.stage_of(module - 1, self.num_stages), _tag(_GRAD, module - 1, mb), _GRAD)

    def _exec_ring_loss(self, module, mb):
        """``KLj``: module K's forward, loss and backward of batch t, at once (no delay)."""
        t = self.batch_id
        x = self._wait(self.acts_in.pop((module, mb))).detach().requires_grad_()
        with dropout_key(self.seed, t, self._global_mb(mb)), recurrent_memory(self.mems.get((module, mb))) as new_mem:
            out = self.module.forward_module(module, x)
            loss = self.module.loss_fn(out, self.labels.pop(mb))
        self._keep_memory(module, mb, new_mem)
        self.step_losses.append(loss.detach())
        if torch.isfinite(loss):
            torch.autograd.backward(loss / self.micro_batches)
            g = x.grad
        else:  # drop (t, mb) here and poison its error gradient so every module drops it in turn
            self._report_nonfinite("loss", module, t, mb)
            g = torch.full_like(x, float("nan"))
        if self.num_stages == 1:  # module 1 replays batch t next step, from this local gradient
            self.grads_in[(1, t, mb)] = g
        else:
            self.outbox[(S.SEND_B, module, mb)] = g

    # ---------------------------------------------------------- non-finite values
    # No collective: a non-finite loss of (t, j) is not backpropagated; a NaN error gradient takes
    # its place on the ring, so each module k drops (t, j) exactly when its delayed gradient
    # arrives (step t + K - k), and the stash and receive of (t, j) are consumed as usual. A
    # non-finite parameter gradient that appears inside a stage (an overflow in its own backward)
    # makes that stage skip its update for the step; the LR schedule and step count still advance.
    def _report_nonfinite(self, what, module, batch, mb, action="dropped"):
        event = {"step": self.global_steps, "stage": self.stage_id, "what": what, "module": module,
                 "batch": batch, "mb": mb, "action": action}
        self.nonfinite_events.append(event)
        logger.warning(f"ouroboros: non-finite {what} at step {event['step']} on stage {self.stage_id} "
                       f"(module {module}, batch {batch}, micro-batch {mb}): {action}")

    def _exec_ring_optimizer_step(self, lr_kwargs=None):
        """``STEP``'s optimizer half: skip the stage's update when a gradient is non-finite (after
        the data-parallel reduction, so all replicas of the stage decide alike), then DeepSpeed's
        step. One read of the gradients, as the clip does."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self._report_nonfinite("parameter gradient", None, None, None, action="stage update skipped")
            for p in self.module.parameters():
                p.grad = None  # torch's Adam/AdamW leave a parameter without a gradient untouched
        if self.last_update is not None:
            self.last_update.record()
        PipelineEngine._exec_optimizer_step(self, lr_kwargs)

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.ReduceGrads: _exec_reduce_grads,
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

    # ---------------------------------------------------------- evaluation and state
    @torch.no_grad()
    def eval_batch(self, data_iter=None, num_micro_batches: int = 1):
        """Forward ``num_micro_batches`` micro-batches around the ring with dropout off.

        Every rank calls it with the same ``num_micro_batches``; stage 0 reads them from
        ``data_iter`` and returns the mean loss (other stages return ``None``). Messages use
        their own tags, so in-flight training messages are untouched; no barrier. Recurrent
        modules carry an evaluation memory from micro-batch to micro-batch (each module runs them
        in order), starting empty and apart from the training memories, so ``data_iter`` should
        give consecutive segments (``data.eval_batches(ordered=True)``).
        """
        was_training = self.module.training
        n_sends = len(self._sends)
        self.module.eval()
        G, losses, local, labels, mems = self.num_stages, [], {}, {}, {}
        try:
            for k in self.local_modules:  # stage 0: all of module 1 first, then all of module K
                src, dst = S.stage_of(max(k - 1, 1), G), S.stage_of(min(k + 1, self.K), G)
                for mb in range(num_micro_batches):
                    if k == 1:
                        x, labels[mb] = (t.to(self.device) for t in next(data_iter))
                    elif src == self.stage_id:
                        x = local.pop(mb)
                    else:
                        x = self._wait(self._irecv(src, _tag(_EVAL, k, mb), _EVAL_META))
                    with recurrent_memory(mems.get(k)) as mems[k]:
                        y = self.module.forward_module(k, x)
                    if k == self.K:
                        losses.append(self.module.loss_fn(y, labels.pop(mb)))
                    elif dst == self.stage_id:
                        local[mb] = y
                    else:
                        self._isend(y, dst, _tag(_EVAL, k + 1, mb), _EVAL_META)
        finally:
            self.module.train(was_training)
        # Every evaluation message is received by the peer's same eval_batch call, so waiting for our
        # sends cannot deadlock; without it a stage that returns and exits (the final evaluation)
        # can close its connection while a send is still in flight ("Connection closed by peer").
        for req, _ in self._sends[n_sends:]:
            req.wait()
        del self._sends[n_sends:]
        if self.stage_id != 0:
            return None
        loss = torch.stack(losses).mean()
        if self.is_data_parallel:
            dist.all_reduce(loss, group=self.mpu.get_data_parallel_group())
            loss /= self.dp_world_size
        return loss

    def in_flight_bytes(self) -> int:
        """Bytes held across steps: stashed inputs, received error gradients, weight snapshots,
        recurrent memories, the weights kept for weight prediction."""
        n = sum(x.numel() * x.element_size() for x in self.stash.values())
        n += sum(m.numel() * m.element_size() for d in (*self.mems.values(), *self.stash_mems.values())
                 for m in d.values())
        for g in self.grads_in.values():
            t = g if torch.is_tensor(g) else g.buf
            n += 0 if t is None else t.numel() * t.element_size()
        n += self.last_update.nbytes() if self.last_update is not None else 0
        return n + sum(snap.nbytes() for snap in self.weight_stash.values())

    # ---------------------------------------------------------- checkpoints
    # Every dict of in-flight state kept across steps (keyed by (module, batch, mb)); a mode that
    # keeps more across steps (e.g. weight snapshots) adds its dict's attribute name here.
    RING_STATE = ("stash", "grads_in", "weight_stash", "mems", "stash_mems")
    META_FILE = "ouroboros_meta.json"  # written last, by rank 0: its presence marks a complete save

    def ring_meta(self) -> dict:
        """What a checkpoint must agree on to be resumed exactly (checked on load)."""
        return {"G": self.num_stages, "M": self.micro_batches,
                "micro_batch": self.train_micro_batch_size_per_gpu(), "dp": self.dp_world_size,
                "seed": self.seed, "replay": getattr(self, "replay", "features"),
                "weight_prediction": self.weight_prediction,
                "num_layers": len(self.module._layer_specs),
                "module_bounds": [list(b) for b in self.module.module_bounds]}

    def _settle(self):
        """At a step boundary, wait on every posted receive (their sends all happen within the step
        that posted them) and then on this rank's sends, so the in-flight state is plain tensors."""
        for name in self.RING_STATE:
            d = getattr(self, name)
            for key, value in d.items():
                if isinstance(value, _Recv):
                    d[key] = self._wait(value)
        for req, _ in self._prev_sends + self._sends:
            req.wait()
        self._prev_sends, self._sends = [], []

    def ring_state_dict(self) -> dict:
        """This rank's in-flight Ouroboros state: every ``RING_STATE`` dict, the RNG states."""
        if self.acts_in or self.outbox or self.labels:
            raise RuntimeError("ring_state_dict() must be called between train_batch() calls")
        self._settle()
        state = {name: dict(getattr(self, name)) for name in self.RING_STATE}
        # snapshots point at the live parameters: save their values only (rebound on load)
        state["weight_stash"] = {key: snap.state_dict() for key, snap in self.weight_stash.items()}
        if self.last_update is not None:
            state["last_update"] = self.last_update.state_dict()
        state["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        state["global_steps"] = self.global_steps
        return state

    def load_ring_state_dict(self, state: dict) -> None:
        self._settle()
        for name in self.RING_STATE:
            setattr(self, name, dict(state[name]))
        self.weight_stash = {key: W.Snapshot.from_state(self.module.module_funcs[key[0]], values)
                             for key, values in state["weight_stash"].items()}
        self.graphs = {}  # a cache: _stash_graph() reruns each kept forward from the restored state
        if self.last_update is not None:
            self.last_update.load_state_dict(state["last_update"])
        # Both ends of every edge restart, so both redo the shape handshake on its first message.
        self._edge_meta, self._queued = {}, {}
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _ring_file(self, ckpt_dir, tag):
        return os.path.join(ckpt_dir, str(tag), f"ouroboros_rank{self.global_rank:05d}.pt")

    def save_ring_checkpoint(self, save_dir, tag=None, client_state=None, meta=None) -> str:
        """DeepSpeed's ``save_checkpoint`` (layers, optimizer, LR schedule, step counters,
        ``client_state``) plus each rank's in-flight state, atomically: everything goes into the
        tag's folder first, and only when every rank is done does rank 0 switch ``latest`` to it
        (temp file + ``os.replace``). A crash before that leaves the previous checkpoint current.
        ``meta`` (e.g. the model config) is stored and checked on load with :meth:`ring_meta`."""
        tag = str(tag if tag is not None else f"global_step{self.global_steps}")
        state = self.ring_state_dict()
        self.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False)
        atomic_write(self._ring_file(save_dir, tag), lambda f: torch.save(state, f))
        dist.barrier()
        if self.global_rank == 0:
            record = {**self.ring_meta(), **(meta or {}), "world": dist.get_world_size(), "tag": tag}
            atomic_write(os.path.join(save_dir, tag, self.META_FILE),
                          lambda f: f.write(json.dumps(record, indent=1).encode()))
            atomic_write(os.path.join(save_dir, "latest"), lambda f: f.write(tag.encode()))
        dist.barrier()
        return tag

    def load_ring_checkpoint(self, load_dir, tag=None, meta=None) -> dict:
        """Resume from ``load_dir`` (its ``latest`` unless ``tag``): checks the saved run's G, M,
        micro-batch, replicas, seed, replay mode, partition and ``meta`` against this run (a
        ``ValueError`` naming each mismatch), loads DeepSpeed's part, then the in-flight state.
        Returns the ``client_state`` given at save time."""
        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.isfile(latest):
                raise FileNotFoundError(f"--load: {load_dir!r} has no 'latest' file: not a checkpoint folder, "
                                        "or no save finished there; give the folder passed to --save")
            with open(latest) as f:
                tag = f.read().strip()
        meta_path = os.path.join(load_dir, str(tag), self.META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"--load: checkpoint {os.path.join(load_dir, str(tag))!r} is incomplete "
                                    f"(no {self.META_FILE}: its save did not finish); load another tag")
        with open(meta_path) as f:
            saved = json.load(f)
        mine = {**self.ring_meta(), **(meta or {}), "world": dist.get_world_size()}
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if diffs:
            raise ValueError(f"--load: checkpoint {os.path.join(load_dir, str(tag))!r} does not match this run "
                             f"({'; '.join(diffs)}); resume with the saved settings or start without --load")
        path, client_state = self.load_checkpoint(load_dir, tag=tag)
        if path is None:
            raise FileNotFoundError(f"--load: DeepSpeed found no checkpoint files in {os.path.join(load_dir, str(tag))!r}")
        self.load_ring_state_dict(torch.load(self._ring_file(load_dir, tag), map_location=self.device,
                                             weights_only=False))
        return client_state or {}
