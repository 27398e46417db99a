"""A counter of activation memory: the bytes autograd saves for backward while graphs hold them,
plus held tensors (stashed inputs, weight snapshots). The benchmark, train.py's memory statistics
and the memory-bounded replay plan (:mod:`ouroboros_ds.ring.memory`) all measure with it."""
from __future__ import annotations

import weakref

import torch


class SavedBytes:
    """Bytes of the activations autograd saves for backward (``saved_tensors_hooks``), counted
    once per storage while any graph still holds them, plus the held tensors given to
    :meth:`track`; ``exclude`` storages (parameters) are not counted. ``peak`` is the maximum
    over the counter's lifetime (or since :meth:`reset_peak`)."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._refs: dict = {}
        self.exclude: set = set()

    def reset_peak(self):
        self.peak = self.live

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage while the tensor object lives (held state outside any graph:
        stashed inputs, weight snapshots), once with whatever graphs save of it."""
        self._add(t.untyped_storage(), t)

    def _pack(self, t):
        if not isinstance(t, torch.Tensor) or t.is_nested:
            return t
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.exclude or key == 0:
            return t
        holder = _Holder(t)
        self._add(st, holder)
        return holder

    def _add(self, st, owner):
        key = st.data_ptr()
        if key in self.exclude or key == 0:
            return
        n = self._refs.get(key, (0, st.nbytes()))[0]
        if n == 0:
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] = (n + 1, st.nbytes())
        weakref.finalize(owner, self._release, key)

    def _release(self, key):
        n, nb = self._refs[key]
        if n == 1:
            del self._refs[key]
            self.live -= nb
        else:
            self._refs[key] = (n - 1, nb)

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Holder) else h

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t
