"""DeepSpeed's view of the Ouroboros schedule: one ``PipeInstruction`` per action.

The schedule itself is data (:func:`ouroboros_ds.core.schedule.ouroboros_schedule`, no torch);
:class:`OuroborosSchedule` only indexes into it, so each instruction below is one action of one
stage, atomic, with ``k`` (the ring module, 1..K) and ``mb`` (the micro-batch j) as its fields.
The engine runs each through its ``_INSTRUCTION_MAP`` (``OuroborosEngine._exec_ring_*``).
Notation: batch t is this step's, ``delay(k) = K - k``, ``b = t - delay(k)`` the batch module k
learns from at step t. See docs/ring.md for the algorithm and docs/schedule.md for the grids.
"""
from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.schedule import PipeInstruction, PipeSchedule

from ..core import schedule as S


class RingInstruction(PipeInstruction):
    """One action of the Ouroboros schedule, for module ``k`` and micro-batch ``mb``."""


class RingLoad(RingInstruction):
    """``1LOADj`` (stage 0). Roughly::

        input_ids, labels = next(data_iter)
        acts_in[1, j] = input_ids; labels[j] = labels      # module K reads them in KLj
    """


class RingRecvActivation(RingInstruction):
    """``kRECV_Fj``: post (do not wait for) the receive of module k's input of batch t. Roughly::

        acts_in[k, j] = irecv(from stage of module k-1)

    Pairs with ``(k-1)SEND_Fj`` on the previous stage, in the same step."""


class RingForward(RingInstruction):
    """``kFj`` (k < K): forward without a graph, stash the input for the delayed replay. Roughly::

        x = wait(acts_in.pop((k, j)))
        stash[k, t, j] = x
        with dropout_key(seed, t, j), no_grad():
            y = module_k(x)
        outbox[SEND_F, k, j] = y                   # or acts_in[k+1, j] = y when k+1 is local

    In stash replay mode the forward keeps its graph, run through a weight snapshot instead."""


class RingSendActivation(RingInstruction):
    """``kSEND_Fj``: send module k's output downstream. Roughly::

        isend(outbox.pop((SEND_F, k, j)), to stage of module k+1)

    Pairs with ``(k+1)RECV_Fj``."""


class RingRecvGrad(RingInstruction):
    """``kRECV_Bj``: post the receive of dL/d(output of k) for the batch module k replays *next*
    step, ``t + 1 - delay(k)``; in a synchronous step for batch t, replayed in this step. Roughly::

        b = t if synchronous else t + 1 - delay(k)
        if synchronous or b >= sync_steps:           # earlier batches were replayed synchronously
            grads_in[k, b, j] = irecv(from stage of module k+1)

    Pairs with ``(k+1)SEND_Bj`` (or ``KSEND_Bj`` from the loss) in the same step."""


class RingReplay(RingInstruction):
    """``kBj`` (k < K): features replay of batch b = t - delay(k) (b = t in a synchronous step). Roughly::

        if b < sync_steps and not synchronous:     # warm-up: no delayed gradient yet, or
            return                                 # batch b was replayed in its own (synchronous) step
        g = wait(grads_in.pop((k, b, j)))
        x = stash.pop((k, b, j)).requires_grad_()
        with dropout_key(seed, b, j):              # the forward's masks
            y = module_k(x)                        # the current weights
        y.backward(g)
        outbox[SEND_B, k, j] = x.grad              # k > 1

    Stash replay mode backprops the kept graph instead of recomputing it."""


class RingSendGrad(RingInstruction):
    """``kSEND_Bj`` (k > 1): send dL/d(input of k) upstream. Roughly::

        isend(outbox.pop((SEND_B, k, j)), to stage of module k-1)

    Pairs with ``(k-1)RECV_Bj``; nothing is sent while module k was in warm-up."""


class RingLoss(RingInstruction):
    """``KLj``: module K's forward, loss and backward of batch t at once (no delay). Roughly::

        x = wait(acts_in.pop((K, j))).requires_grad_()
        with dropout_key(seed, t, j):
            loss = loss_fn(module_K(x), labels.pop(j))
        (loss / M).backward()
        outbox[SEND_B, K, j] = x.grad              # module K-1 replays batch t next step
    """


_INSTRUCTION_OF = {
    S.LOAD: RingLoad, S.F: RingForward, S.B: RingReplay, S.L: RingLoss,
    S.SEND_F: RingSendActivation, S.RECV_F: RingRecvActivation,
    S.SEND_B: RingSendGrad, S.RECV_B: RingRecvGrad,
}


def instructions_of(action: S.Action) -> list[PipeInstruction]:
    """The DeepSpeed instructions of one action. ``STEP`` is DeepSpeed's own pair: the
    data-parallel ``ReduceGrads`` then ``OptimizerStep``."""
    if action.kind == S.STEP:
        return [ds_schedule.ReduceGrads(), ds_schedule.OptimizerStep()]
    return [_INSTRUCTION_OF[action.kind](k=action.k, mb=action.mb)]


class OuroborosSchedule(PipeSchedule):
    """DeepSpeed's view of one stage's Ouroboros step: one atomic instruction list per action.
    ``synchronous``: a step of the synchronous warm-up (every delay 0, ``sync_steps``)."""

    def __init__(self, micro_batches, stages, stage_id, synchronous=False):
        super().__init__(micro_batches, stages, stage_id)
        self.synchronous = synchronous
        self.actions = S.ouroboros_schedule(stages, micro_batches, synchronous=synchronous)[stage_id]

    def steps(self):
        for action in self.actions:
            yield instructions_of(action)

    def num_pipe_buffers(self):
        return 0  # the engine keeps its in-flight state in dicts, not in DeepSpeed's pipe buffers
