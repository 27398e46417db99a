"""The baselines: DeepSpeed's stock ``PipelineEngine`` (synchronous 1F1B) and ``DualPipeVEngine``
on the same model.

The only change is the dropout key: each forward (and each backward, whose activation-
checkpointing recompute redraws dropout) runs under ``(seed, step, micro-batch)``, the key the
Ouroboros engine uses for the same batch. Both engines then see the same masks for the same
data, so with one seed their first losses are equal and any difference later is the algorithm's.
1F1B runs the forwards and the backwards of a step in micro-batch order on every stage, so
counting them gives the micro-batch index.

Recurrent models (Transformer-XL) get their memory the same way: micro-batch j's forward reads
the memory its stage's layers wrote for micro-batch j one step earlier, and the backward (whose
activation-checkpointing recompute reruns the forward) sees the memory the forward read.
Evaluation carries its own memory from micro-batch to micro-batch (DeepSpeed's inference
schedule runs them in order on every stage), as the Ouroboros engine's ``eval_batch`` does.
"""
from __future__ import annotations

from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine, DualPipeVModule
from deepspeed.runtime.pipe.engine import PipelineEngine

from ..models.context import dropout_key, recurrent_memory
from .module import TiedSyncWithoutGraph


class BaselinePipelineModule(TiedSyncWithoutGraph, PipelineModule):
    """DeepSpeed's stock ``PipelineModule``; only its tied-weight synchronization leaves no
    autograd history (see :class:`~ouroboros_ds.pipe.module.TiedSyncWithoutGraph`)."""


class BaselineDualPipeVModule(TiedSyncWithoutGraph, DualPipeVModule):
    """DeepSpeed's ``DualPipeVModule`` (the tied embedding and head both on rank 0); only its
    tied-weight synchronization leaves no autograd history, as for the 1F1B baseline."""


class KeyedPipelineEngine(PipelineEngine):
    """Stock 1F1B with keyed dropout."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        self.seed = seed
        self._counted_step, self._n_fwd, self._n_bwd = -1, 0, 0
        self.mems: dict = {}       # mb -> {layer: memory} written by the last forward
        self._fwd_mems: dict = {}  # mb -> memory this step's forward read (for the recompute)
        self._eval_mem = None      # memory the last evaluation forward wrote, within one eval_batch
        super().__init__(*args, **kwargs)

    # Override: a fresh evaluation memory per call (the training memories are not touched).
    def eval_batch(self, *args, **kwargs):
        self._eval_mem = None
        try:
            return super().eval_batch(*args, **kwargs)
        finally:
            self._eval_mem = None

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
        with recurrent_memory(self._eval_mem) as new_mem:
            out = super()._exec_forward_pass(buffer_id)
        self._eval_mem = new_mem or None
        return out

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


def check_dualpipev(micro_batches: int, stages: int, eval_batches: int | None = None) -> None:
    """DualPipeV's own condition, as a user-facing error instead of DeepSpeed's assert. An
    evaluation is one DualPipeV schedule too, so the validation batches must number 2G as well."""
    if micro_batches < 2 * stages:
        raise ValueError(f"gradient_accumulation_steps={micro_batches}: DualPipeV needs at least 2 x "
                         f"pipeline-parallel size = {2 * stages} micro-batches per step; raise "
                         f"gradient_accumulation_steps to {2 * stages} or more, or use --schedule ouroboros "
                         "(any M >= 1) or 1f1b")
    if eval_batches is not None and eval_batches < 2 * stages:
        raise ValueError(f"--eval-batches: the validation split gives {eval_batches} micro-batches and DualPipeV "
                         f"evaluates at least 2 x pipeline-parallel size = {2 * stages} at once; raise "
                         f"--eval-batches to {2 * stages} (with enough validation text), or use --schedule "
                         "ouroboros or 1f1b")


class KeyedDualPipeVEngine(DualPipeVEngine):
    """DeepSpeed's ``DualPipeVEngine`` with keyed dropout: buffer ``phase * M + j`` holds
    micro-batch j in both phases, so each forward runs under ``(seed, step, j)``, the key the
    other engines use for the same data (the backward does not redraw dropout: no recompute)."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        self.seed = seed
        super().__init__(*args, **kwargs)

    def _exec_forward_pass(self, buffer_id, phase):
        if not self.module.training:
            return DualPipeVEngine._exec_forward_pass(self, buffer_id, phase)
        with dropout_key(self.seed, self.global_steps, buffer_id % self.micro_batches):
            return DualPipeVEngine._exec_forward_pass(self, buffer_id, phase)

    def eval_batch(self, data_iter, *args, num_micro_batches=None, **kwargs):
        """Why this override: DeepSpeed's DualPipeVEngine finds the phase-1 slot of a micro-batch
        with the training M (``_phase1_buffer``: ``buffer_id + self.micro_batches``), while an
        evaluation over another number of micro-batches numbers its slots with that number, so the
        turn-around rank reads an empty slot. The evaluation runs with M set to its own count."""
        train_m = self.micro_batches
        if num_micro_batches is not None:
            self.micro_batches = num_micro_batches
        try:
            return super().eval_batch(data_iter, *args, num_micro_batches=num_micro_batches, **kwargs)
        finally:
            self.micro_batches = train_m

    # The stock map binds the base class's function; point this entry at ours.
    _INSTRUCTION_MAP = {**DualPipeVEngine._INSTRUCTION_MAP, ds_schedule.ForwardPass: _exec_forward_pass}
