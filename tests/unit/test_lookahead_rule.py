"""Module K's look-ahead (``lookahead``, ``ouroboros_ds/ring/prediction.py`` ``look_ahead``), pinned against its
closed form on the single-process Reference (single process, a few seconds).

- During step t, module K's forwards, losses and backwards run at ``w + L (w - w_before)``, where
  ``w_before`` are module K's weights right before the previous optimizer step; the tied
  embedding (module 1's) and module 1 stay where they are.
- Module K's gradient, and the error gradient it sends upstream, equal those an independent copy
  of module K computes at those weights from the same inputs, labels and dropout keys, bit for bit.
- The optimizer step starts from the weights of before the look-ahead, bitwise.
- The synchronous limit never looks ahead; a negative horizon fails with the field's name.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import SEED, batches, ds_config, model_plan, paper
from ouroboros_ds.ring import prediction as W
from ouroboros_ds.models.context import dropout_key
from ouroboros_ds.models.gpt2 import lm_loss
from ouroboros_ds.ring.reference import Reference


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _no_clip(M: int, steps: int) -> dict:
    """The tests' config without the clip: the optimizer's pre-hook then sees the raw gradients."""
    return {**ds_config(M, steps), "gradient_clipping": 0.0}


def _own(ref: Reference) -> list:
    """Module K's own parameters, found here without stash.own_parameters: the nn.Module layers'."""
    out = []
    for layer in ref.module_layers[ref.K]:
        if isinstance(layer, torch.nn.Module):
            out += [p for p in layer.parameters() if all(p is not q for q in out)]
    return out


def _module_k_copy(ref: Reference, weights: list):
    """An independent copy of module K's layers (its tied head too, at the tied weight's value now)
    with its own parameters set to ``weights`` (in the order of :func:`_own`)."""
    layers = copy.deepcopy(ref.module_layers[ref.K])
    own = []
    for layer in layers:
        if isinstance(layer, torch.nn.Module):
            own += [p for p in layer.parameters() if all(p is not q for q in own)]
    assert len(own) == len(weights)
    with torch.no_grad():
        for p, w in zip(own, weights):
            p.copy_(w)
    return layers, own


@pytest.mark.parametrize("L", (1.0, 0.5), ids=lambda x: f"L{x}")
@pytest.mark.parametrize("G, M", ((1, 4), (2, 1), (3, 4)), ids=lambda x: str(x))
def test_the_fresh_module_looks_one_update_ahead(G, M, L):
    steps, check_at = G + 3, G + 2  # module K has moved (from step 0), and so have the stale modules
    data = batches(steps, M)
    ref = Reference(model_plan(), G, _no_clip(M, steps), lm_loss, seed=SEED,
                    ring=paper(weight_prediction=1.0, lookahead=L))
    K, own = ref.K, _own(ref)
    tied = ref.layers[0].wte.weight  # module 1's; module K's head reads it through a functional layer
    assert all(p is not tied for p in own)
    assert {id(p) for p in W.own_parameters(ref.module_layers[K])} == {id(p) for p in own}
    assert {id(p) for p in ref.k_update.params} == {id(p) for p in own}

    before_step: list = []  # module K's weights right before each optimizer step (my own record)
    seen: dict = {}

    def pre_step(opt, args, kwargs):  # stage 0's optimizer: modules 1 and K
        before_step.append([p.detach().clone() for p in own])
        seen["grads"] = [p.grad.clone() for p in own]
        seen["at_step"] = [p.detach().clone() for p in own]

    ref.optimizers[0].register_step_pre_hook(pre_step)
    for b in data[:check_at]:
        ref.step(b)

    # step t = check_at, watched: module K's inputs and every weight while module K runs
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    w = [p.detach().clone() for p in own]
    expected = [wi + L * (wi - bi) for wi, bi in zip(w, before_step[-1])]  # the closed form
    assert any(not torch.equal(e, wi) for e, wi in zip(expected, w)), "no last update: the test is blind"
    inputs, during = [], []
    first = ref.module_layers[K][0]

    def watch(layer, args):
        inputs.append(args[0].detach().clone())
        during.append({n: p.detach().clone() for n, p in ref.named_parameters()})

    at_lookahead = _module_k_copy(ref, expected)  # before the step moves the tied weight
    at_current = _module_k_copy(ref, w)
    handle = first.register_forward_pre_hook(watch)
    ref.step(data[check_at])
    handle.remove()
    assert len(inputs) == M

    index = {id(p): i for i, p in enumerate(own)}
    looked = {n: expected[index[id(p)]] for n, p in ref.named_parameters() if id(p) in index}
    assert "0.wte.weight" in start and "0.wte.weight" not in looked
    for d in during:  # module K at the look-ahead point; nothing else moved (the tied weight included)
        for n, v in d.items():
            assert torch.equal(v, looked.get(n, start[n])), f"{n} during module K's forwards"

    # the step starts from the weights of before the look-ahead, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(seen["at_step"], w))

    # an independent copy of module K at the closed-form weights: the same gradients, bit for bit
    layers, copy_own = at_lookahead
    for j, (x, (_, labels)) in enumerate(zip(inputs, data[check_at])):
        x = x.requires_grad_()
        with dropout_key(SEED, check_at, j):
            h = x
            for layer in layers:
                h = layer(h)
            loss = lm_loss(h, labels)
        (loss / M).backward()
        assert torch.equal(x.grad, ref.pending[(K - 1, check_at, j)]), f"micro-batch {j}: error gradient sent upstream"
    for p, g in zip(copy_own, seen["grads"]):
        assert torch.equal(p.grad, g), "module K's gradient is not the gradient at the look-ahead point"

    # and it is not the gradient at the current weights (the test is not blind)
    layers, copy_own = at_current
    for j, (x, (_, labels)) in enumerate(zip(inputs, data[check_at])):
        with dropout_key(SEED, check_at, j):
            h = x.detach()
            for layer in layers:
                h = layer(h)
        (lm_loss(h, labels) / M).backward()
    assert any(not torch.equal(p.grad, g) for p, g in zip(copy_own, seen["grads"]))


def test_look_back_restores_the_weights_bitwise():
    lin = torch.nn.Linear(3, 2)
    lu = W.LastUpdate(list(lin.parameters()))
    lu.record()
    with torch.no_grad():
        for p in lin.parameters():
            p.mul_(1.1).add_(0.3)  # "the optimizer step"
    w = [p.detach().clone() for p in lin.parameters()]
    saved = W.look_ahead(lu, 1.0)
    for p, wi, bi in zip(lin.parameters(), w, lu.before):
        assert torch.equal(p, wi + (wi - bi))
    W.look_back(lu, saved)
    assert all(torch.equal(p, wi) for p, wi in zip(lin.parameters(), w))


def test_synchronous_limit_and_bad_horizon():
    ref = Reference(model_plan(), 2, ds_config(1, 4), lm_loss, seed=SEED, synchronous=True, ring=paper(lookahead=1.0))
    assert ref.k_update is None
    for bad in (-1, "far", True, None):
        with pytest.raises(ValueError, match="lookahead: must be 'auto' \\(2G - 1 updates, at most 5 with the delay-scaled lr\\) or a number >= 0"):
            Reference(model_plan(), 2, ds_config(1, 4), lm_loss, ring=paper(lookahead=bad))


@pytest.mark.parametrize("G", [1, 2, 3, 4])
def test_auto_horizon_is_one_update_per_module_of_the_ring(G):
    assert paper(lookahead="auto").lookahead_updates(G) == 2 * G - 1 == len(range(1, 2 * G))
    assert paper(lookahead=2).lookahead_updates(G) == 2.0 and isinstance(paper(lookahead=2).lookahead_updates(G), float)


def test_auto_horizon_is_capped_where_the_stale_lr_is_scaled():
    from ouroboros_ds.ring.config import LOOKAHEAD_AUTO_MAX, RingConfig

    default = RingConfig()  # the delay-scaled lr from G = 4 on: there the look-ahead stops at 5
    assert [default.lookahead_updates(G) for G in (1, 2, 3, 4, 8)] == [1.0, 3.0, 5.0, 5.0, 5.0]
    assert LOOKAHEAD_AUTO_MAX == 5
    assert RingConfig(stale_lr_scale=0.0).lookahead_updates(8) == 15.0  # unscaled: one per module
    assert RingConfig(stale_lr_scale=1.0).lookahead_updates(2) == 3.0  # 2G - 1 is under the cap
    assert RingConfig(stale_lr_scale=1.0, lookahead=9).lookahead_updates(8) == 9.0  # a number is a number


def test_auto_is_the_same_update_as_its_number():
    steps, G, M = 4, 3, 4
    runs = []
    for L in ("auto", 5.0):
        ref = Reference(model_plan(), G, _no_clip(M, steps), lm_loss, seed=SEED,
                        ring=paper(weight_prediction=1.0, lookahead=L))
        losses = [ref.step(mbs) for mbs in batches(steps, M)]
        runs.append((ref.lookahead, losses, [p.detach().clone() for p in _own(ref)]))
    assert runs[0][0] == 5.0
    assert runs[0][1] == runs[1][1] and all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))
