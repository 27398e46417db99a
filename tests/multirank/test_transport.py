"""The engine issues exactly the op streams that the transport model proves (ouroboros_ds.core.nccl).

Each rank records every send and receive of its ring channel, in issue order, with the message it
carries (``RingChannel.trace``), over a run with a synchronous step, the switch to the ring, the
ring's warm-up and steady state, and evaluations after the first and the last step. Per rank and
per peer the recording equals ``nccl.pair_streams(nccl.ring_programs(...))``, the streams that
``validate_transport`` runs under NCCL's rules; so what the model proves is what runs. G = 2, 3, 4
(features replay; G = 2 also stash replay with the default mitigations).
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers import batches, ds_config, ring_engine, run_ranks

SYNC, M = 1, 4
EVALS = (3, 2)  # micro-batches of the evaluation after the first step, and after the last


def steps_of(G):
    return SYNC + G + 2


def _worker(rank, G, options, out):
    from ouroboros_ds.core import nccl as N

    steps = steps_of(G)
    engine, _ = ring_engine(G, ds_config(M, steps), sync_steps=SYNC, **options)
    engine.p2p.trace = []
    data = batches(steps, M)
    it = iter([mb for step in data for mb in step]) if engine.stage_id == 0 else None
    for t in range(steps):
        engine.train_batch(it)
        if t in (0, steps - 1):
            n = EVALS[0] if t == 0 else EVALS[1]
            engine.eval_batch(iter(data[0] * 2) if engine.stage_id == 0 else None, num_micro_batches=n)
    got: dict = {}
    for peer, op, msg in engine.p2p.trace:
        got.setdefault(peer, []).append((op, msg))
    want = N.pair_streams(N.ring_programs(G, M, steps, sync_steps=SYNC, evals={0: EVALS[0], steps - 1: EVALS[1]}))
    torch.save({"got": got, "want": want[engine.stage_id]}, os.path.join(out, f"rank{rank}.pt"))


CASES = {"G2": (2, {}), "G3": (3, {}), "G4": (4, {}),
         "G2-stash-default": (2, {"replay": "stash", "weight_prediction": 1.0, "lookahead": "auto",
                                  "stage_clip": "split"})}


@pytest.mark.parametrize("case", CASES)
def test_engine_issues_the_modelled_streams(tmp_path, case):
    G, options = CASES[case]
    run_ranks(_worker, G, G, options, str(tmp_path), tmpdir=str(tmp_path), timeout=300)
    for r in range(G):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert set(res["got"]) == set(res["want"]), f"rank {r}: peers differ"
        for peer, stream in res["want"].items():
            got = res["got"][peer]
            first = next((i for i, (a, b) in enumerate(zip(got, stream)) if a != b), min(len(got), len(stream)))
            assert got == stream, (f"rank {r} toward stage {peer}: op {first} is {got[first:first + 1]}, the model "
                                   f"has {stream[first:first + 1]} ({len(got)} vs {len(stream)} ops)")
