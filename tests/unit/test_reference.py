"""The single-process Reference is the Ouroboros update rule (docs/ring.md; single process, a few seconds).

- M = 1 is the paper's update, checked against an independent transcription of the formula that
  keeps every step's weights and recomputes each delayed gradient from them (no queues).
- With delays forced to 0 (``synchronous=True``) it is ordinary, non-pipelined training.
- Warm-up: module k does not move during its first K - k steps; module K and the tied
  embedding move from step 0.
- A synchronous warm-up (``sync_steps``): over the whole run it is the synchronous Reference, 0
  changes nothing, and after it module k pauses for K - k steps as at the start.
"""
from __future__ import annotations

import functools

import pytest
import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch.func import functional_call

from helpers import quick_points
from ouroboros_ds.models.context import dropout_key
from ouroboros_ds.models.gpt2 import gpt2_config, gpt2_layer_specs, lm_loss
from ouroboros_ds.ring.config import FIELDS, RingConfig
from ouroboros_ds.ring.reference import Reference, make_optimizer, make_scheduler

from helpers import paper

SEED, INIT_SEED = 5, 11
VOCAB, SEQ, MICRO, N_LAYER = 64, 8, 2, 4
# Explicit ring partition of the 4 blocks into modules 1..K (any explicit partition is allowed).
BLOCKS = {1: [2, 2], 2: [1, 2, 1], 3: [1, 1, 1, 1]}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as the engine's ranks run: the comparisons below are then exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plan():
    cfg = gpt2_config({"n_layer": N_LAYER, "n_embd": 16, "n_head": 2, "n_positions": SEQ}, VOCAB, dropout=0.1)
    return gpt2_layer_specs(cfg, seed=INIT_SEED)


def config(clip: float, steps: int | None) -> dict:
    """AdamW with weight decay; WarmupCosineLR over ``steps`` (None: constant LR)."""
    cfg = {"train_micro_batch_size_per_gpu": MICRO,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                      "weight_decay": 0.05, "torch_adam": True}},
            "scheduler": {"type": "WarmupCosineLR",
                          "params": {"total_num_steps": steps, "warmup_num_steps": 2, "warmup_min_ratio": 0.1,
                                 "cos_min_ratio": 0.1}},
            "gradient_clipping": clip}
    if steps is None:
        del cfg["scheduler"]
    return cfg


def batches(steps: int, M: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randint(0, VOCAB, (MICRO, SEQ), generator=g), torch.randint(0, VOCAB, (MICRO, SEQ), generator=g))
             for _ in range(M)] for _ in range(steps)]


def module_layers(G: int) -> dict[int, range]:
    """Layer indices of modules 1..K in ``[Embedding, Block x 4, FinalNorm, Head]``."""
    K, bpm = G + 1, BLOCKS[G]
    out, start = {}, 0
    stop = 1  # the blocks start at layer 1
    for k in range(1, K + 1):
        stop += bpm[k - 1]
        if k == K:
            stop = N_LAYER + 3
        out[k], start = range(start, stop), stop
    return out


class Net(torch.nn.Module):
    """The layer list built from the specs, the tied embedding once; ``forward(k, x)`` runs module k."""

    def __init__(self, G: int):
        super().__init__()
        tied, self.calls, mods = {}, [], []
        for spec in plan().specs:
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in tied:
                    tied[spec.key] = spec.build()
                    mods.append(tied[spec.key])
                m = tied[spec.key]
                self.calls.append(functools.partial(spec.forward_fn, m) if spec.forward_fn else m)
            else:
                assert isinstance(spec, LayerSpec)
                mods.append(spec.build())
                self.calls.append(mods[-1])
        self.mods = torch.nn.ModuleList(mods)
        self.ranges = module_layers(G)
        # the parameters each module's computation uses (the head uses the embedding's wte only)
        name_of = {id(p): n for n, p in self.named_parameters()}
        self.params_of = {}
        for k, r in self.ranges.items():
            names = []
            for i in r:
                c = self.calls[i]
                ps = [c.args[0].wte.weight] if isinstance(c, functools.partial) else list(c.parameters())
                names += [name_of[id(p)] for p in ps if name_of[id(p)] not in names]
            self.params_of[k] = names

    def forward(self, k: int, x):
        for i in self.ranges[k]:
            x = self.calls[i](x)
        return x


def _independent_update(G: int, cfg: dict, data: list, prediction: float = 0.0) -> tuple[dict, list, list]:
    """The update rule (docs/ring.md) transcribed for M = 1, from a history of weights.

    theta[s] are all weights at the start of step s. Batch b's forward at step b uses theta[b]:
    x_1(b) = tokens, x_{j+1}(b) = f_j(x_j(b); theta_j[b]). Module j < K backprops batch b at step
    b + (K - j), with theta_j of that step, on x_j(b); the error it receives is dL/dx_{j+1}(b) from
    module j + 1's backprop of b one step earlier; module K backprops b at step b with theta_K[b]
    and the loss. At step t module k applies the gradient of batch t - (K - k), with theta_k[t].
    Dropout of everything about batch b uses key (seed, b, 0). Stage s clips and steps its own
    modules (stage 0: 1 and K, the tied embedding's two parts summed).

    ``prediction`` h (weight prediction, recompute mode): module j < K runs batch b's forward *and*
    its replay at the forward's predicted weights theta_j[b] + h (K - j) (theta_j[b] - theta_j[b - 1])
    (theta[-1] = theta[0]) instead of theta_j[b] and the replay step's theta_j.
    """
    K = G + 1
    net = Net(G).train()
    names = [n for n, _ in net.named_parameters()]
    live = dict(net.named_parameters())
    stages = [[1, K]] + [[s + 1] for s in range(1, G)]
    stage_names = [[n for n in names if any(n in net.params_of[k] for k in mods)] for mods in stages]
    opts = [make_optimizer([live[n] for n in ns], cfg) for ns in stage_names]
    scheds = [make_scheduler(o, cfg) for o in opts]
    theta, xs, losses, norms = [], [], [], []

    def predicted(k, s):
        """The weights of step s, module k's moved h (K - k) last updates ahead."""
        w, before = dict(theta[s]), theta[max(s - 1, 0)]
        for n in net.params_of[k]:
            w[n] = torch.add(theta[s][n], theta[s][n] - before[n], alpha=prediction * (K - k))
        return w

    def run(k, s, x, b, grads_for=(), weights=None):
        """f_k(x) with the weights of step s (or ``weights``); those in ``grads_for`` as fresh leaves."""
        w = dict(theta[s] if weights is None else weights)
        leaves = {n: w[n].clone().requires_grad_() for n in grads_for}
        w.update(leaves)
        with dropout_key(SEED, b, 0):
            return functional_call(net, w, (k, x)), leaves

    def error(k, b):
        """dL/d(output of module k) for batch b: module k + 1's backprop of b, at step b + K - (k + 1)."""
        j = k + 1
        s = b + K - j
        x = xs[b][j].detach().requires_grad_()
        out, _ = run(j, s, x, b, weights=predicted(j, b) if prediction and j < K else None)
        if j == K:
            (g,) = torch.autograd.grad(lm_loss(out, data[b][0][1]), x)
        else:
            (g,) = torch.autograd.grad(out, x, grad_outputs=error(j, b))
        return g

    for t, [(ids, labels)] in enumerate(data):
        theta.append({n: p.detach().clone() for n, p in net.named_parameters()})
        x = [None, ids]  # x[j]: input of module j for batch t, forward with theta[t]
        with torch.no_grad():
            for j in range(1, K):
                x.append(run(j, t, x[j], t, weights=predicted(j, t) if prediction else None)[0])
        xs.append(x)
        grads: dict = {}
        for k in range(1, K + 1):
            b = t - (K - k)
            if b < 0:
                continue  # warm-up
            out, leaves = run(k, t, xs[b][k], b, net.params_of[k],
                              weights=predicted(k, b) if prediction and k < K else None)
            if k == K:
                loss = lm_loss(out, labels)
                losses.append(loss.item())
                gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            else:
                gs = torch.autograd.grad(out, list(leaves.values()), grad_outputs=error(k, b), allow_unused=True)
            for n, g in zip(leaves, gs):
                if g is not None:
                    grads[n] = grads[n] + g if n in grads else g
        for ns, opt, sch in zip(stage_names, opts, scheds):
            for n in ns:
                live[n].grad = grads.get(n)
            with_grad = [live[n] for n in ns if n in grads]
            if cfg["gradient_clipping"] > 0 and with_grad:
                norms.append(float(torch.nn.utils.clip_grad_norm_(with_grad, cfg["gradient_clipping"])))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sch.step()
    return {n: p.detach() for n, p in zip(names, net.parameters())}, losses, norms


def _reference_params(ref: Reference, G: int) -> dict:
    """The Reference's parameters renamed like :class:`Net`'s (``mods.{i}.`` for layer i)."""
    out = {}
    for name, p in ref.named_parameters():
        i, rest = name.split(".", 1)
        out[f"mods.{i}.{rest}"] = p.detach()
    return out


def _assert_same(actual: dict, expected: dict, what: str) -> float:
    assert set(actual) == set(expected)
    worst = 0.0
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{what} {n}: {m}")
        worst = max(worst, (actual[n] - expected[n]).abs().max().item())
    return worst


@pytest.mark.parametrize("G", (1, 2, 3), ids=lambda g: f"G{g}")
def test_m1_is_the_papers_update(G):
    steps, clip = 2 * (G + 1) + 2, 1.6
    cfg = config(clip, steps)
    data = batches(steps, 1)
    expected, expected_losses, norms = _independent_update(G, cfg, data)
    ref = Reference(plan(), G, cfg, lm_loss, seed=SEED, blocks_per_module=BLOCKS[G], ring=paper())
    losses = [ref.step(b) for b in data]
    worst = _assert_same(_reference_params(ref, G), expected, f"G={G}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-6, atol=0)
    assert any(x > clip for x in norms), f"the clip {clip} never clips: {norms}"
    print(f"G={G}: Reference vs transcription, max |diff| = {worst:.3g}")


@pytest.mark.parametrize("G", (2, 3), ids=lambda g: f"G{g}")
def test_m1_with_weight_prediction_in_recompute_mode(G):
    """Weight prediction with features replay: each forward and its replay at the forward's
    predicted weights; against the transcription, and not the update without prediction."""
    steps, clip, h = 2 * (G + 1) + 2, 1.6, 1.0
    cfg = config(clip, steps)
    data = batches(steps, 1)
    expected, expected_losses, _ = _independent_update(G, cfg, data, prediction=h)
    ref = Reference(plan(), G, cfg, lm_loss, seed=SEED, blocks_per_module=BLOCKS[G], ring=paper(weight_prediction=h))
    losses = [ref.step(b) for b in data]
    worst = _assert_same(_reference_params(ref, G), expected, f"G={G}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-6, atol=0)
    plain, _, _ = _independent_update(G, cfg, data)
    assert any((plain[n] - expected[n]).abs().max() > 1e-4 for n in plain), "prediction changed nothing"
    print(f"G={G}: Reference with prediction vs transcription, max |diff| = {worst:.3g}")


def _the_default(replay: str) -> RingConfig:
    """The whole default (prediction, look-ahead, split clip) on the test's block split, with the
    switch from synchronous steps to the ring inside the run."""
    return RingConfig(replay=replay, sync_steps=2)


@pytest.mark.parametrize("G,M,options", quick_points(
    [(G, M, o) for G in (1, 2, 3) for M in (1, 4) for o in ("prediction", "default")],
    quick={(1, 4, "default"), (2, 4, "default"), (3, 1, "prediction")}, id=lambda G, M, o: f"G{G}-M{M}-{o}"))
def test_prediction_is_the_same_update_in_both_replay_modes(G, M, options):
    """With weight prediction, features replay recomputes at the weights the stash mode keeps, with
    the same dropout masks: the same update, bit for bit, without keeping activations. With the
    whole default too, so stash replay reaches any loss in the default's steps."""
    steps = G + 5
    data = batches(steps, M, seed=3)
    runs = {}
    for replay in ("stash", "recompute"):
        ring = paper(replay=replay, weight_prediction=1.0) if options == "prediction" else _the_default(replay)
        ref = Reference(plan(), G, config(0.5, steps), lm_loss, seed=SEED, blocks_per_module=BLOCKS[G], ring=ring)
        runs[replay] = ([ref.step(b) for b in data], dict(ref.named_parameters()))
    (ls, ps), (lr_, pr) = runs["stash"], runs["recompute"]
    assert ls == lr_
    assert all(torch.equal(ps[n], pr[n]) for n in ps), f"G={G} M={M} {options}: recompute != stash"


@pytest.mark.parametrize("clip", (0.0, 0.5), ids=lambda c: f"clip{c}")
@pytest.mark.parametrize("M", (1, 3), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("G", (2, 3), ids=lambda g: f"G{g}")
def test_synchronous_limit_is_ordinary_training(G, M, clip):
    """With ``global_clip`` one gradient norm over the whole model, as ordinary training (and
    DeepSpeed's 1F1B engine) clips."""
    steps = 5
    cfg = config(clip, steps)
    data = batches(steps, M, seed=1)
    ref = Reference(plan(), G, cfg, lm_loss, seed=SEED, blocks_per_module=BLOCKS[G], synchronous=True,
                    global_clip=True, ring=paper())
    ref_losses = [ref.step(b) for b in data]

    net = Net(G).train()  # its module split does not matter here: all of it runs in order
    opt = make_optimizer(list(net.parameters()), cfg)
    sch = make_scheduler(opt, cfg)
    losses, norms = [], []
    for t, micro_batches in enumerate(data):
        step_losses = []
        for j, (ids, labels) in enumerate(micro_batches):
            with dropout_key(SEED, t, j):
                h = ids
                for k in range(1, G + 2):
                    h = net(k, h)
                loss = lm_loss(h, labels)
            (loss / M).backward()
            step_losses.append(loss.detach())
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(net.parameters()), clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sch.step()
        losses.append(torch.stack(step_losses).mean().item())
    worst = _assert_same(_reference_params(ref, G), {n: p.detach() for n, p in net.named_parameters()},
                         f"G={G} M={M}")
    torch.testing.assert_close(torch.tensor(ref_losses), torch.tensor(losses), rtol=1e-6, atol=0)
    assert not clip or any(n > clip for n in norms), f"the clip {clip} never clips: {norms}"
    print(f"G={G} M={M}: synchronous Reference vs plain training, max |diff| = {worst:.3g}")


@pytest.mark.parametrize("M", (1, 2), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("G", (1, 2, 3), ids=lambda g: f"G{g}")
def test_warm_up(G, M):
    """Module k keeps its weights during steps 0..K-k-1 and moves at step K-k; module K and the
    tied embedding move from step 0. Constant LR: DeepSpeed's WarmupCosineLR gives step 0 an LR
    of 0 whatever its warmup_min_ratio (it sets the LR of "before the first step"), so nothing
    would move at step 0."""
    K, steps = G + 1, G + 2
    ref = Reference(plan(), G, config(1.0, None), lm_loss, seed=SEED, blocks_per_module=BLOCKS[G], ring=paper())
    layers = module_layers(G)
    tied = "0.wte.weight"

    def snapshot():
        return {n: p.detach().clone() for n, p in ref.named_parameters()}

    def module_of(name):
        return next(k for k, r in layers.items() if int(name.split(".")[0]) in r)

    before = snapshot()
    assert tied in before
    for t, b in enumerate(batches(steps, M, seed=2)):
        ref.step(b)
        after = snapshot()
        for n in before:
            k = K if n == tied else module_of(n)
            moved = not torch.equal(before[n], after[n])
            assert moved == (t >= K - k), f"G={G} M={M} step {t}: {n} (module {k}) moved={moved}"
        before = after


# ---------------------------------------------------------------- the synchronous warm-up (sync_steps)
MITIGATED = dict(weight_prediction=1.0, lookahead=3.0, stage_clip="split")  # the default run's


def _run(G, M, steps, **options):
    ring = paper(**{k: options.pop(k) for k in list(options) if k in FIELDS})  # the rest: the Reference's own
    ref = Reference(plan(), G, config(0.5, steps), lm_loss, seed=SEED, blocks_per_module=BLOCKS[G], ring=ring,
                    **options)
    return [ref.step(b) for b in batches(steps, M, seed=4)], dict(ref.named_parameters()), ref


def _equal(a, b) -> bool:
    return a[0] == b[0] and all(torch.equal(a[1][n], b[1][n]) for n in a[1])


@pytest.mark.parametrize("G,M,replay", quick_points(
    [(G, M, r) for G in (1, 2, 3) for M in (1, 3) for r in ("recompute", "stash")],
    quick={(1, 3, "recompute"), (2, 3, "stash"), (3, 1, "recompute")}, id=lambda G, M, r: f"G{G}-M{M}-{r}"))
def test_sync_steps_over_the_whole_run_is_the_synchronous_reference(G, M, replay):
    """Every step synchronous: no delay, no look-ahead, no prediction ahead (delay 0), the per-stage clip."""
    steps = G + 3
    synchronous = _run(G, M, steps, replay=replay, synchronous=True, **MITIGATED)
    for n in (steps, steps + 5):
        assert _equal(_run(G, M, steps, replay=replay, sync_steps=n, **MITIGATED), synchronous), f"sync_steps={n}"
    assert not _equal(_run(G, M, steps, replay=replay, **MITIGATED), synchronous)


@pytest.mark.parametrize("options", ({}, MITIGATED, dict(replay="stash", **MITIGATED)), ids=("paper", "default",
                                                                                               "stash"))
def test_sync_steps_zero_changes_nothing(options):
    G, M, steps = 2, 2, 7
    plain = _run(G, M, steps, **options)
    zero = _run(G, M, steps, sync_steps=0, **options)
    assert _equal(zero, plain) and zero[2].sync_steps == 0 and zero[2].stash.keys() == plain[2].stash.keys()


@pytest.mark.parametrize("G", (1, 2, 3), ids=lambda g: f"G{g}")
def test_sync_steps_then_the_ring(G):
    """Steps 0..S-1 synchronous: every module moves; from S on module k replays batch t - delay(k),
    which it already applied while t - delay(k) < S, so it keeps its weights during S..S+delay(k)-1
    (no weight decay, no Adam step: its step count ends delay(k) short, as after a plain warm-up).
    Constant LR (step 0 of WarmupCosineLR has LR 0). The run differs from both limits."""
    K, S, M = G + 1, 2, 2
    steps = S + G + 2
    ref = Reference(plan(), G, config(1.0, None), lm_loss, seed=SEED, blocks_per_module=BLOCKS[G], 
                    ring=paper(sync_steps=S, **MITIGATED))
    layers, tied = module_layers(G), "0.wte.weight"
    module_of = {n: K if n == tied else next(k for k, r in layers.items() if int(n.split(".")[0]) in r)
                 for n, _ in ref.named_parameters()}
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for t, b in enumerate(batches(steps, M, seed=2)):
        assert ref.synchronous == (t < S)
        ref.step(b)
        after = {n: p.detach().clone() for n, p in ref.named_parameters()}
        for n, k in module_of.items():
            moved = not torch.equal(before[n], after[n])
            assert moved == (not S <= t < S + K - k), f"G={G} step {t}: {n} (module {k}) moved={moved}"
        before = after
        if t == S - 1:  # nothing is held across the boundary
            assert not (ref.stash or ref.pending or ref.weight_stash or ref.graphs), "state left after the sync steps"
    params = dict(ref.named_parameters())
    for opt in ref.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                n = next(n for n, q in params.items() if q is p)
                assert int(opt.state[p]["step"]) == steps - (K - module_of[n]), n
    ring = _run(G, M, steps, **MITIGATED)
    warm = _run(G, M, steps, sync_steps=S, **MITIGATED)
    synchronous = _run(G, M, steps, synchronous=True, **MITIGATED)
    assert not _equal(warm, ring) and not _equal(warm, synchronous)
    assert warm[0][:S] == synchronous[0][:S] and warm[0][S:] != synchronous[0][S:]


@pytest.mark.parametrize("bad", (-1, 1.5, True, "2"))
def test_sync_steps_must_be_a_count(bad):
    with pytest.raises(ValueError, match="sync_steps: must be an integer >= 0"):
        Reference(plan(), 2, config(0.5, 4), lm_loss, ring=paper(sync_steps=bad))


# ---------------------------------------------------------------- the per-stage clip threshold (stage_clip)
@pytest.mark.parametrize("G", (2, 3), ids=lambda g: f"G{g}")
def test_split_clip_bounds_the_whole_models_norm(G):
    """"split": each stage's gradient norm at its optimizer step is at most clip / sqrt(G), reached
    where the clip acts, so the whole model's norm is at most clip, as DeepSpeed's clip keeps it;
    "whole" lets each stage reach clip. A tight clip acts on every stage from its first gradient."""
    clip, steps = 0.05, G + 3

    def norms(mode):
        ref = Reference(plan(), G, config(clip, steps), lm_loss, seed=SEED, blocks_per_module=BLOCKS[G],
                        ring=paper(stage_clip=mode))
        seen = []  # per step: each stage's norm as its optimizer saw it (None: no gradient yet)
        for s, (opt, params) in enumerate(zip(ref.optimizers, ref.stage_params)):
            def hook(_opt, _args, _kwargs, s=s, params=params):
                grads = [p.grad for p in params if p.grad is not None]
                seen.append((s, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
                             if grads else None))
            opt.register_step_pre_hook(hook)
        for b in batches(steps, 2, seed=4):
            ref.step(b)
        return seen

    split = [n for _, n in norms("split") if n is not None]
    assert split and all(n == pytest.approx(clip / G ** 0.5, rel=1e-5) for n in split)
    whole = [n for _, n in norms("whole") if n is not None]
    assert whole and all(n == pytest.approx(clip, rel=1e-5) for n in whole)
    with pytest.raises(ValueError, match="stage_clip: must be 'split'"):
        Reference(plan(), G, config(clip, steps), lm_loss, ring=paper(stage_clip="global"))


def test_stage_clip_threshold():
    from ouroboros_ds.ring.optim import stage_clip_threshold

    assert stage_clip_threshold(1.0, 4, "split") == 0.5 and stage_clip_threshold(1.0, 4, "whole") == 1.0
    assert stage_clip_threshold(0.8, 1, "split") == 0.8  # one stage: DeepSpeed's clip


def test_lookahead_in_synchronous_steps_only_when_asked():
    """The engine looks ahead in ring steps only; ``lookahead_synchronous`` (screening) adds it to
    synchronous ones, to measure the look-ahead without any delay."""
    G, M, steps = 2, 2, 5
    plain = _run(G, M, steps, synchronous=True)
    assert _equal(_run(G, M, steps, synchronous=True, lookahead=3.0), plain)
    assert not _equal(_run(G, M, steps, synchronous=True, lookahead=3.0, lookahead_synchronous=True), plain)


@pytest.mark.parametrize("option,neutral,active", (
    ("stale_lr_cap", False, True), ("compensation", 0.0, 1.0), ("tied_stale_scale", 1.0, 0.5)))
def test_screening_options(option, neutral, active):
    """The Reference's screening-only mitigations (docs/parity.md): each changes the update when on
    and nothing at its neutral value, so a screening run measures what it says."""
    G, M, steps = 2, 2, 6
    ring = dict(weight_prediction=1.0, stale_lr_scale=1.0)
    plain = _run(G, M, steps, **ring)
    assert _equal(_run(G, M, steps, **ring, **{option: neutral}), plain)
    assert not _equal(_run(G, M, steps, **ring, **{option: active}), plain)
    if option == "compensation":
        assert not _equal(_run(G, M, steps, **ring, compensation=1.0, compensation_kind="flat"),
                          _run(G, M, steps, **ring, compensation=1.0))


def test_compensate_is_first_order_towards_the_current_weights():
    from ouroboros_ds.ring.staleness import compensate

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.99), eps=0.0)
    p.grad = torch.tensor([0.5, -1.0])
    opt.step()  # one step: Adam's state exists
    v = opt.state[p]["exp_avg_sq"] / (1 - 0.99)
    w_then = p.detach() - torch.tensor([0.1, 0.2])
    g = torch.tensor([0.2, 0.4])
    p.grad = g.clone()
    compensate([(p, w_then)], [opt], 2.0, "flat")
    assert torch.allclose(p.grad, g + 2.0 * v.sqrt() / 0.1 * torch.tensor([0.1, 0.2]))
    p.grad = g.clone()
    compensate([(p, w_then)], [opt], 2.0, "adaptive")
    assert torch.allclose(p.grad, g + 2.0 * g * g / (v.sqrt() * 0.1) * torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="compensation_kind"):
        compensate([(p, w_then)], [opt], 1.0, "fisher")


def test_two_timescale_lr():
    """stale_slow_ema (screening): a stale group steps f U + (1 - f) U_slow, U_slow the EMA of the
    optimizer's own update U; fresh groups step U; the Reference runs it in place of the scaled lr."""
    from ouroboros_ds.ring.staleness import two_timescale_lr
    from ouroboros_ds.ring.warmup import FIRST_STEP

    stale, fresh = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [stale], FIRST_STEP: 3}, {"params": [fresh], FIRST_STEP: 0}], lr=1.0)
    two_timescale_lr(opt, 1.0, 0.9)
    f, slow, w = 1 / (1 + 3), torch.zeros(2), torch.ones(2)
    for g in (torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])):
        stale.grad, fresh.grad = g.clone(), g.clone()
        opt.step()
        slow = 0.9 * slow + 0.1 * -g
        w = w + f * -g + (1 - f) * slow
        assert torch.allclose(stale.detach(), w)
    assert torch.allclose(fresh.detach(), torch.ones(2) - torch.tensor([1.5, -1.5]))
    G, M, steps = 2, 2, 6
    ring = dict(weight_prediction=1.0, stale_lr_scale=1.0)
    assert not _equal(_run(G, M, steps, **ring, stale_slow_ema=0.99), _run(G, M, steps, **ring))
