"""Small helpers shared by the package, its experiments and its tests."""
from __future__ import annotations

import functools
import os
import socket
from typing import Callable, Iterable


def layer_modules(layers: Iterable) -> list:
    """The ``nn.Module`` behind each pipeline layer: the layer itself, or, for a tied layer run
    through its ``forward_fn`` (``functools.partial(forward_fn, tied_module)``), the tied module."""
    import torch

    out = []
    for layer in layers:
        if isinstance(layer, torch.nn.Module):
            out.append(layer)
        elif isinstance(layer, functools.partial):
            out.extend(a for a in layer.args if isinstance(a, torch.nn.Module))
    return out


def unique_parameters(layers: Iterable) -> list:
    """The parameters of these pipeline layers, each once, in layer order (the tied embedding
    appears in the first and the last layer of a ring module list)."""
    seen, out = set(), []
    for m in layer_modules(layers):
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def atomic_write(path: str, data: bytes | Callable) -> None:
    """Write ``data`` (bytes, or a function that writes into the open binary file) aside, flush
    it to disk, then rename it into place: a reader sees the old file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
