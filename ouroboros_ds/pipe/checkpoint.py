"""The ring's checkpoint: DeepSpeed's layout plus each rank's in-flight state, saved atomically.

DeepSpeed's ``save_checkpoint`` writes the layers, the optimizer, the LR schedule, the step
counters and a ``client_state``. A ring stage also holds work that spans steps: the inputs its
delayed replays will recompute from, the error gradients they will backprop, the weight snapshots
of stash replay, recurrent memories and the RNG states. That state goes into one extra file per
rank next to DeepSpeed's, so a resume continues bit for bit (docs/ring.md#checkpoints).

Atomicity: everything goes into the tag's folder first; only when every rank is done does rank 0
write the run's metadata and switch ``latest`` to the tag. A crash before that leaves the
previous checkpoint current.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from deepspeed import comm as dist

from ..ring import stash as W
from .p2p import PendingRecv
from ..ring.utils import atomic_write

META_FILE = "ouroboros_meta.json"  # written last, by rank 0: its presence marks a complete save


class RingCheckpointing:
    """Mixin of :class:`ouroboros_ds.pipe.engine.OuroborosEngine`: ring state in and out of checkpoints.

    Uses the engine's in-flight dicts (``RING_STATE``), its ``p2p`` channel, ``last_update``,
    ``k_update`` and DeepSpeed's ``save_checkpoint``/``load_checkpoint``.
    """

    # Every dict of in-flight state kept across steps (keyed by (k, batch, mb) or (k, mb)); a mode
    # that keeps more across steps adds its dict's attribute name here.
    RING_STATE = ("stash", "grads_in", "weight_stash", "mems", "stash_mems")

    def ring_meta(self) -> dict:
        """What a checkpoint must agree on to be resumed exactly (checked on load)."""
        return {"G": self.num_stages, "M": self.micro_batches,
                "micro_batch": self.train_micro_batch_size_per_gpu(), "dp": self.dp_world_size,
                "seed": self.seed, "replay": self.replay, "weight_prediction": self.weight_prediction,
                "lookahead": self.lookahead, "sync_steps": self.sync_steps, "stage_clip": self.stage_clip,
                "stale_lr_scale": self.stale_lr_scale,
                "num_layers": len(self.module._layer_specs),
                "module_bounds": [list(b) for b in self.module.module_bounds]}

    def in_flight_bytes(self) -> int:
        """Bytes held across steps: stashed inputs, received error gradients, weight snapshots,
        recurrent memories, the weights kept for weight prediction and for module K's look-ahead."""
        nbytes = self.p2p.nbytes  # a tensor, or a posted receive's buffer
        n = sum(map(nbytes, self.stash.values())) + sum(map(nbytes, self.grads_in.values()))
        n += sum(nbytes(m) for d in (*self.mems.values(), *self.stash_mems.values()) for m in d.values())
        n += sum(u.nbytes() for u in (self.last_update, self.k_update) if u is not None)
        return n + sum(snap.nbytes() for snap in self.weight_stash.values())

    def _settle(self):
        """At a step boundary, wait on every posted receive (their sends all happen within the step
        that posted them) and then on this rank's sends, so the in-flight state is plain tensors."""
        for name in self.RING_STATE:
            d = getattr(self, name)
            for key, value in d.items():
                if isinstance(value, PendingRecv):
                    d[key] = self.p2p.wait(value)
        self.p2p.settle()

    def ring_state_dict(self) -> dict:
        """This rank's in-flight Ouroboros state: every ``RING_STATE`` dict, the RNG states. After a
        synchronous step (``sync_steps``) the only in-flight state is recurrent memory: each
        replay ran within its own step."""
        if self.acts_in or self.outbox or self.labels or self._k_saved is not None:
            raise RuntimeError("ring_state_dict() must be called between train_batch() calls")
        self._settle()
        state = {name: dict(getattr(self, name)) for name in self.RING_STATE}
        # snapshots point at the live parameters: save their values only (rebound on load)
        state["weight_stash"] = {key: snap.state_dict() for key, snap in self.weight_stash.items()}
        if self.last_update is not None:
            state["last_update"] = self.last_update.state_dict()
        if self.k_update is not None:
            state["k_update"] = self.k_update.state_dict()
        state["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        state["global_steps"] = self.global_steps
        return state

    def load_ring_state_dict(self, state: dict) -> None:
        self._settle()
        for name in self.RING_STATE:
            setattr(self, name, dict(state[name]))
        self.weight_stash = {key: W.Snapshot.from_state(self.module.module_funcs[key[0]], values)
                             for key, values in state["weight_stash"].items()}
        self.graphs = {}  # a cache: _stash_graph() reruns each kept forward from the restored state
        if self.last_update is not None:
            self.last_update.load_state_dict(state["last_update"])
        if self.k_update is not None:
            self.k_update.load_state_dict(state["k_update"])
        self.p2p.reset_edges()  # both ends of every edge restart, so both redo the shape handshake
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _ring_file(self, ckpt_dir, tag):
        return os.path.join(ckpt_dir, str(tag), f"ouroboros_rank{self.global_rank:05d}.pt")

    def save_ring_checkpoint(self, save_dir, tag=None, client_state=None, meta=None) -> str:
        """DeepSpeed's ``save_checkpoint`` plus each rank's in-flight state, atomically (see the
        module docstring). ``meta`` (e.g. the model config) is stored and checked on load with
        :meth:`ring_meta`. Returns the tag."""
        tag = str(tag if tag is not None else f"global_step{self.global_steps}")
        state = self.ring_state_dict()
        self.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False)
        atomic_write(self._ring_file(save_dir, tag), lambda f: torch.save(state, f))
        dist.barrier()
        if self.global_rank == 0:
            record = {**self.ring_meta(), **(meta or {}), "world": dist.get_world_size(), "tag": tag}
            atomic_write(os.path.join(save_dir, tag, META_FILE), json.dumps(record, indent=1).encode())
            atomic_write(os.path.join(save_dir, "latest"), tag.encode())
        dist.barrier()
        return tag

    def load_ring_checkpoint(self, load_dir, tag=None, meta=None) -> dict:
        """Resume from ``load_dir`` (its ``latest`` unless ``tag``): checks the saved run's G, M,
        micro-batch, replicas, seed, replay mode, partition and ``meta`` against this run (a
        ``ValueError`` naming each mismatch), loads DeepSpeed's part, then the in-flight state.
        Returns the ``client_state`` given at save time."""
        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.isfile(latest):
                raise FileNotFoundError(f"--load: {load_dir!r} has no 'latest' file: not a checkpoint folder, "
                                        "or no save finished there; give the folder passed to --save")
            with open(latest) as f:
                tag = f.read().strip()
        meta_path = os.path.join(load_dir, str(tag), META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"--load: checkpoint {os.path.join(load_dir, str(tag))!r} is incomplete "
                                    f"(no {META_FILE}: its save did not finish); load another tag")
        with open(meta_path) as f:
            saved = json.load(f)
        saved.setdefault("lookahead", 0.0)  # saved before the option existed: a run without look-ahead
        saved.setdefault("sync_steps", 0)  # likewise: no synchronous warm-up
        saved.setdefault("stage_clip", "whole")  # likewise: each stage clipped at gradient_clipping
        saved.setdefault("stale_lr_scale", 0.0)  # likewise: no delay-scaled lr
        mine = {**self.ring_meta(), **(meta or {}), "world": dist.get_world_size()}
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if diffs:
            raise ValueError(f"--load: checkpoint {os.path.join(load_dir, str(tag))!r} does not match this run "
                             f"({'; '.join(diffs)}); resume with the saved settings or start without --load")
        path, client_state = self.load_checkpoint(load_dir, tag=tag)
        if path is None:
            raise FileNotFoundError(f"--load: DeepSpeed found no checkpoint files in {os.path.join(load_dir, str(tag))!r}")
        self.load_ring_state_dict(torch.load(self._ring_file(load_dir, tag), map_location=self.device,
                                             weights_only=False))
        return client_state or {}
