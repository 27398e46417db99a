"""NCCL's point-to-point rules on gloo (``tests/nccl_emulation.py``): the suite's ranks run under them.

On GPUs messages go through NCCL, which ignores tags, runs each communicator's operations in
issue order and may hold a send until the peer reaches its receive; gloo forgives all three.
These tests pin that the emulation is on where the suite trains, that it enforces each rule
(and reports a deadlock instead of hanging), that DeepSpeed's stock pipelines (1F1B, DualPipeV) train under it
exactly as without it, and that it breaks what NCCL would break: the ring's old tagged channel.
"""
from __future__ import annotations

import datetime
import os
import time

import pytest
import torch

from helpers import FULL, P2P_OPS, C10dRecorder, run_ranks, run_train, train_env

DEADLOCK_WAIT = 2.0  # seconds a wait() may block in the deadlock tests before the emulation reports it
SCRATCH_TIMEOUT = 5  # gloo's timeout of a group a test deadlocks on purpose: its stuck operations end then


def _scratch_group():
    """A group of both ranks for a test that deadlocks on purpose: its stuck operations end at gloo's
    timeout of that group, and no other test's traffic shares it."""
    import torch.distributed as tdist

    return tdist.new_group([0, 1], timeout=datetime.timedelta(seconds=SCRATCH_TIMEOUT))


def _drop(group):
    import nccl_emulation
    import torch.distributed as tdist

    nccl_emulation.discard(group, settle=SCRATCH_TIMEOUT + 30)
    tdist.destroy_process_group(group)


# ------------------------------------------------------------------ on by default
def job_installed(rank):
    import deepspeed.comm as dscomm
    import nccl_emulation
    import torch.distributed as tdist
    from torch.distributed import distributed_c10d

    assert nccl_emulation.installed()
    for name in ("isend", "irecv", "send", "recv", "batch_isend_irecv"):
        assert getattr(tdist, name) is getattr(nccl_emulation, name), name
        assert getattr(distributed_c10d, name) is getattr(nccl_emulation, name), name
    # DeepSpeed's comm API (what its pipeline engines call) goes through the emulation
    nccl_emulation.clear_issued()
    peer = 1 - rank
    x = torch.full((3, 2), 7.0) if rank == 0 else torch.zeros(3, 2)
    with C10dRecorder() as c10d:  # the streams' workers run under the modes active where an op is issued
        if rank == 0:
            dscomm.send(x, 1)
        else:
            dscomm.recv(x, 0)
    assert c10d.ops and set(c10d.ops) <= P2P_OPS, c10d.ops
    got, back = torch.zeros(4, dtype=torch.int64), torch.full((4,), rank, dtype=torch.int64)
    ops = [dscomm.P2POp(dscomm.irecv, got, peer), dscomm.P2POp(dscomm.isend, back, peer)]
    for req in dscomm.batch_isend_irecv(ops):
        req.wait()
    assert x.eq(7.0).all() and got.eq(peer).all()
    record = nccl_emulation.issued()
    assert record[("pair", "WORLD", peer)] == [(peer, "send" if rank == 0 else "recv", (3, 2), torch.float32)]
    assert record[("batch", "WORLD")] == [(peer, "recv", (4,), torch.int64), (peer, "send", (4,), torch.int64)]

    # P2POps made with torch's own functions before install() and with the emulation's after it both
    # run batched under the emulation; install() again changes nothing
    nccl_emulation.uninstall()
    assert tdist.isend is not nccl_emulation.isend
    bufs = [torch.zeros(2) for _ in range(2)]
    before = [tdist.P2POp(tdist.isend, torch.full((2,), 1.0 + rank), peer), tdist.P2POp(tdist.irecv, bufs[0], peer)]
    nccl_emulation.install()
    nccl_emulation.install()
    assert tdist.isend is nccl_emulation.isend and distributed_c10d.isend is nccl_emulation.isend
    after = [tdist.P2POp(tdist.irecv, bufs[1], peer), tdist.P2POp(tdist.isend, torch.full((2,), 3.0 + rank), peer)]
    nccl_emulation.clear_issued()
    for ops in (before, after):
        works = tdist.batch_isend_irecv(ops)
        assert len(works) == 1  # one work per batch, as on NCCL
        works[0].wait()
        assert works[0].is_completed() and works[0].is_success()
    assert bufs[0].eq(1.0 + peer).all() and bufs[1].eq(3.0 + peer).all(), bufs
    assert len(nccl_emulation.issued()[("batch", "WORLD")]) == 4


def test_installed_in_pool_ranks_and_covers_deepspeed(tmp_path):
    run_ranks(job_installed, 2, tmpdir=str(tmp_path), timeout=120)


# ------------------------------------------------------------------ rule 1: no tags
def _two_tagged(rank):
    """Rank 0 sends a (tag 1) then b (tag 2); rank 1 posts tag 2 then tag 1. Rank 1 returns
    (tag-1 buffer, tag-2 buffer)."""
    import torch.distributed as tdist

    a, b = torch.arange(4.0), torch.arange(4.0) + 10
    if rank == 0:
        for w in [tdist.isend(a, 1, tag=1), tdist.isend(b, 1, tag=2)]:
            w.wait()
        return None
    buf1, buf2 = torch.zeros(4), torch.zeros(4)
    works = [tdist.irecv(buf2, 0, tag=2), tdist.irecv(buf1, 0, tag=1)]
    for w in works:
        w.wait()
    return buf1, buf2


def job_tags_ignored(rank):
    import nccl_emulation
    import torch.distributed as tdist

    a, b = torch.arange(4.0), torch.arange(4.0) + 10
    got = _two_tagged(rank)
    if rank == 1:  # posting order decides: a lands in the buffer posted first (tag 2's)
        assert torch.equal(got[1], a) and torch.equal(got[0], b), got
    nccl_emulation.uninstall()
    try:  # plain gloo matches by tag
        got = _two_tagged(rank)
    finally:
        nccl_emulation.install()
    if rank == 1:
        assert torch.equal(got[0], a) and torch.equal(got[1], b), got

    # a size mismatch is an error in wait() on both ranks, naming the pair and the operation
    with pytest.raises(RuntimeError) as err:
        if rank == 0:
            tdist.isend(torch.ones(4), 1, tag=5).wait()
        else:
            tdist.irecv(torch.zeros(5), 0, tag=5).wait()
    text = str(err.value)
    assert "NCCL emulation" in text and "size mismatch" in text, text
    assert ("send to rank 1 (4,)" if rank == 0 else "recv from rank 0 (5,)") in text, text
    assert "(4,) float32, 16 bytes" in text and "(5,) float32, 20 bytes" in text, text
    # no data moved: the pair is still in step
    x = torch.full((2,), 3.0) if rank == 0 else torch.zeros(2)
    (tdist.send if rank == 0 else tdist.recv)(x, 1 - rank)
    assert x.eq(3.0).all()


def test_tags_are_ignored_and_sizes_checked(tmp_path):
    run_ranks(job_tags_ignored, 2, tmpdir=str(tmp_path), timeout=120)


# ------------------------------------------------------------------ rules 2 and 3: streams, rendezvous
def job_deadlocks(rank, out):
    import nccl_emulation
    import torch.distributed as tdist

    peer, report = 1 - rank, {}
    old = nccl_emulation.set_timeout(DEADLOCK_WAIT)
    try:
        # each scenario on a group of its own; both issued before either is waited on
        g_recv_first, g_send_first = _scratch_group(), _scratch_group()
        recv_first = [tdist.irecv(torch.zeros(3), peer, group=g_recv_first),
                      tdist.isend(torch.ones(3), peer, group=g_recv_first)]
        send_first = [tdist.isend(torch.ones(5), peer, group=g_send_first),
                      tdist.irecv(torch.zeros(5), peer, group=g_send_first)]
        for name, works in (("recv first", recv_first), ("send first", send_first)):
            start = time.monotonic()
            try:
                for w in works:
                    w.wait()
                report[name] = None
            except RuntimeError as e:
                report[name] = (str(e), time.monotonic() - start)
        _drop(g_recv_first)
        _drop(g_send_first)
    finally:
        nccl_emulation.set_timeout(old)
    # both operations of each side in one batch: no deadlock
    got, mine = torch.zeros(3), torch.full((3,), float(rank))
    for w in tdist.batch_isend_irecv([tdist.P2POp(tdist.irecv, got, peer), tdist.P2POp(tdist.isend, mine, peer)]):
        w.wait()
    report["batch"] = got.tolist()
    # send first on rank 0, receive first on rank 1: no deadlock
    got, mine = torch.zeros(2), torch.full((2,), float(rank))
    ops = [(tdist.isend, mine), (tdist.irecv, got)]
    works = [op(t, peer) for op, t in (ops if rank == 0 else ops[::-1])]
    for w in works:
        w.wait()
    report["send/recv"] = got.tolist()
    torch.save(report, os.path.join(out, f"rank{rank}.pt"))


def test_head_of_line_blocking_and_rendezvous(tmp_path):
    run_ranks(job_deadlocks, 2, str(tmp_path), tmpdir=str(tmp_path), timeout=180)
    for rank in range(2):
        r, peer = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False), 1 - rank
        for name, first, then in (("recv first", "recv from", "send to"), ("send first", "send to", "recv from")):
            assert r[name] is not None, f"rank {rank}, {name}: no deadlock reported"
            text, seconds = r[name]
            assert text.startswith("NCCL emulation"), text
            assert f"rank {rank} waited" in text and f"{first} rank {peer}" in text, text
            # the pending operations of the stream: the running one, and the one queued behind it
            stream = next(line for line in text.splitlines() if line.strip().startswith("pair stream"))
            assert f"{first} rank {peer}" in stream and f"{then} rank {peer}" in stream and "[queued]" in stream, text
            assert seconds < DEADLOCK_WAIT + 10, seconds
        assert r["batch"] == [float(peer)] * 3
        assert r["send/recv"] == [float(peer)] * 2


def job_streams_apart(rank, out):
    """A batched send is not received by a single irecv: they are on different communicators."""
    import nccl_emulation
    import torch.distributed as tdist

    peer, old = 1 - rank, nccl_emulation.set_timeout(DEADLOCK_WAIT)
    g = _scratch_group()
    try:
        if rank == 0:
            works = tdist.batch_isend_irecv([tdist.P2POp(tdist.isend, torch.ones(2), peer, group=g)])
        else:
            works = [tdist.irecv(torch.zeros(2), peer, group=g)]
        try:
            for w in works:
                w.wait()
            result = None
        except RuntimeError as e:
            result = str(e)
        _drop(g)
    finally:
        nccl_emulation.set_timeout(old)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def test_batched_and_single_messages_never_match(tmp_path):
    run_ranks(job_streams_apart, 2, str(tmp_path), tmpdir=str(tmp_path), timeout=120)
    sent, received = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert sent is not None and "batch stream" in sent and "send to rank 1" in sent, sent
    assert received is not None and "pair stream" in received and "recv from rank 0" in received, received


# ------------------------------------------------------------------ control: DeepSpeed's stock pipelines
def _stock_losses(schedule: str, steps: int = 3, M: int = 4) -> list:
    """Per-step losses of DeepSpeed's own engine on a tiny MLP over 2 stages: ``"1f1b"``
    (``PipelineModule``: blocking send/recv) or ``"dualpipev"`` (``DualPipeVModule``:
    ``batch_isend_irecv``, M >= 2G)."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.dualpipev import DualPipeVModule

    torch.manual_seed(0)
    layers = [LayerSpec(torch.nn.Linear, 8, 16), LayerSpec(torch.nn.Tanh)]
    layers += [LayerSpec(torch.nn.Linear, 16, 16), LayerSpec(torch.nn.Tanh)] * 3 + [LayerSpec(torch.nn.Linear, 16, 4)]
    cls = DualPipeVModule if schedule == "dualpipev" else PipelineModule
    module = cls(layers=layers, num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": M, "steps_per_print": 10 ** 6,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()), config=config)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)) for _ in range(steps * M)]
    it = iter(data)
    return [engine.train_batch(it).item() for _ in range(steps)]


def job_stock(rank, out, schedule):
    import nccl_emulation

    nccl_emulation.uninstall()
    try:
        plain = _stock_losses(schedule)
    finally:
        nccl_emulation.install()
    nccl_emulation.clear_issued()
    emulated = _stock_losses(schedule)
    record = nccl_emulation.issued()
    torch.save({"plain": plain, "emulated": emulated, "record": record}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_stock_pipeline_trains_the_same_under_the_emulation(tmp_path, schedule):
    """The control: DeepSpeed's own engines keep to NCCL's rules, and the emulation changes no number."""
    run_ranks(job_stock, 2, str(tmp_path), schedule, tmpdir=str(tmp_path), timeout=300)
    for rank in range(2):
        r, peer = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False), 1 - rank
        assert r["emulated"] == r["plain"], r  # bit for bit
        # the pipeline's traffic went through the emulation: activations one way, gradients the
        # other, 3 steps x M = 4 (DualPipeV: both phases)
        stream = ("pair", "WORLD", peer) if schedule == "1f1b" else ("batch", "WORLD")
        data = [op for op in r["record"][stream] if op.dtype == torch.float32 and op.shape == (2, 16)]
        assert len(data) == 2 * 3 * 4 * (2 if schedule == "dualpipev" else 1), r["record"]
        assert {op.op for op in data} == {"send", "recv"}


@FULL  # the control in-process: test_stock_pipeline_trains_the_same_under_the_emulation[1f1b]
def test_train_py_1f1b_runs_under_the_emulation(tmp_path):
    log = tmp_path / "emulation.log"
    r = run_train(["--schedule", "1f1b", "--steps", "3", "--seq-len", "32", "--max-bytes", "100000",
                   "--eval-every", "0", "--eval-batches", "2", "--no-progress"],
                  env=train_env(OUROBOROS_NCCL_EMULATION_LOG=str(log)), cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = log.read_text().splitlines()
    # each rank installed it at start-up and sent its pipeline traffic through it
    for rank in ("0", "1"):
        assert f"rank={rank}" in "".join(x for x in lines if x.startswith("installed")), lines
        done = [x for x in lines if x.startswith("exit") and f"rank={rank} " in x]
        assert len(done) == 1 and int(done[0].split("emulated_ops=")[1].split()[0]) > 0, lines


# ------------------------------------------------------------------ negative control: the old tagged channel
ACT_SHAPE = (2, 8, 16)  # (micro-batch, sequence, width): a ring activation


def _value(kind: str, t: int, mb: int) -> torch.Tensor:
    """What each message of the pattern carries, so a receiver can tell it got the right one."""
    base = {"act 1->2": 1000, "act 2->3": 2000, "grad 3->2": 3000, "grad 2->1": 4000}[kind]
    return torch.full(ACT_SHAPE, float(base + 10 * t + mb))


def _ring_pattern(rank, channel, steps: int = 3, M: int = 2) -> int:
    """The messages of G = 2 ring steps, in the order ``ouroboros_ds/pipe/engine.py``'s ``_exec_ring_*``
    issues them (stage 0 holds modules 1 and 3, stage 1 module 2; module k replays batch
    t - (3 - k)). Checks every received tensor; returns how many were checked."""
    import tagged_channel as P

    checked, grads_in = 0, {}

    def expect(entry, kind, t, mb):
        nonlocal checked
        got = channel.wait(entry)
        assert torch.equal(got, _value(kind, t, mb)), f"rank {rank}: {kind} of ({t}, {mb}) holds {got.flatten()[0]}"
        checked += 1

    for t in range(steps):
        if rank == 0:
            acts3 = [channel.irecv(1, P.tag(P.ACT, 3, j), P.ACT) for j in range(M)]  # 3RECV_Fj
            for j in range(M):  # 1LOADj 1Fj 1SEND_Fj 1RECV_Bj (for batch t - 1, replayed next step)
                channel.isend(_value("act 1->2", t, j), 1, P.tag(P.ACT, 2, j), P.ACT)
                if t >= 1:
                    grads_in[(t - 1, j)] = channel.irecv(1, P.tag(P.GRAD, 1, j), P.GRAD)
            for j in range(M):  # 1Bj: batch t - 2
                if t >= 2:
                    expect(grads_in.pop((t - 2, j)), "grad 2->1", t - 2, j)
            for j in range(M):  # 3Lj 3SEND_Bj
                expect(acts3[j], "act 2->3", t, j)
                channel.isend(_value("grad 3->2", t, j), 1, P.tag(P.GRAD, 2, j), P.GRAD)
        else:
            acts2 = [channel.irecv(0, P.tag(P.ACT, 2, j), P.ACT) for j in range(M)]  # 2RECV_Fj
            for j in range(M):  # 2Fj 2SEND_Fj 2RECV_Bj (for batch t, replayed next step)
                expect(acts2[j], "act 1->2", t, j)
                channel.isend(_value("act 2->3", t, j), 0, P.tag(P.ACT, 3, j), P.ACT)
                grads_in[(t, j)] = channel.irecv(0, P.tag(P.GRAD, 2, j), P.GRAD)
            for j in range(M):  # 2Bj 2SEND_Bj: batch t - 1
                if t >= 1:
                    expect(grads_in.pop((t - 1, j)), "grad 3->2", t - 1, j)
                    channel.isend(_value("grad 2->1", t - 1, j), 0, P.tag(P.GRAD, 1, j), P.GRAD)
        channel.end_step()
    for entry in grads_in.values():  # received already: the next step's replays would use them
        channel.wait(entry)
    channel.settle()
    return checked


def job_tagged_channel(rank, out, emulated: bool):
    import nccl_emulation
    import tagged_channel

    result, old = None, nccl_emulation.set_timeout(DEADLOCK_WAIT + 1)
    if not emulated:
        nccl_emulation.uninstall()
    group = _scratch_group()
    try:
        channel = tagged_channel.RingChannel(torch.device("cpu"), peer=lambda stage: stage, group=group)
        try:
            result = ("completed", _ring_pattern(rank, channel))
        except (RuntimeError, AssertionError) as e:
            result = ("failed", f"{type(e).__name__}: {e}")
        _drop(group)
    finally:
        nccl_emulation.set_timeout(old)
        nccl_emulation.install()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("emulated", [False, True], ids=["plain_gloo", "nccl_rules"])
def test_old_tagged_channel_works_on_gloo_and_breaks_under_nccl_rules(tmp_path, emulated):
    run_ranks(job_tagged_channel, 2, str(tmp_path), emulated, tmpdir=str(tmp_path), timeout=180)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    if not emulated:  # every message arrives where its tag says, with the right data
        assert results == [("completed", 6 + 2), ("completed", 6 + 4)], results
        return
    assert all(status == "failed" for status, _ in results), results
    texts = [text for _, text in results]
    assert all("NCCL emulation" in text for text in texts), texts
    # the first thing to go wrong: an activation's receive matched the gradient edge's shape handshake
    assert any("size mismatch" in text and "(8,) int64" in text for text in texts), texts
