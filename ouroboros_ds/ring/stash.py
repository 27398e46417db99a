"""Weight stashing: the replay mode without recomputation (``replay="stash"``).

Features replay (the default, ``replay="recompute"``) forwards batch t without a graph and, when
module k's delayed gradient is due, recomputes the forward from the stashed input with the
*current* weights. Stash mode trades memory for that extra forward, PipeDream-style: the forward
keeps its graph, and the delayed backward is taken at the weights *of the forward*. Because the
optimizer updates the live parameters in place, the graph cannot reference them ("modified by an
inplace operation"); so the forward runs through a detached copy of the module's parameters, one
copy per (module, batch), shared by the batch's micro-batches. The replay then only backprops the
kept output and adds the copy's gradients into the live ``.grad``.

Both the engine and :class:`ouroboros_ds.ring.reference.Reference` call these functions, so the two run
the same operations in the same order (the equivalence test is bitwise).

State (all plain tensors, so a checkpoint can hold it): the stashed input (``stash``), the weight
snapshot (``{(module, batch): Snapshot}``), and a cache of kept graphs (``{(module, batch, mb):
(input, output)}``) that :func:`forward` rebuilds from input + snapshot + dropout key.
"""
from __future__ import annotations

import weakref

import torch
from torch.func import functional_call

from .utils import unique_parameters

REPLAY_MODES = ("recompute", "stash")


def check_replay(replay: str) -> str:
    if replay not in REPLAY_MODES:
        raise ValueError(f"replay={replay!r}: expected one of {REPLAY_MODES} ('recompute': features replay, "
                         "recompute the forward at the current weights; 'stash': keep the forward's graph and weights)")
    return replay


def _layer_module(layer) -> torch.nn.Module:
    if isinstance(layer, torch.nn.Module):
        return layer
    raise TypeError(f"stash mode cannot take a weight snapshot of layer {layer!r}")


class Snapshot:
    """Detached copies of a module's parameters, per layer, with ``requires_grad`` so the kept
    graph records gradients for them. ``live`` are the parameters the copies were taken from."""

    def __init__(self, layers):
        self.copies: list[dict] = []
        self.live: list = []  # (copy tensor, live parameter), each live parameter once
        seen = {}
        for layer in layers:
            d = {}
            for name, p in _layer_module(layer).named_parameters():
                if id(p) not in seen:  # a parameter used twice in one module gets one copy
                    seen[id(p)] = p.detach().clone().requires_grad_(p.requires_grad)
                    self.live.append((seen[id(p)], p))
                d[name] = seen[id(p)]
            self.copies.append(d)

    def state_dict(self) -> list[dict]:
        """The copies, per layer ``{name: tensor}``: what a checkpoint stores (no live references)."""
        return [{n: c.detach() for n, c in d.items()} for d in self.copies]

    @classmethod
    def from_state(cls, layers, state: list[dict]) -> "Snapshot":
        """Rebuild a snapshot of ``layers`` (the module's live layers) from :meth:`state_dict`."""
        snap = cls(layers)
        for d, saved in zip(snap.copies, state):
            for name, c in d.items():
                with torch.no_grad():
                    c.copy_(saved[name])
        return snap

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c, _ in self.live)


def check_prediction(weight_prediction: float) -> float:
    weight_prediction = float(weight_prediction)
    if weight_prediction < 0:
        raise ValueError(f"weight_prediction: must be >= 0 (0 turns it off, 1 predicts the weights a delayed "
                         f"gradient is applied to), got {weight_prediction}")
    return weight_prediction


class LastUpdate:
    """Weight prediction for the stale modules (``weight_prediction``; beyond the paper).

    Module k applies batch t's gradient ``d = delay(k)`` steps after batch t's forward, at weights
    that have moved by about ``d`` more updates. Batch t's forward can run at weights *predicted*
    ``h = weight_prediction x d`` updates ahead along the last update (SpecTrain, Chen et al. 2018;
    PipeOptim's "optimizer-aware" prediction: the last update is Adam's own step, with the lr
    schedule, the clip and the weight decay already in it):

        w_pred = w(t) + h (w(t) - w(t - 1))          (Adam's step direction changes slowly: its
                                                      first moment is an average of ~10 steps)

    Batch t's delayed gradient is then taken at those weights, in both replay modes: the forward
    runs there, and so does its backward:

    - ``replay="stash"``: the forward keeps its graph through the predicted snapshot.
    - ``replay="recompute"`` (features replay): the forward runs through the predicted snapshot
      without a graph, and the replay recomputes it from the stashed input through the *same*
      snapshot (kept until then: weights, not activations), with the same dropout masks. The same
      update as stash mode, bit for bit, at features replay's activation memory. (Replaying at the
      then current weights instead, as the paper's update does, measured far worse: the error
      gradient module k + 1 sends back belongs to the predicted forward, and a replay elsewhere
      no longer matches it; docs/parity.md.)

    The forward's output, sent downstream, comes from the predicted weights.

    Cost: one copy of the stage's delayed-module weights (``w(t - 1)``, saved by :meth:`record`
    right before each optimizer step, part of the checkpoint), and the predicted snapshots of the
    batches in flight (``delay(k) + 1`` per delayed module k, as stash mode keeps).
    """

    def __init__(self, params):
        self.params = list(params)
        self.before = [p.detach().clone() for p in self.params]  # no update yet: prediction starts at 0
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def record(self) -> None:
        """Right before the optimizer step: keep the weights it is about to change."""
        with torch.no_grad():
            for b, p in zip(self.before, self.params):
                b.copy_(p)

    def predict(self, snap: Snapshot, horizon: float) -> None:
        """Move a fresh snapshot's copies ``horizon`` last updates ahead (in place)."""
        if not horizon:
            return
        with torch.no_grad():
            for c, p in snap.live:
                i = self._index.get(id(p))
                if i is not None:
                    c.add_(p - self.before[i], alpha=horizon)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.before)

    def state_dict(self) -> list:
        return [b.clone() for b in self.before]

    def load_state_dict(self, state: list) -> None:
        if len(state) != len(self.before):
            raise ValueError(f"weight_prediction: the checkpoint holds {len(state)} saved weights, this stage has "
                             f"{len(self.before)}; resume with the saved model and partition")
        with torch.no_grad():
            for b, s in zip(self.before, state):
                b.copy_(s)


def own_parameters(layers) -> list:
    """The parameters of a module's own layers, each once, in layer order; a functional layer's
    (the tied output projection's) belong to the module that owns the weight."""
    return unique_parameters(layer for layer in layers if isinstance(layer, torch.nn.Module))


LOOKAHEAD_AUTO = "auto"


def check_lookahead(lookahead, stages: int) -> float:
    """The look-ahead horizon L for a ring of ``stages`` stages: a number >= 0 as given, or
    ``"auto"``: one update per module of the ring, K = 2G - 1 (3 at G = 2, 5 at G = 3). Module K's
    error gradients reach modules stale by up to K - 1 steps, so the longer the ring, the further
    module K has moved by the time they are applied (docs/parity.md measures 3 at G = 2 on the
    plateau of 3-6, and 5 against 3 at G = 3)."""
    if lookahead == LOOKAHEAD_AUTO:
        return float(2 * stages - 1)
    if isinstance(lookahead, bool) or not isinstance(lookahead, (int, float)) or lookahead < 0:
        raise ValueError(f"lookahead: must be 'auto' (2G - 1 updates) or a number >= 0 (0 turns it off, 1 runs the "
                         f"fresh module one last update ahead), got {lookahead!r}")
    return float(lookahead)


def look_ahead(last_update: LastUpdate, horizon: float) -> list:
    """The fresh module's look-ahead (``lookahead``; beyond the paper).

    Module K computes batch t's loss and backward at step t and sends dL/d(input) upstream, where
    module k applies it ``delay(k)`` steps later: by then module K has moved on. With weight
    prediction, module k's own weights are predicted to where they will be; the look-ahead does
    the same for module K, ``horizon`` last updates ahead (2G - 1 by default, :func:`check_lookahead`)::

        w_K <- w_K + horizon (w_K - w_K(t - 1))     in place, for the losses and backwards of step t
        ... module K's forwards, losses, backwards ...
        w_K <- the saved weights                    (look_back, bit for bit), then the optimizer step

    Module K's own gradient is then taken at the look-ahead point and applied at the current
    weights: Nesterov's look-ahead gradient. The tied output projection is not moved (it belongs
    to module 1). Returns the weights :func:`look_back` puts back."""
    saved = [p.detach().clone() for p in last_update.params]
    with torch.no_grad():
        for p, b in zip(last_update.params, last_update.before):
            p.add_(p - b, alpha=horizon)
    return saved


def look_back(last_update: LastUpdate, saved: list) -> None:
    """Undo :func:`look_ahead`: the live weights get back exactly what they were."""
    with torch.no_grad():
        for p, c in zip(last_update.params, saved):
            p.copy_(c)


def take_snapshot(layers, last_update: LastUpdate | None, horizon: float) -> Snapshot:
    """The weight snapshot of a module for a batch's forward, predicted ``horizon`` last updates
    ahead when weight prediction is on: the one way the engine and the Reference take it."""
    snap = Snapshot(layers)
    if last_update is not None:
        last_update.predict(snap, horizon)
    return snap


def delayed_parameters(module_layers) -> list:
    """The parameters of a stage's delayed modules (lists of layers), each once, in layer order."""
    seen, out = set(), []
    for layers in module_layers:
        for layer in layers:
            for p in _layer_module(layer).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def forward(layers, snap: Snapshot, x: torch.Tensor):
    """Module forward through the snapshot's copies, with a graph. Returns ``(input, output)``:
    the input made a leaf that requires grad (when it is floating point), for dL/d(input)."""
    if x.is_floating_point():
        x = x.detach().requires_grad_()
    h = x
    for layer, params in zip(layers, snap.copies):
        if isinstance(layer, torch.nn.Module):
            h = functional_call(layer, params, (h,))
        else:  # partial(fn, module): only the tied head (module K, never stashed) has one
            raise TypeError("stash mode: a functional (TiedLayerSpec forward_fn) layer in a delayed module")
    return x, h


def backward(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, snap: Snapshot):
    """Backprop the kept output with the received error gradient; add the snapshot's gradients into
    the live ``.grad`` (as autograd would accumulate them). Returns dL/d(input) or None."""
    wanted = [c for c, _ in snap.live if c.requires_grad]
    inputs = ([x] if x.requires_grad else []) + wanted
    grads = torch.autograd.grad(y, inputs, grad, allow_unused=True)
    dx = grads[0] if x.requires_grad else None
    for (c, p), g in zip(((c, p) for c, p in snap.live if c.requires_grad), grads[len(inputs) - len(wanted):]):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            p.grad += g
    return dx


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
