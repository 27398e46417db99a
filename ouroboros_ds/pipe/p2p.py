"""The ring's point-to-point channel: untagged, matched by posting order, safe under NCCL's rules.

On GPUs the messages go through NCCL, which ignores tags (two ranks' messages match in the
order they are posted), runs each pair of ranks' sends and receives on one stream in issue order,
and may hold a send until its receive is reached (docs/ring.md#transport). So this channel uses no
tags at all, and correctness rests on the order in which each rank issues its ops, which is the
schedule's: :mod:`ouroboros_ds.core.nccl` derives every rank's op stream from the schedule and proves
that every receive gets its own message and that nothing deadlocks; the engine issues exactly
those streams (``trace`` records them, for the test that compares the two).

Shapes. An error gradient dL/d(output of k) has the shape and dtype of module k's output, which
this stage computed itself: its receive is posted with that shape (``like``). An activation edge
(module k-1 -> module k) learns its shape once: the sender's first message on the edge is a small
shape message, in line before the data, and the receiver reads it (a blocking receive) when it
posts the edge's first receive. The schedule posts an edge's receives just before their first use,
so that read never waits longer than the compute after it would. ``reset_edges`` (after a restore,
on every rank) starts the handshake over; an evaluation sends its own shape message each time.

Sends are non-blocking; each is kept referenced until it completed (``end_step`` waits for the
previous step's, whose receives were all posted in that step).
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
from deepspeed.runtime.pipe.engine import PipelineEngine

from ..core.nccl import ACT, ACT_META, EVAL, EVAL_META, GRAD, Msg

__all__ = ["RingChannel", "PendingRecv", "ACT", "GRAD", "EVAL", "Msg"]

_META_LEN = 8  # dtype id, ndim, up to 6 dimensions


class PendingRecv:
    """A posted receive: its buffer and request."""

    def __init__(self, buf, req, msg):
        self.buf, self.req, self.msg = buf, req, msg


class RingChannel:
    """Non-blocking, untagged sends and receives between this rank and its ring neighbours.

    ``peer(stage)`` maps a pipeline stage to the global rank of the same data-parallel replica.
    ``trace``: a list to record every op as (peer stage, "send"/"recv", :class:`~ouroboros_ds.core.nccl.Msg`),
    or None.
    """

    def __init__(self, device, peer):
        self.device, self.peer = device, peer
        self.sends: list = []       # (request, tensor) of the current step
        self.prev_sends: list = []  # ... and of the previous step
        self.edges: dict = {}       # ("in"|"out", peer stage, module k, ACT|EVAL) -> (shape, dtype)
        self.trace: list | None = None

    def _record(self, stage, op, msg):
        if self.trace is not None:
            self.trace.append((stage, op, msg))

    def _shape_message(self, key, msg: Msg) -> Msg | None:
        """The shape message that goes before ``msg`` on edge ``key``: before an activation edge's
        first message, and before each evaluation's first message on its edge; else None."""
        if msg.kind == ACT and key not in self.edges:
            return Msg(ACT_META, msg.k)
        if msg.kind == EVAL and msg.mb == 0:
            return Msg(EVAL_META, msg.k, msg.batch)
        return None

    def isend(self, tensor, stage: int, msg: Msg) -> None:
        """Send ``tensor`` to ``stage``, after its edge's shape message where one is due."""
        key = ("out", stage, msg.k, msg.kind)
        meta_msg = self._shape_message(key, msg)
        if meta_msg is not None:
            self.edges[key] = (tuple(tensor.shape), tensor.dtype)
            meta = torch.zeros(_META_LEN, dtype=torch.long)
            meta[:2 + tensor.dim()] = torch.tensor([PipelineEngine.DTYPE_TO_ID[tensor.dtype], tensor.dim(),
                                                    *tensor.shape])
            meta = meta.to(self.device)
            self._record(stage, "send", meta_msg)
            self.sends.append((tdist.isend(meta, self.peer(stage)), meta))
        tensor = tensor.contiguous()
        self._record(stage, "send", msg)
        self.sends.append((tdist.isend(tensor, self.peer(stage)), tensor))

    def irecv(self, stage: int, msg: Msg, like=None) -> PendingRecv:
        """Post the receive of ``msg`` from ``stage``: shaped ``like`` (a tensor or (shape, dtype)),
        or by its edge's shape, read first where a shape message is due."""
        if like is None:
            key = ("in", stage, msg.k, msg.kind)
            meta_msg = self._shape_message(key, msg)
            if meta_msg is not None:
                meta = torch.zeros(_META_LEN, dtype=torch.long, device=self.device)
                self._record(stage, "recv", meta_msg)
                tdist.irecv(meta, self.peer(stage)).wait()
                meta = meta.tolist()
                self.edges[key] = (tuple(meta[2:2 + meta[1]]), PipelineEngine.ID_TO_DTYPE[meta[0]])
            like = self.edges[key]
        shape, dtype = (like.shape, like.dtype) if torch.is_tensor(like) else like
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self._record(stage, "recv", msg)
        return PendingRecv(buf, tdist.irecv(buf, self.peer(stage)), msg)

    def wait(self, entry):
        """The tensor of a posted receive, or a local tensor as is."""
        if torch.is_tensor(entry):
            return entry
        entry.req.wait()
        return entry.buf

    def end_step(self) -> None:
        """Sends of the previous step have long been received; keep this step's alive until next."""
        for req, _ in self.prev_sends:
            req.wait()
        self.prev_sends, self.sends = self.sends, []

    def wait_sends(self, since: int = 0) -> None:
        """Wait for this step's sends from index ``since`` on, and forget them."""
        for req, _ in self.sends[since:]:
            req.wait()
        del self.sends[since:]

    def settle(self) -> None:
        """Wait for every send of this and the previous step."""
        for req, _ in self.prev_sends + self.sends:
            req.wait()
        self.prev_sends, self.sends = [], []

    def reset_edges(self) -> None:
        """Forget the activation edges' shapes: after a restore both ends redo the handshake."""
        self.edges = {}

    @staticmethod
    def nbytes(entry) -> int:
        t = entry if torch.is_tensor(entry) else entry.buf
        return 0 if t is None else t.numel() * t.element_size()
