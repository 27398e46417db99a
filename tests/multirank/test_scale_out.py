"""G stages x D data-parallel replicas, ZeRO-1, bf16 and evaluation on the Ouroboros ring.

Two spawned runs (gloo, CPU, one thread per rank), each launched once and training several
engines in the same processes (the tiny model of test_equivalence, dropout 0.1, AdamW with weight
decay, a clip that acts on some steps):

- ``2x2``: 4 ranks, G = 2 stages x D = 2 replicas, M = 2 micro-batches per replica: ZeRO-1 fp32,
  the same with an ``eval_batch`` before step EVAL_AT, ZeRO-0 fp32, ZeRO-1 bf16.
- ``2x1``: 2 ranks, G = 2, D = 1, M = 4 (the same global batch): ZeRO-1 fp32, bf16 with ZeRO-0
  (DeepSpeed's BF16_Optimizer) and with ZeRO-1 (its ZeRO optimizer in bf16); fp16 is refused.

Replica r's micro-batch j is the global batch's micro-batch j*D + r (data.BatchStream's rule).
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from helpers import (full, MICRO, SEED, SEQ, VOCAB, ApiRecorder, batches, ds_config, model_plan, paper, reference_run,
                     ring_engine, run_once, stage_parameters)

G, GLOBAL_MB, STEPS, EVAL_AT = 2, 4, 7, 3  # GLOBAL_MB micro-batches of 2 sequences per global batch


def config(M: int, zero: int, bf16: bool = False) -> dict:
    cfg = ds_config(GLOBAL_MB, STEPS)  # test_equivalence's clip for these batches: it clips on some steps
    cfg["gradient_accumulation_steps"] = M
    cfg["zero_optimization"] = {"stage": zero}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def global_batches() -> list:
    """STEPS global batches of GLOBAL_MB micro-batches: the same whatever D."""
    return batches(STEPS, GLOBAL_MB)


def replica_stream(D: int, r: int) -> list:
    """Replica r's micro-batches, step after step: micro-batch j is the global batch's j*D + r."""
    return [step[j * D + r] for step in global_batches() for j in range(GLOBAL_MB // D)]


def validation() -> list:
    """3 validation micro-batches, different from the training ones."""
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randint(0, VOCAB, (MICRO, SEQ), generator=g) for _ in range(2)) for _ in range(3)]


def _train(M, zero, bf16, D, dp_rank, eval_at=None):

    engine, mod = ring_engine(G, config(M, zero, bf16))
    assert engine.dp_world_size == D and engine.grid.get_data_parallel_rank() == dp_rank
    it = iter(replica_stream(D, dp_rank)) if engine.stage_id == 0 else None
    losses, evals = [], []
    with ApiRecorder() as api:
        for t in range(STEPS):
            if t == eval_at:
                val = validation()
                loss = engine.eval_batch(iter(val) if engine.stage_id == 0 else None, num_micro_batches=len(val))
                evals.append(None if loss is None else loss.item())
                # nothing of the evaluation is left in flight: a rank may return and exit right after it
                assert not engine.p2p.sends, "eval_batch returned with its sends in flight"
            loss = engine.train_batch(it)
            losses.append(None if loss is None else loss.float().item())
    params = {n: p.float() for n, p in stage_parameters(mod).items()}
    in_flight = [x for x in engine.stash.values() if x.is_floating_point()] + [
        g if torch.is_tensor(g) else g.buf for g in engine.grads_in.values()]
    return {"losses": losses, "evals": evals, "params": params, "stage": engine.stage_id, "dp_rank": dp_rank,
            "api_calls": api.calls, "optimizer": type(engine.optimizer).__name__,
            "dtypes": sorted({str(p.dtype) for p in mod.parameters()}),
            "groups": [len(g["params"]) for g in engine.basic_optimizer.param_groups],
            "in_flight_dtypes": sorted({str(x.dtype) for x in in_flight if x is not None}),
            "master_dtypes": sorted({str(p.dtype) for g in engine.basic_optimizer.param_groups for p in g["params"]})}


def _init_error(cfg: dict, groups: bool = False) -> str:
    """The ValueError of initialize() with this config (and user param groups without the ring's key)."""
    from ouroboros_ds import initialize
    from ouroboros_ds.models.gpt2 import lm_loss
    from ouroboros_ds.pipe.module import OuroborosPipelineModule

    plan = model_plan()
    mod = OuroborosPipelineModule(plan.specs, num_stages=G, loss_fn=lm_loss, block_indices=plan.block_indices)
    params = [{"params": list(mod.parameters())}] if groups else list(mod.parameters())
    try:
        initialize(model=mod, model_parameters=params, config=cfg, seed=SEED, ring=paper())
    except ValueError as e:
        return str(e)
    return "no error"


def worker(rank: int, world: int, runs: list, out: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    D = world // G
    dp_rank = PipeDataParallelTopology(num_pp=G, num_dp=D).get_coord(rank).data  # as the module's grid
    results = {name: _train(M, zero, bf16, D, dp_rank, eval_at) for name, (M, zero, bf16, eval_at) in runs}
    if D == 1:
        results["fp16_error"] = _init_error({**config(GLOBAL_MB, 0), "fp16": {"enabled": True}})
        results["groups_error"] = _init_error(config(GLOBAL_MB, 1), groups=True)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


M2, M1 = GLOBAL_MB // 2, GLOBAL_MB  # micro-batches per replica with D = 2 and D = 1
RUNS = {  # name -> (world, [(engine run, (M, ZeRO stage, bf16, eval before step))])
    "2x2": (2 * G, [("zero1", (M2, 1, False, None)), ("zero1_eval", (M2, 1, False, EVAL_AT)),
                    ("zero0", (M2, 0, False, None)), ("bf16_zero1", (M2, 1, True, None))]),
    "2x1": (G, [("zero1", (M1, 1, False, None)), ("bf16", (M1, 0, True, None)), ("bf16_zero1", (M1, 1, True, None))]),
}


FULL_ONLY = {("2x2", "zero0"), ("2x1", "bf16_zero1")}  # the runs only --full's tests read


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
    every = request.config.getoption("--full")

    def get(name: str) -> list:
        world, runs = RUNS[name]
        runs = [r for r in runs if every or (name, r[0]) not in FULL_ONLY]
        return run_once(tmp_path_factory, f"scale_{name}", worker, world, timeout=600, args=(runs,))[1]
    return get


@torch.no_grad()
def _validation_loss(ref) -> float:
    from ouroboros_ds.models.gpt2 import lm_loss

    ref.train(False)
    losses = []
    for x, y in validation():
        for k in range(1, ref.K + 1):
            x = ref.forward_module(k, x)
        losses.append(lm_loss(x, y))
    return torch.stack(losses).mean().item()


def _reference():
    """The Reference on the global batches: parameters, losses, and the validation loss before step EVAL_AT."""
    evals = []

    def evaluate(t, ref):
        if t == EVAL_AT:
            evals.append(_validation_loss(ref))
    # config(GLOBAL_MB, 0) but for the ZeRO stage, which the Reference does not read
    params, losses = reference_run(G, GLOBAL_MB, STEPS, before_step=evaluate)
    return params, losses, evals[0]


def _by_stage(ranks):
    return {s: [r for r in ranks if r["stage"] == s] for s in range(G)}


def _full_params(ranks, replica=0):
    """One replica's parameters, all stages together."""
    return {n: p for r in ranks if r["dp_rank"] == replica for n, p in r["params"].items()}


def _assert_params_close(got: dict, want: dict, atol, rtol, what):
    assert set(got) == set(want), what
    worst = max((got[n] - want[n].detach().float()).abs().max().item() for n in got)
    for n in got:
        torch.testing.assert_close(got[n], want[n].detach().float(), atol=atol, rtol=rtol, msg=lambda m: f"{what} {n}: {m}")
    return worst


# ZeRO-0 (DeepSpeed's plain data-parallel all-reduce): --full
@pytest.mark.parametrize("name,optimizer", [("zero1", "DeepSpeedZeroOptimizer"), full("zero0", "AdamW", id="zero0-AdamW")])
def test_2x2_equals_reference(run, name, optimizer):
    """G = 2, D = 2, ZeRO-1 (and 0), fp32 equals the single-process Reference on the full global batch."""
    ranks = [r[name] for r in run("2x2")]
    assert {r["optimizer"] for r in ranks} == {optimizer}
    assert sorted((r["stage"], r["dp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # stage 0: wte and module K (from step 0), wpe and module 1 (from step G); stage 1: one group
    assert sorted(len(r["groups"]) for r in ranks) == [1, 1, 2, 2]
    ref_params, ref_losses, _ = _reference()
    for s, rs in _by_stage(ranks).items():  # replicas of a stage hold the same weights, bit for bit
        for n in rs[0]["params"]:
            assert torch.equal(rs[0]["params"][n], rs[1]["params"][n]), f"stage {s} replicas differ on {n}"
    worst = _assert_params_close(_full_params(ranks), ref_params, 1e-6, 1e-5, "2x2 vs reference")
    for r in ranks:
        if r["stage"] == 0:  # the mean loss over the global batch (reduced over the replicas)
            torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64),
                                       torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-6, atol=0)
        else:
            assert r["losses"] == [None] * STEPS
    print(f"2x2 {name} vs reference: max |param diff| = {worst:.3g}, max loss rel diff = "
          f"{max(abs(a - b) / b for a, b in zip(ranks[0]['losses'], ref_losses)):.3g}")


@pytest.mark.parametrize("name", ["zero1", full("zero0", id="zero0"), "bf16_zero1"])
def test_2x2_collectives_stay_in_data_parallel_group(run, name):
    """During train_batch() the only collectives are over the rank's data-parallel group (its stage)."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    topo = PipeDataParallelTopology(num_pp=G, num_dp=2)
    for rank, r in enumerate(run("2x2")):
        r = r[name]
        dp_group = sorted(topo.filter_match(pipe=r["stage"]))
        assert r["api_calls"], "ZeRO-1 with D = 2 reduces over the replicas: is the recorder blind?"
        bad = [(name, ranks) for name, ranks in r["api_calls"] if ranks != dp_group and ranks != [rank]]
        assert not bad, f"rank {rank} (stage {r['stage']}): collectives outside its data-parallel group {dp_group}: {bad}"


def test_2x2_equals_2x1(run):
    """D = 2 follows the D = 1 run with the same global batch (up to summation order)."""
    two = [r["zero1"] for r in run("2x2")]
    one = [r["zero1"] for r in run("2x1")]
    assert {r["optimizer"] for r in one} == {"DeepSpeedZeroOptimizer"}
    worst = _assert_params_close(_full_params(two), _full_params(one), 1e-6, 1e-5, "2x2 vs 2x1")
    l2, l1 = (next(r for r in rs if r["stage"] == 0)["losses"] for rs in (two, one))
    torch.testing.assert_close(torch.tensor(l2, dtype=torch.float64), torch.tensor(l1, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    print(f"2x2 vs 2x1: max |param diff| = {worst:.3g}")


def test_eval_mid_training_leaves_training_bitwise_unchanged(run):
    for r in run("2x2"):
        plain, evald = r["zero1"], r["zero1_eval"]
        assert plain["losses"] == evald["losses"]
        for n in plain["params"]:
            assert torch.equal(plain["params"][n], evald["params"][n]), n
        if plain["stage"] != 0:
            assert evald["evals"] == [None]
    e = [r["zero1_eval"]["evals"] for r in run("2x2") if r["zero1_eval"]["stage"] == 0]
    assert e[0] == e[1] and len(e[0]) == 1, "both replicas report the same validation loss"
    # the validation loss is the Reference model's, with its weights after EVAL_AT steps, dropout off
    _, _, ref_eval = _reference()
    assert abs(e[0][0] - ref_eval) <= 1e-6 * ref_eval, (e[0][0], ref_eval)


@pytest.mark.parametrize("topology,name,optimizer", [("2x1", "bf16", "BF16_Optimizer"),
                                                     full("2x1", "bf16_zero1", "DeepSpeedZeroOptimizer",
                                                          id="2x1-bf16_zero1-DeepSpeedZeroOptimizer"),
                                                     ("2x2", "bf16_zero1", "DeepSpeedZeroOptimizer")])
def test_bf16_close_to_fp32(run, topology, name, optimizer):
    """bf16 working precision with DeepSpeed's fp32 master weights: finite and close to fp32."""
    ranks = run(topology)
    for r in ranks:
        assert r[name]["optimizer"] == optimizer and r[name]["dtypes"] == ["torch.bfloat16"]
    lb = torch.tensor(next(r[name] for r in ranks if r[name]["stage"] == 0)["losses"], dtype=torch.float64)
    lf = torch.tensor(next(r["zero1"] for r in ranks if r["zero1"]["stage"] == 0)["losses"], dtype=torch.float64)
    assert torch.isfinite(lb).all()
    rel = ((lb - lf).abs() / lf).max().item()
    print(f"{topology} {name}: max loss rel diff to fp32 over {STEPS} steps = {rel:.3g}")
    assert rel < 1e-2, (lb, lf)
    # the replay's stashed inputs and the pending error gradients are in the working precision
    assert all(r[name]["in_flight_dtypes"] == ["torch.bfloat16"] for r in ranks)
    assert all(r["zero1"]["in_flight_dtypes"] == ["torch.float32"] for r in ranks)
    # the weights are bf16; the optimizer's master copy is fp32 (DeepSpeed's wrapper)
    assert all(d == ["torch.float32"] for d in (r[name]["master_dtypes"] for r in ranks))


def test_fp16_is_refused(run):
    for r in run("2x1"):
        assert r["fp16_error"].startswith("fp16.enabled:") and '"bf16": {"enabled": true}' in r["fp16_error"], \
            r["fp16_error"]


def test_param_groups_without_first_step_are_refused(run):
    for r in run("2x1"):
        assert r["groups_error"].startswith("model_parameters:") and "ouroboros_first_step" in r["groups_error"], \
            r["groups_error"]


def test_global_batch_is_independent_of_dp():
    """data.BatchStream: the union over replicas of step t's sequences is the same for D = 1 and 2."""
    from ouroboros_ds.train.data import BatchStream

    tokens = torch.arange(3000) % 251
    steps, mb, B = 5, 2, 8
    def step_rows(D):
        streams = [BatchStream(tokens, 16, mb, B // (mb * D), dp_rank=r, dp_size=D, seed=3) for r in range(D)]
        out = []
        for _ in range(steps):
            rows = [tuple(x.tolist()) for s in streams for _ in range(s.micro_batches) for x in next(s)[0]]
            out.append(sorted(rows))
        return out
    one, two = step_rows(1), step_rows(2)
    assert all(len(set(r)) == B for r in one), "a step's sequences are distinct"
    assert one == two
    assert one[0] != one[1]
