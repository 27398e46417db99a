"""The baseline: DeepSpeed's stock ``PipelineEngine`` (synchronous 1F1B) on the same model.

The only change is the dropout key: each forward (and each backward, whose activation-
checkpointing recompute redraws dropout) runs under ``(seed, step, micro-batch)``, the key the
Ouroboros engine uses for the same batch. Both engines then see the same masks for the same
data, so with one seed their first losses are equal and any difference later is the algorithm's.
1F1B runs the forwards and the backwards of a step in micro-batch order on every stage, so
counting them gives the micro-batch index.

Recurrent models (Transformer-XL) get their memory the same way: micro-batch j's forward reads
the memory its stage's layers wrote for micro-batch j one step earlier, and the backward (whose
activation-checkpointing recompute reruns the forward) sees the memory the forward read.
"""
from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from .models import dropout_key
from .models_xl import recurrent_memory


class KeyedPipelineEngine(PipelineEngine):
    """Stock 1F1B with keyed dropout."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        self.seed = seed
        self._counted_step, self._n_fwd, self._n_bwd = -1, 0, 0
        self.mems: dict = {}       # mb -> {layer: memory} written by the last forward
        self._fwd_mems: dict = {}  # mb -> memory this step's forward read (for the recompute)
        super().__init__(*args, **kwargs)

    def _count(self, backward: bool) -> int:
        if self._counted_step != self.global_steps:
            self._counted_step, self._n_fwd, self._n_bwd = self.global_steps, 0, 0
        if backward:
            self._n_bwd += 1
            return self._n_bwd - 1
        self._n_fwd += 1
        return self._n_fwd - 1

    def _exec_forward_pass(self, buffer_id):
        if self.module.training:
            mb = self._count(False)
            self._fwd_mems[mb] = mem = self.mems.get(mb)
            with dropout_key(self.seed, self.global_steps, mb), recurrent_memory(mem) as new_mem:
                out = super()._exec_forward_pass(buffer_id)
            if new_mem:
                self.mems[mb] = new_mem
            return out
        return super()._exec_forward_pass(buffer_id)

    def _exec_backward_pass(self, buffer_id):
        mb = self._count(True)
        with dropout_key(self.seed, self.global_steps, mb), recurrent_memory(self._fwd_mems.pop(mb, None)):
            return super()._exec_backward_pass(buffer_id)

    # The stock map binds the base class's functions; point these two entries at ours.
    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.ForwardPass: _exec_forward_pass,
        ds_schedule.BackwardPass: _exec_backward_pass,
    }
