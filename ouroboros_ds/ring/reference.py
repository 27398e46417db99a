"""The Ouroboros update rule in one process, in plain PyTorch: the specification the engine is
tested against.

All K modules live in this process; the delays are kept in dicts exactly as docs/ring.md says:
module k < K forwards batch t without a graph and stashes its input; at step t it replays batch
``t - (K - k)`` with its current weights and the same dropout masks, and backprops the error
gradient that module k + 1 produced for that batch one step earlier. Module K is fresh. Each
stage (modules of ``modules_of(s)``) has its own optimizer, clip and LR schedule, built from the
same DeepSpeed config the engine reads. With ``synchronous=True`` every delay is 0: each module
backprops the current batch, which is ordinary training. With ``replay="stash"`` the forward keeps
its graph through a snapshot of the module's weights and the delayed backward uses it (the
gradient at the forward's weights, :mod:`ouroboros_ds.ring.stash`), as the engine's stash mode does;
``weight_prediction`` takes that snapshot ahead along the last update, as the engine does
(:class:`ouroboros_ds.ring.prediction.LastUpdate`); with ``replay="recompute"`` the forward runs through the
predicted snapshot without a graph and the replay recomputes through it (the same update as stash
mode). ``lookahead`` = L runs module K's losses and backwards L last updates ahead
(:func:`ouroboros_ds.ring.prediction.look_ahead`), as the engine does. ``global_clip`` clips one norm over
the whole model, as DeepSpeed's 1F1B engine does (the baseline, with ``synchronous=True``);
otherwise each stage clips its own norm, at the config's ``gradient_clipping``
(``stage_clip="whole"``, the paper's rule) or at that over sqrt(G) (``"split"``:
:func:`ouroboros_ds.ring.optim.stage_clip_threshold`). ``sync_steps`` = S makes steps 0..S-1
synchronous (the synchronous warm-up, as the engine runs it): from step S on module k replays
batch ``t - delay(k)`` again, and while that batch is one of the first S, already applied in its
own step, the module has no gradient and keeps its weights, as at the start of a run.
"""
from __future__ import annotations

import functools

import torch

from ..core import schedule as S
from . import prediction as WP
from . import stash as W
from ..models.context import dropout_key, recurrent_memory
from ..models.gpt2 import LayerPlan
from ..core.partition import ring_partition
from .config import RingConfig
from .optim import stage_clip_threshold
from .staleness import compensate, delay_scaled_lr, stale_momentum, two_timescale_lr
from .utils import layer_modules, unique_parameters
from ..core.schedule import replays_batch
from .warmup import FIRST_STEP, stage_param_groups


def build_layers(plan: LayerPlan) -> list:
    """The layer list as callables, building each tied module once (one parameter, like stage 0)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tied, out = {}, []
    for spec in plan.specs:
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = spec.build()
            m = tied[spec.key]
            if spec.forward_fn:
                f = functools.partial(spec.forward_fn, m)
                f.tied_weight_attr = spec.tied_weight_attr  # the only weights the forward_fn uses
                out.append(f)
            else:
                out.append(m)
        elif isinstance(spec, LayerSpec):
            out.append(spec.build())
        else:
            out.append(spec)
    return out


def make_optimizer(params, ds_config: dict):
    """The optimizer DeepSpeed builds for ``{"type": "Adam"|"AdamW", "params": {..., "torch_adam": true}}``."""
    opt = ds_config.get("optimizer", {})
    kind = opt.get("type", "AdamW").lower()
    p = {k: v for k, v in opt.get("params", {}).items() if k not in ("torch_adam", "adam_w_mode", "foreach")}
    if kind not in ("adam", "adamw") or not opt.get("params", {}).get("torch_adam", False):
        raise ValueError("the reference reproduces DeepSpeed's torch Adam/AdamW only: set optimizer.type "
                         "to Adam or AdamW and optimizer.params.torch_adam to true")
    return torch.optim.AdamW(params, **p)


def make_scheduler(optimizer, ds_config: dict):
    from deepspeed.runtime import lr_schedules

    sch = ds_config.get("scheduler")
    return getattr(lr_schedules, sch["type"])(optimizer, **sch.get("params", {})) if sch else None


class Reference:
    """Ouroboros on one process. ``step(micro_batches)`` runs one step t and returns the mean loss."""

    def __init__(self, plan: LayerPlan, stages: int, ds_config: dict, loss_fn, seed: int = 0,
                 ring: RingConfig | None = None, blocks_per_module=None, synchronous: bool = False,
                 global_clip: bool = False, stale_beta1: float = 0.0, lookahead_synchronous: bool = False,
                 stale_lr_cap: bool = False, compensation: float = 0.0, compensation_kind: str = "adaptive",
                 tied_stale_scale: float = 1.0, stale_slow_ema: float = 0.0):
        # ring: the ring's options, as the engine takes them (None: RingConfig's defaults); the
        # rest are the Reference's own: synchronous + global_clip is stock 1F1B's update; the
        # others screen mitigations the engine does not run (docs/parity.md): stale_beta1,
        # lookahead_synchronous, stale_lr_cap (staleness.delay_scaled_lr's cap), compensation and
        # compensation_kind (staleness.compensate), tied_stale_scale (the tied embedding's stale
        # input-side gradient times this, before module K adds its fresh one), stale_slow_ema
        # (staleness.two_timescale_lr)
        ring = RingConfig() if ring is None else ring
        self.ring = ring
        self.replay, self.sync_steps = ring.replay, ring.sync_steps
        self.weight_prediction = float(ring.weight_prediction)
        stage_clip, stale_lr_scale = ring.stage_clip, ring.stale_lr_for(stages)
        self.G, self.K = stages, S.num_modules(stages)
        self.seed, self.loss_fn, self.always_synchronous = seed, loss_fn, synchronous
        self.layers = build_layers(plan)
        bounds = ring_partition(len(self.layers), plan.block_indices, stages, blocks_per_module)
        self.module_layers = {k: self.layers[a:b] for k, (a, b) in enumerate(bounds, start=1)}
        self.clip = float(ds_config.get("gradient_clipping", 0.0))
        # global_clip: one norm over the whole model, as DeepSpeed's stock pipeline engine clips
        # (the 1F1B baseline); the Ouroboros rule clips each stage on its own
        self.global_clip = global_clip
        # the norm each stage clips at without global_clip (optim.stage_clip_threshold)
        self.stage_clip = stage_clip_threshold(self.clip, stages, stage_clip)
        self.stage_params, self.optimizers, self.schedulers = [], [], []
        tied_attrs = {id(f.args[0]): f.tied_weight_attr for f in self.layers if isinstance(f, functools.partial)}
        for s in range(stages):
            mods = S.modules_of(s, stages)
            params = unique_parameters(layer for k in mods for layer in self.module_layers[k])
            # the engine's own groups: one per first-gradient step
            groups = stage_param_groups({k: self.module_layers[k] for k in mods}, stages, tied_attrs)
            if stale_beta1 and not synchronous:  # delay-aware momentum for the stale groups
                betas = ds_config.get("optimizer", {}).get("params", {}).get("betas", (0.9, 0.999))
                moment = stale_momentum([(g[FIRST_STEP], g["params"]) for g in groups], betas, stale_beta1)
                groups = [{**g, **mg} for g, mg in zip(groups, moment)]
            opt = make_optimizer(groups, ds_config)
            if stale_slow_ema and not synchronous:
                two_timescale_lr(opt, stale_lr_scale, stale_slow_ema)
            elif not synchronous:  # each group's lr scaled by its delay in the ring (no hooks at 0)
                delay_scaled_lr(opt, stale_lr_scale, ds_config["optimizer"]["params"]["lr"] if stale_lr_cap else None)
            self.stage_params.append(params)
            self.optimizers.append(opt)
            self.schedulers.append(make_scheduler(opt, ds_config))
        self.last_update = WP.LastUpdate(WP.delayed_parameters(
            self.module_layers[k] for k in range(1, self.K))) if self.weight_prediction else None
        # lookahead: module K's own weights before the last step, for its look-ahead (prediction.look_ahead)
        self.lookahead = ring.lookahead_updates(stages)
        # lookahead_synchronous (screening only; the engine never does it): look ahead in
        # synchronous steps too, to measure what the look-ahead does without any delay
        self.lookahead_synchronous = lookahead_synchronous
        self.k_update = WP.LastUpdate(WP.own_parameters(self.module_layers[self.K])) \
            if self.lookahead and (not synchronous or lookahead_synchronous) else None
        self.compensation, self.compensation_kind = float(compensation), compensation_kind
        self.compensated: list = []  # (live parameter, the weights its stale gradient was taken at)
        self.tied_stale_scale = float(tied_stale_scale)
        # module K's parameters: the tied embedding is the one module 1 shares with it
        self.module_k_params = {id(p) for p in unique_parameters(self.module_layers[self.K])}
        self.t = 0
        self.stash: dict = {}    # (module, batch, mb) -> input
        self.pending: dict = {}  # (module, batch, mb) -> dL/d(output of module)
        self.weight_stash: dict = {}  # replay="stash": (module, batch) -> Snapshot
        self.graphs: dict = {}        # replay="stash": (module, batch, mb) -> (input leaf, output)
        self.mems: dict = {}        # (module, mb) -> memory its last forward wrote (Transformer-XL)
        self.stash_mems: dict = {}  # (module, batch, mb) -> memory that forward read

    @property
    def synchronous(self) -> bool:
        """Whether step t (the next one to run) is synchronous: every delay 0."""
        return self.always_synchronous or self.t < self.sync_steps

    def delay(self, k: int) -> int:
        return S.delay(k, self.G, self.synchronous)

    def to(self, device) -> "Reference":
        """Move the model (and the weights kept for prediction) to ``device``, before the first step;
        the initial weights stay the CPU-built ones, so every device starts from the same model."""
        if self.t:
            raise RuntimeError("Reference.to: move the Reference before its first step")
        for m in layer_modules(self.layers):
            m.to(device)  # in place: the optimizers keep the same Parameter objects
        for update in (self.last_update, self.k_update):
            if update is not None:
                update.before = [b.to(device) for b in update.before]
        return self

    def forward_module(self, k: int, x):
        for layer in self.module_layers[k]:
            x = layer(x)
        return x

    def train(self, mode: bool = True):
        for m in layer_modules(self.layers):
            m.train(mode)

    def named_parameters(self):
        """(name, parameter) in layer order, named like DeepSpeed's pipeline checkpoint layers."""
        seen = set()
        for i, layer in enumerate(self.layers):
            mods = layer_modules([layer])
            for m in mods:
                for n, p in m.named_parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield f"{i}.{n}", p

    def step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        t, K, M = self.t, self.K, len(micro_batches)
        self.train(True)
        # 1. forwards of batch t through modules 1..K-1, no graph; stash each module's input
        acts = [inp for inp, _ in micro_batches]
        for k in range(1, K):
            for j in range(M):
                self.stash[(k, t, j)] = acts[j]
                mem = self.stash_mems[(k, t, j)] = self.mems.get((k, j))
                with recurrent_memory(mem) as new_mem:
                    if self.replay == "stash":
                        if j == 0:
                            self.weight_stash[(k, t)] = W.take_snapshot(self.module_layers[k], self.last_update,
                                                                        self.weight_prediction * self.delay(k))
                        with dropout_key(self.seed, t, j):
                            self.graphs[(k, t, j)] = W.forward(self.module_layers[k], self.weight_stash[(k, t)],
                                                               acts[j])
                        y = self.graphs[(k, t, j)][1].detach()
                    else:
                        if j == 0 and self.last_update is not None and self.delay(k):
                            # weight prediction: the forward and, later, its replay run at the
                            # predicted weights, kept until the replay (weights only, no activations)
                            self.weight_stash[(k, t)] = W.take_snapshot(self.module_layers[k], self.last_update,
                                                                        self.weight_prediction * self.delay(k))
                        pred = self.weight_stash.get((k, t))
                        with torch.no_grad(), dropout_key(self.seed, t, j):
                            y = (self.forward_module(k, acts[j]) if pred is None
                                 else W.forward(self.module_layers[k], pred, acts[j])[1])
                if new_mem:
                    self.mems[(k, j)] = new_mem
                acts[j] = y
        # 2. replays: module k backprops batch t - delay(k) from its stash, current weights.
        #    (the engine's stage 0 also replays module 1 before module K's losses: same order here)
        if not self.synchronous:
            self._replays(range(K - 1, 0, -1))
            if self.tied_stale_scale != 1.0:
                for p in unique_parameters(self.module_layers[1]):
                    if id(p) in self.module_k_params and p.grad is not None:
                        p.grad.mul_(self.tied_stale_scale)
        # 3. module K: forward, loss and backward of batch t
        losses = []
        # no look-ahead in a synchronous step: module K's error gradients are applied in this step
        look = self.k_update is not None and (not self.synchronous or self.lookahead_synchronous)
        saved = WP.look_ahead(self.k_update, self.lookahead) if look else None
        for j, (_, labels) in enumerate(micro_batches):
            x = acts[j].detach().requires_grad_()
            with dropout_key(self.seed, t, j), recurrent_memory(self.mems.get((K, j))) as new_mem:
                loss = self.loss_fn(self.forward_module(K, x), labels)
            if new_mem:
                self.mems[(K, j)] = new_mem
            (loss / M).backward()
            losses.append(loss.detach())
            self.pending[(K - 1, t, j)] = x.grad
        if saved is not None:
            WP.look_back(self.k_update, saved)
        if self.synchronous:
            self._replays(range(K - 1, 0, -1))
        # 4. per stage: clip, step (modules without a gradient yet keep their weights), LR schedule
        for update in (self.last_update, self.k_update):
            if update is not None:
                update.record()
        if self.compensated:
            compensate(self.compensated, self.optimizers, self.compensation, self.compensation_kind)
            self.compensated = []
        if self.global_clip and self.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for params in self.stage_params for p in params if p.grad is not None],
                                           self.clip)
        for params, opt, sch in zip(self.stage_params, self.optimizers, self.schedulers):
            with_grad = [p for p in params if p.grad is not None]
            if self.clip > 0 and with_grad and not self.global_clip:
                torch.nn.utils.clip_grad_norm_(with_grad, self.stage_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sch is not None:
                sch.step()
        self.t += 1
        return torch.stack(losses).mean().item()

    def _replays(self, modules):
        t = self.t
        for k in modules:
            b = t - self.delay(k)
            if not replays_batch(b, self.synchronous, self.sync_steps):
                continue  # warm-up: no delayed gradient for module k yet, or batch b was replayed in its own step
            j = 0
            while (k, b, j) in self.stash:
                x = self.stash.pop((k, b, j))
                g = self.pending.pop((k, b, j))
                mem = self.stash_mems.pop((k, b, j))
                snap = self.weight_stash.get((k, b))
                if snap is not None:  # stash mode, or weight prediction: the gradient at the snapshot
                    if self.replay == "stash":  # the kept graph already holds the memory it read
                        x, y = self.graphs.pop((k, b, j))
                    else:  # recompute at the forward's predicted weights
                        with dropout_key(self.seed, b, j), recurrent_memory(mem):
                            x, y = W.forward(self.module_layers[k], snap, x)
                    dx = W.backward(x, y, g, snap)
                    if k > 1:
                        self.pending[(k - 1, b, j)] = dx
                    j += 1
                    if (k, b, j) not in self.stash:
                        if self.compensation:
                            self.compensated += [(p, c.detach()) for c, p in snap.live
                                                 if id(p) not in self.module_k_params]
                        del self.weight_stash[(k, b)]
                    continue
                if x.is_floating_point():
                    x = x.detach().requires_grad_()
                with dropout_key(self.seed, b, j), recurrent_memory(mem):
                    y = self.forward_module(k, x)
                torch.autograd.backward(y, g)
                if k > 1:
                    self.pending[(k - 1, b, j)] = x.grad
                j += 1
