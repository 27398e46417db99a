"""The ring's evaluation: forward-only passes around the ring, in line with the training messages."""
from __future__ import annotations

import torch
from deepspeed import comm as dist

from ..core import schedule as S
from ..models.context import recurrent_memory
from . import p2p as P


class RingEvaluation:
    """Mixin of :class:`ouroboros_ds.pipe.engine.OuroborosEngine`: ``eval_batch``. Uses the engine's
    ``p2p`` channel, ``local_modules``, ``K``, the module and the data-parallel group."""

    @torch.no_grad()
    def eval_batch(self, data_iter=None, num_micro_batches: int = 1):
        """Forward ``num_micro_batches`` micro-batches around the ring with dropout off.

        Every rank calls it with the same ``num_micro_batches``; stage 0 reads them from
        ``data_iter`` and returns the mean loss (other stages return ``None``). Its messages go in
        line after the last step's, on the same order-matched channel; each module posts all of
        its receives first, then forwards and sends micro-batch by micro-batch, so under NCCL's
        rules no send waits behind a receive of the same pair (docs/ring.md#transport); no barrier.
        Recurrent modules carry an evaluation memory from micro-batch to micro-batch (each module
        runs them in order), starting empty and apart from the training memories, so ``data_iter``
        should give consecutive segments (``data.eval_batches(ordered=True)``).
        """
        was_training = self.module.training
        n_sends = len(self.p2p.sends)
        self.module.eval()
        G, losses, local, labels, mems = self.num_stages, [], {}, {}, {}
        e, self._evals = self._evals, self._evals + 1
        try:
            for k in self.local_modules:  # stage 0: all of module 1 first, then all of module K
                src, dst = S.stage_of(max(k - 1, 1), G), S.stage_of(min(k + 1, self.K), G)
                remote_in = k > 1 and src != self.stage_id
                if remote_in:
                    inbox = [self.p2p.irecv(src, P.Msg(P.EVAL, k, e, mb)) for mb in range(num_micro_batches)]
                for mb in range(num_micro_batches):
                    if k == 1:
                        x, labels[mb] = (t.to(self.device) for t in next(data_iter))
                    elif remote_in:
                        x = self.p2p.wait(inbox[mb])
                    else:
                        x = local.pop(mb)
                    with recurrent_memory(mems.get(k)) as mems[k]:
                        y = self.module.forward_module(k, x)
                    if k == self.K:
                        losses.append(self.module.loss_fn(y, labels.pop(mb)))
                    elif dst == self.stage_id:
                        local[mb] = y
                    else:
                        self.p2p.isend(y, dst, P.Msg(P.EVAL, k + 1, e, mb))
        finally:
            self.module.train(was_training)
        # Every evaluation message is received by the peer's same eval_batch call, so waiting for our
        # sends cannot deadlock; without it a stage that returns and exits (the final evaluation)
        # can close its connection while a send is still in flight ("Connection closed by peer").
        self.p2p.wait_sends(since=n_sends)
        if self.stage_id != 0:
            return None
        loss = torch.stack(losses).mean()
        if self.is_data_parallel:
            dist.all_reduce(loss, group=self.mpu.get_data_parallel_group())
            loss /= self.dp_world_size
        return loss
