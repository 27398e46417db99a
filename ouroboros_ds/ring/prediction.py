"""Weight prediction and the look-ahead: weights moved ahead along their last update (beyond the
paper; both off in ``RingConfig.paper()``).

- :class:`LastUpdate` keeps a stage's weights from before its last optimizer step, so that
  ``w + h (w - w_before)`` is ``h`` last updates ahead. The stale modules' forwards run at weights
  predicted that way (``weight_prediction``), in both replay modes, through
  :func:`ouroboros_ds.ring.stash.take_snapshot`.
- :func:`look_ahead` / :func:`look_back` move module K's own weights ahead for a step's losses and
  backwards, and put them back bit for bit (``lookahead``).

Both the engine and :class:`ouroboros_ds.ring.reference.Reference` call these functions, so the
two run the same operations in the same order (the equivalence tests are bitwise).
"""
from __future__ import annotations

import torch

from .utils import unique_parameters


def _module(layer) -> torch.nn.Module:
    if isinstance(layer, torch.nn.Module):
        return layer
    raise TypeError(f"weight prediction cannot hold the weights of layer {layer!r}")


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

    def predict(self, snap, horizon: float) -> None:
        """Move a fresh :class:`~ouroboros_ds.ring.stash.Snapshot`'s copies ``horizon`` last
        updates ahead (in place)."""
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


def delayed_parameters(module_layers) -> list:
    """The parameters of a stage's delayed modules (lists of layers), each once, in layer order."""
    seen, out = set(), []
    for layers in module_layers:
        for layer in layers:
            for p in _module(layer).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def look_ahead(last_update: LastUpdate, horizon: float) -> list:
    """The fresh module's look-ahead (``lookahead``; beyond the paper).

    Module K computes batch t's loss and backward at step t and sends dL/d(input) upstream, where
    module k applies it ``delay(k)`` steps later: by then module K has moved on. With weight
    prediction, module k's own weights are predicted to where they will be; the look-ahead does
    the same for module K, ``horizon`` last updates ahead (2G - 1 by default, at most 5 with the delay-scaled lr, :meth:`ouroboros_ds.ring.config.RingConfig.lookahead_updates`)::

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
