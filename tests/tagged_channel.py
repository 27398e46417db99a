"""The tagged channel the ring used to have, kept as a fixture that NCCL's rules break.

A copy of the ring's former ``ouroboros_ds/pipe/p2p.py`` (its own docstring follows). It matches every
message by its tag, which gloo honours and NCCL ignores: on GPUs its receives take whatever the
peer sent next on the pair, so the ring's message pattern gets the wrong messages (a shape
handshake's 8 integers where an activation was expected) or waits forever.
``tests/multirank/test_nccl_emulation.py`` runs that pattern on 2 ranks: it completes on plain
gloo and fails under ``tests/nccl_emulation.py``, which shows that the emulation catches what GPUs
would. Two changes from the original: ``RingChannel(..., group=None)`` takes the process group
to use, so that a test can run it on a group of its own; and it keeps its sends alive with the
current channel's bookkeeping (``end_step``, ``wait_sends``, ``settle``, ``nbytes``, inherited
from ``ouroboros_ds.pipe.p2p.RingChannel``, the same code the original had), so only what it did
differently (tags, the handshake, receives queued behind it) is kept here.

The original docstring:

The ring's point-to-point channel: tagged, non-blocking, posted early and waited on at first use.

Why not DeepSpeed's ``p2p.py``: it sends with blocking ``send``/``recv`` on one tag, so both sides
must post messages in the same order. Work on the ring spans steps (a stage posts the receive of
a gradient it only uses next step) and stage 0 talks to both ends of the ring, so here every
message has its own tag (kind, module k, micro-batch j) and matches its own receive whatever
else is in flight, as in DeepSpeed's ``DualPipeVEngine`` (``_queue_p2p``).

Handshake: the first message on an edge (peer stage, kind) is preceded by a small metadata
message with its shape and dtype; until that arrives, receives on the edge wait in line, and the
first wait reads the metadata and posts them in order. Later messages on the edge reuse the shape.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
from deepspeed.runtime.pipe.engine import PipelineEngine

from ouroboros_ds.pipe import p2p

# Message kinds; each is also the edge key of the shape handshake for its direction.
ACT, GRAD, EVAL = 1, 2, 4


def tag(kind: int, k: int, mb: int) -> int:
    """The message tag of (kind, ring module k, micro-batch mb): unique while in flight."""
    return (kind * 128 + k) * 4096 + mb


# Each channel (each engine) of a process gets its own tag space, so engines built side by side
# (in the same order on every rank, as a benchmark does) never take each other's messages: a
# receive queued behind an edge's handshake is posted late, after another engine's sends may have
# arrived with the same tag.
_TAG_SPACE = 1 << 22  # above every tag()
_channels = 0


class PendingRecv:
    """A posted receive, or one queued while its edge's shape is still unknown."""

    def __init__(self, stage, tag, kind):
        self.stage, self.tag, self.kind = stage, tag, kind
        self.buf = self.req = None


class RingChannel(p2p.RingChannel):
    """Non-blocking tagged sends and receives between this rank and its ring neighbours.

    ``peer(stage)`` maps a pipeline stage to the global rank of the same data-parallel replica.
    Sends stay referenced until they complete (``end_step`` keeps the current step's alive until
    the next step, when their receives have long been posted).
    """

    def __init__(self, device, peer, group=None):
        global _channels
        super().__init__(device, peer)
        self.group = group
        self.offset = _channels * _TAG_SPACE
        _channels += 1
        self.queued: dict = {}      # (peer stage, kind) -> receives waiting for the edge's shape
        self.edge_meta: dict = {}   # ("in"|"out", peer stage, kind) -> (shape, dtype) on that edge

    def isend(self, tensor, stage: int, msg_tag: int, kind: int) -> None:
        key = ("out", stage, kind)
        if key not in self.edge_meta:  # first message on this edge: tell the peer shape and dtype
            self.edge_meta[key] = (tuple(tensor.shape), tensor.dtype)
            meta = torch.zeros(8, dtype=torch.long)
            meta[:2 + tensor.dim()] = torch.tensor([PipelineEngine.DTYPE_TO_ID[tensor.dtype], tensor.dim(),
                                                    *tensor.shape])
            meta = meta.to(self.device)
            # Non-blocking like the data: a blocking send would wait for the peer to reach the
            # receive, which it may only do after work that waits on this stage (a deadlock).
            self.sends.append((tdist.isend(meta, self.peer(stage), group=self.group,
                                           tag=self.offset + tag(kind, 0, 0)), meta))
        tensor = tensor.contiguous()
        self.sends.append((tdist.isend(tensor, self.peer(stage), group=self.group, tag=self.offset + msg_tag), tensor))

    def irecv(self, stage: int, msg_tag: int, kind: int) -> PendingRecv:
        """Post a receive. While the edge's shape is unknown the receive waits in line; posting
        order decides which message a receive gets, so every later receive on the edge first
        posts the waiting ones in order."""
        r = PendingRecv(stage, msg_tag, kind)
        self.queued.setdefault((stage, kind), []).append(r)
        if ("in", stage, kind) in self.edge_meta:
            self._post_queued(stage, kind)
        return r

    def _post_queued(self, stage, kind):
        shape, dtype = self.edge_meta[("in", stage, kind)]
        for r in self.queued.pop((stage, kind), []):
            r.buf = torch.empty(shape, dtype=dtype, device=self.device)
            r.req = tdist.irecv(r.buf, self.peer(stage), group=self.group, tag=self.offset + r.tag)

    def wait(self, entry):
        """The tensor of a posted receive, or a local tensor as is."""
        if torch.is_tensor(entry):
            return entry
        if entry.req is None:  # the edge's first message: read its metadata, then post in order
            meta = torch.zeros(8, dtype=torch.long, device=self.device)
            tdist.recv(meta, self.peer(entry.stage), group=self.group, tag=self.offset + tag(entry.kind, 0, 0))
            ndim = int(meta[1])
            self.edge_meta[("in", entry.stage, entry.kind)] = (tuple(int(d) for d in meta[2:2 + ndim]),
                                                               PipelineEngine.ID_TO_DTYPE[int(meta[0])])
            self._post_queued(entry.stage, entry.kind)
        entry.req.wait()
        return entry.buf

    def reset_edges(self) -> None:
        """Forget the edges' shapes: after a restore both ends redo the handshake."""
        self.edge_meta, self.queued = {}, {}
