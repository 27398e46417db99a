"""DeepSpeed's optimizer hooks as the ring needs them: per-stage clip, no cross-stage collective,
and a module in warm-up kept still (the rules themselves: :mod:`ouroboros_ds.ring.optim`)."""
from __future__ import annotations

import torch
from deepspeed.runtime.pipe.engine import PipelineEngine

from ..ring import optim as O
from ..ring.staleness import delay_scaled_lr


class StageOptimizer:
    """Mixin of :class:`ouroboros_ds.pipe.engine.OuroborosEngine`, placed before ``PipelineEngine``:
    the overrides of DeepSpeed's optimizer construction, clip and gradient reduction. Uses the
    engine's ``_stages``, ``stage_clip``, ``stale_lr_scale``, ``sync_steps`` and ``batch_id``."""

    # Overridden, to keep DeepSpeed's optimizer wrappers (ZeRO-1, bf16) as they are and change only
    # what they are given (ouroboros_ds/ring/optim.py): one param group per first-gradient step, a step
    # pre-hook that keeps a group in warm-up still, the delay-scaled lr's hooks (ring/staleness.py),
    # and a grid whose model-parallel group is this stage (per-stage clip, no cross-stage collective).
    def _configure_optimizer(self, client_optimizer, model_parameters):
        model_parameters = O.ring_optimizer_groups(self.module, model_parameters)
        mpu, self.mpu = self.mpu, O.StageGrid(self.mpu)
        try:
            super()._configure_optimizer(client_optimizer, model_parameters)
        finally:
            self.mpu = mpu
        self.basic_optimizer.register_step_pre_hook(O.warmup_hook(lambda: self.batch_id, self.sync_steps))
        # the delay-scaled lr (off at 0) as step hooks, so DeepSpeed's LR schedule keeps owning the lrs
        delay_scaled_lr(self.basic_optimizer, self.stale_lr_scale)

    # Overridden: every clip (the fp32 path below, ZeRO's and BF16_Optimizer's, which read it when
    # they are built) takes its threshold from here, and the ring's is per stage (stage_clip).
    def gradient_clipping(self):
        return O.stage_clip_threshold(super().gradient_clipping(), self._stages, self.stage_clip)

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
