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

import torch
from torch.func import functional_call

from .prediction import LastUpdate


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


def take_snapshot(layers, last_update: LastUpdate | None, horizon: float) -> Snapshot:
    """The weight snapshot of a module for a batch's forward, predicted ``horizon`` last updates
    ahead when weight prediction is on: the one way the engine and the Reference take it."""
    snap = Snapshot(layers)
    if last_update is not None:
        last_update.predict(snap, horizon)
    return snap


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
