"""The ring's messages under NCCL's rules, on the schedule as data (ouroboros_ds.core.nccl; no torch).

- Every (G, M) of the grid: the engine's op streams (synchronous steps, the switch to the ring,
  the ring's warm-up and steady state, evaluations in between, the shape messages) run under the
  three rules with no mismatch and no deadlock. By default a representative grid; ``--full``: G
  1-16 x M 1-32 (about a minute).
- Negative controls: the order the ring used before (tests/golden/legacy/) deadlocks under the
  rules; its tagged channel, which read each edge's shape at the first wait and posted its
  receives then, hands stage 1 a shape message where it expects an activation (a mismatch); and
  the model itself catches a receive posted out of order and a "receive, then send" on both sides.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from ouroboros_ds.core import nccl as N
from ouroboros_ds.core import schedule as S
from ouroboros_ds.core.simulate import ScheduleError
from ouroboros_ds.core.validate import validate_transport
from ouroboros_ds.core.schedule import replays_batch

LEGACY = Path(__file__).resolve().parents[1] / "golden" / "legacy"
QUICK = [(G, M) for G in (1, 2, 3, 4) for M in (1, 2, 4, 5)] + [(8, 4), (8, 8), (16, 32)]


def grid(full: bool):
    return [(G, M) for G in range(1, 17) for M in range(1, 33)] if full else QUICK


def test_transport_grid(full_grid):
    for G, M in grid(full_grid):
        for sync in (0, 2):
            validate_transport(G, M, sync_steps=sync)


def test_programs_follow_the_schedule():
    """Each rank's op stream toward each peer: what the schedule's SEND/RECV actions say, step by
    step, with the shape messages first on each activation edge (G = 2, M = 2, one ring step)."""
    streams = N.pair_streams(N.ring_programs(2, 2, 1))
    F, B, META = N.ACT, N.GRAD, N.ACT_META
    assert streams[0][1] == [("send", N.Msg(META, 2)), ("send", N.Msg(F, 2, 0, 0)), ("send", N.Msg(F, 2, 0, 1)),
                             ("recv", N.Msg(META, 3)), ("recv", N.Msg(F, 3, 0, 0)), ("recv", N.Msg(F, 3, 0, 1)),
                             ("send", N.Msg(B, 2, 0, 0)), ("send", N.Msg(B, 2, 0, 1))]
    assert streams[1][0] == [(("recv" if op == "send" else "send"), m) for op, m in streams[0][1]]


def _legacy(G, M):
    return S.parse_schedule((LEGACY / f"g{G}_m{M}.txt").read_text())


@pytest.mark.parametrize("G,M", [(2, 1), (2, 4), (3, 2), (4, 3)])
def test_legacy_order_deadlocks(G, M):
    progs = N.ring_programs(G, M, G + 3, plan_of=lambda t, sync: _legacy(G, M), shape_messages=False)
    with pytest.raises(N.TransportError, match="deadlock") as info:
        N.run(progs)
    assert info.value.rank == 0  # module K's input never comes: stage 0 waits in its loss
    with pytest.raises(ScheduleError, match="deadlock"):
        from ouroboros_ds.core.validate import validate
        validate(_legacy(G, M))


def _tagged_channel_programs(G, M, steps):
    """The op streams of the tagged channel the ring used before, tags dropped (as NCCL does): a
    shape message precedes the first message of each (peer, kind: activation or gradient); a
    receive on an edge whose shape is still unknown waits in a queue, and the first wait on that
    edge reads the shape and then posts the queue in order."""
    K = S.num_modules(G)
    progs = [[] for _ in range(G)]
    for s in range(G):
        p, known_in, known_out, queued = progs[s], set(), set(), {}

        def post(src, kind, msg, at):
            if (src, kind) in known_in:
                p.append(N.Op("recv", src, msg, at=at))
            else:
                queued.setdefault((src, kind), []).append(msg)

        def use(src, kind, msg, at, label):
            if msg is not None and (src, kind) not in known_in:
                meta = N.Msg("META_" + kind, 0)
                p.extend([N.Op("recv", src, meta, at=at), N.Op("compute", needs=(meta,), at=at, label="shape")])
                p.extend(N.Op("recv", src, m, at=at) for m in queued.pop((src, kind), []))
                known_in.add((src, kind))
            p.append(N.Op("compute", needs=(msg,) if msg is not None else (), at=at, label=label))

        def send(dst, kind, msg, at):
            if (dst, kind) not in known_out:
                known_out.add((dst, kind))
                p.append(N.Op("send", dst, N.Msg("META_" + kind, 0), at=at))
            p.append(N.Op("send", dst, msg, at=at))

        for t in range(steps):
            for i, a in enumerate(_legacy(G, M)[s]):
                at, k, j = (t, i), a.k, a.mb
                b_recv, b_replay = t + 1 - S.delay(k, G), t - S.delay(k, G)
                if a.kind == S.RECV_F:
                    post(S.stage_of(k - 1, G), "F", N.Msg(N.ACT, k, t, j), at)
                elif a.kind == S.RECV_B and replays_batch(b_recv, False, 0):
                    post(S.stage_of(k + 1, G), "B", N.Msg(N.GRAD, k, b_recv, j), at)
                elif a.kind == S.SEND_F:
                    send(S.stage_of(k + 1, G), "F", N.Msg(N.ACT, k + 1, t, j), at)
                elif a.kind == S.SEND_B and (k == K or replays_batch(b_replay, False, 0)):
                    send(S.stage_of(k - 1, G), "B", N.Msg(N.GRAD, k - 1, t if k == K else b_replay, j), at)
                elif a.kind in (S.F, S.L) and k > 1:
                    use(S.stage_of(k - 1, G), "F", N.Msg(N.ACT, k, t, j), at, str(a))
                elif a.kind == S.B and replays_batch(b_replay, False, 0):
                    use(S.stage_of(k + 1, G), "B", N.Msg(N.GRAD, k, b_replay, j), at, str(a))
    return progs


def test_tagged_channel_mismatches():
    """G = 2, M = 4: in step 1 stage 1 posts the step's activation receives at once (that edge's
    shape is known), while stage 0 sends the gradient edge's shape message first: it lands in an
    activation's buffer, as the tagged channel did at step 1 without tags."""
    with pytest.raises(N.TransportError, match="mismatch") as info:
        N.run(_tagged_channel_programs(2, 4, 4))
    assert info.value.rank == 1 and info.value.at[0] == 1 and "gets META_B" in info.value.reason


def test_model_catches_out_of_order_and_recv_then_send():
    m1, m2 = N.Msg(N.ACT, 2, 0, 0), N.Msg(N.ACT, 2, 0, 1)
    swapped = [[N.Op("send", 1, m1), N.Op("send", 1, m2)], [N.Op("recv", 0, m2), N.Op("recv", 0, m1)]]
    with pytest.raises(N.TransportError, match="mismatch"):
        N.run(swapped)
    a, b = N.Msg(N.ACT, 2, 0, 0), N.Msg(N.GRAD, 1, 0, 0)
    recv_first = [[N.Op("recv", 1, b), N.Op("send", 1, a)], [N.Op("recv", 0, a), N.Op("send", 0, b)]]
    with pytest.raises(N.TransportError, match="deadlock"):
        N.run(recv_first)
    fine = [[N.Op("send", 1, a), N.Op("recv", 1, b)], [N.Op("recv", 0, a), N.Op("send", 0, b)]]
    N.run(fine)
