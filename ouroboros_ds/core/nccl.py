"""The ring's messages under NCCL's point-to-point rules, as data: pure Python, no torch.

On GPUs PyTorch sends point-to-point messages through NCCL, whose rules decide whether a pipeline
runs at all (docs/ring.md#transport):

1. *No tags.* Between two ranks, messages match in the order they are posted, per direction.
2. *One stream per pair, in issue order.* A rank's single sends and receives toward one peer run
   one after the other on that pair's stream: a receive issued early holds up every later op
   toward the same peer until its message arrives.
3. *A send may wait for its receive.* A send completes only together with its receive, once both
   are at the head of their streams (rendezvous).

A rank's host issues its program in order. Communication never blocks the host, but a compute op
waits for the receives whose data it uses, and NCCL starts an op only after the compute issued
before it (it orders the communication stream behind the compute stream), so everything issued
after a blocked compute waits too: the host's order is the order that matters.

:func:`ring_programs` derives each rank's program from the schedule (:mod:`ouroboros_ds.core.schedule`)
for a run of steps, synchronous and ring, with evaluations between them, exactly as the engine
issues it (:mod:`ouroboros_ds.pipe.p2p`: the first activation on an edge is preceded by a shape message
that the receiver reads before it posts the edge's receives). :func:`run` executes programs under
the three rules: every receive must get the message meant for it (else :class:`TransportError`,
``mismatch``), and every program must finish (else ``deadlock``); with costs it returns when each
compute op ran, which is what the simulator's timeline is made of.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from . import schedule as S
from .schedule import replays_batch

# Message kinds: an activation into module k, the error gradient dL/d(output of module k), an
# evaluation activation into module k, and the shape message that precedes an edge's first
# activation (``batch`` is the step, or the evaluation's number; ``mb`` the micro-batch).
ACT, GRAD, EVAL, ACT_META, EVAL_META = "F", "B", "E", "F_META", "E_META"


@dataclass(frozen=True)
class Msg:
    """One message's identity: what a receive is posted for and what a send carries."""

    kind: str
    k: int
    batch: int = -1
    mb: int = -1

    def __str__(self) -> str:
        return f"{self.kind}(k={self.k}, batch={self.batch}, mb={self.mb})"


@dataclass(frozen=True)
class Op:
    """One issued op of a rank's program. ``kind``: ``send`` / ``recv`` (toward ``peer``, carrying
    ``msg``), ``compute`` (waits for the receives of ``needs``, then runs ``cost`` seconds; ``label``
    is the schedule action), ``wait_sends`` (the host waits until its sends of step ``batch``
    completed: the engine's end-of-step release of the previous step's sends). ``at``: (step,
    action index) in the schedule, for error messages; step -1 - e for evaluation e."""

    kind: str
    peer: int = -1
    msg: Msg | None = None
    needs: tuple = ()
    cost: float = 0.0
    label: str = ""
    at: tuple = (0, 0)
    batch: int = 0


class TransportError(Exception):
    """Programs that cannot run under NCCL's rules: ``what`` is ``mismatch`` or ``deadlock``,
    ``rank`` and ``at`` (step, action index) name the op where it shows."""

    def __init__(self, what: str, rank: int, at: tuple, reason: str):
        self.what, self.rank, self.at, self.reason = what, rank, at, reason
        super().__init__(f"{what} on rank {rank} at step {at[0]}, action {at[1]}: {reason}")


@dataclass
class Run:
    """When each compute op ran: ``events[r]`` lists (op, start, end) of rank r, in program order."""

    events: list


# ------------------------------------------------------------------ programs from the schedule
def ring_programs(stages: int, micro_batches: int, steps: int, sync_steps: int = 0, evals: dict | None = None,
                  plan_of=None, cost_of=None, shape_messages: bool = True) -> list[list[Op]]:
    """Each stage's program for ``steps`` consecutive steps as the engine issues them.

    Step t runs the synchronous list while ``t < sync_steps``, else the ring list
    (``plan_of(t, synchronous)`` overrides the plan, e.g. a schedule under test). ``evals`` maps a
    step t to the number of micro-batches of an evaluation run after it. ``cost_of(action, t,
    synchronous)`` prices each compute op (default 0). ``shape_messages=False``: every edge's shape
    is known in advance (no shape message), to check an order on its own."""
    G, M, K = stages, micro_batches, S.num_modules(stages)
    plan_of = plan_of or (lambda t, sync: S.ouroboros_schedule(G, M, synchronous=sync))
    cost_of = cost_of or (lambda a, t, sync: 0.0)
    evals = evals or {}
    progs: list[list[Op]] = [[] for _ in range(G)]
    known_in: set = set() if shape_messages else None   # (stage, k): activation edges into module k whose shape was read
    known_out: set = set() if shape_messages else None  # (stage, k): activation edges out of which the shape was sent
    n_eval = 0
    for t in range(steps):
        sync = t < sync_steps
        plan = plan_of(t, sync)
        for s in range(G):
            p = progs[s]
            for i, a in enumerate(plan[s]):
                at, k, j = (t, i), a.k, a.mb
                if a.kind == S.RECV_F:
                    src = S.stage_of(k - 1, G)
                    if known_in is not None and (s, k) not in known_in:  # read the edge's shape first: a blocking receive
                        known_in.add((s, k))
                        meta = Msg(ACT_META, k)
                        p += [Op("recv", src, meta, at=at), Op("compute", needs=(meta,), label="shape", at=at)]
                    p.append(Op("recv", src, Msg(ACT, k, t, j), at=at))
                elif a.kind == S.SEND_F:
                    dst = S.stage_of(k + 1, G)
                    if known_out is not None and (s, k + 1) not in known_out:
                        known_out.add((s, k + 1))
                        p.append(Op("send", dst, Msg(ACT_META, k + 1), at=at))
                    p.append(Op("send", dst, Msg(ACT, k + 1, t, j), at=at))
                elif a.kind == S.RECV_B:
                    b = t if sync else t + 1 - S.delay(k, G)
                    if replays_batch(b, sync, sync_steps):
                        p.append(Op("recv", S.stage_of(k + 1, G), Msg(GRAD, k, b, j), at=at))
                elif a.kind == S.SEND_B:
                    b = t - S.delay(k, G, sync)
                    if k == K or replays_batch(b, sync, sync_steps):
                        p.append(Op("send", S.stage_of(k - 1, G), Msg(GRAD, k - 1, b, j), at=at))
                elif a.kind in (S.F, S.L):
                    remote = G > 1 and k > 1
                    p.append(Op("compute", needs=(Msg(ACT, k, t, j),) if remote else (), cost=cost_of(a, t, sync),
                                label=str(a), at=at))
                elif a.kind == S.B:
                    b = t - S.delay(k, G, sync)
                    remote = S.stage_of(k + 1, G) != s
                    needs = (Msg(GRAD, k, b, j),) if remote and replays_batch(b, sync, sync_steps) else ()
                    p.append(Op("compute", needs=needs, cost=cost_of(a, t, sync), label=str(a), at=at))
                elif a.kind == S.STEP:
                    p.append(Op("compute", cost=cost_of(a, t, sync), label=str(a), at=at))
                    p.append(Op("wait_sends", batch=t - 1, at=at))  # the engine's end of step
        if t in evals:
            _eval_programs(progs, G, evals[t], n_eval)
            n_eval += 1
    return progs


def _eval_programs(progs, G: int, n: int, e: int) -> None:
    """One evaluation of ``n`` micro-batches (engine.eval_batch): each local module in ring order
    posts all its receives (after the call's shape message), then forwards and sends each
    micro-batch; at the end the host waits for its sends."""
    K = S.num_modules(G)
    for s in range(G):
        p, at = progs[s], (-1 - e, 0)
        for k in S.modules_of(s, G):
            src, dst = S.stage_of(max(k - 1, 1), G), S.stage_of(min(k + 1, K), G)
            remote_in = k > 1 and src != s
            if remote_in:
                meta = Msg(EVAL_META, k, e)
                p += [Op("recv", src, meta, at=at), Op("compute", needs=(meta,), label="shape", at=at)]
                p += [Op("recv", src, Msg(EVAL, k, e, j), at=at) for j in range(n)]
            for j in range(n):
                p.append(Op("compute", needs=(Msg(EVAL, k, e, j),) if remote_in else (), label=f"{k}E{j}", at=at))
                if k < K and dst != s:
                    if j == 0:
                        p.append(Op("send", dst, Msg(EVAL_META, k + 1, e), at=at))
                    p.append(Op("send", dst, Msg(EVAL, k + 1, e, j), at=at))
        p.append(Op("wait_sends", batch=-1 - e, at=at))


def pair_streams(programs: list[list[Op]]) -> list[dict]:
    """Per rank, per peer: the (``send``/``recv``, message) sequence it issues toward that peer,
    which is what the engine's channel records (``RingChannel.trace``)."""
    out = []
    for prog in programs:
        d: dict = {}
        for op in prog:
            if op.kind in ("send", "recv"):
                d.setdefault(op.peer, []).append((op.kind, op.msg))
        out.append(d)
    return out


# ------------------------------------------------------------------ execution under the rules
def run(programs: list[list[Op]], latency: float = 0.0) -> Run:
    """Execute ``programs`` under NCCL's rules; raise :class:`TransportError` on a receive that
    would get another message than its own, or when no rank can move and some have ops left."""
    R = len(programs)
    pc, clock = [0] * R, [0.0] * R
    streams = {(r, p): deque() for r in range(R) for p in range(R) if p != r}
    free = {key: 0.0 for key in streams}            # when the pair stream's last op completed
    received: list[dict] = [{} for _ in range(R)]   # msg -> completion time of its receive
    unsent: list[dict] = [{} for _ in range(R)]     # step -> ids of that step's sends not yet complete
    sent_at: list[dict] = [{} for _ in range(R)]    # step -> when that step's last completed send completed
    events: list[list] = [[] for _ in range(R)]

    def step_of(op):
        return op.at[0]

    while True:
        moved = False
        for r in range(R):  # each host issues as far as it can
            prog = programs[r]
            while pc[r] < len(prog):
                op = prog[pc[r]]
                if op.kind in ("send", "recv"):
                    if op.peer == r or not 0 <= op.peer < R:
                        raise TransportError("mismatch", r, op.at, f"{op.kind} of {op.msg} to rank {op.peer}: "
                                             f"no such peer")
                    streams[(r, op.peer)].append((op, clock[r]))
                    if op.kind == "send":
                        unsent[r].setdefault(step_of(op), set()).add(id(op))
                elif op.kind == "compute":
                    if any(m not in received[r] for m in op.needs):
                        break
                    start = max([clock[r]] + [received[r][m] for m in op.needs])
                    clock[r] = start + op.cost
                    events[r].append((op, start, clock[r]))
                elif op.kind == "wait_sends":
                    if unsent[r].get(op.batch):
                        break
                    clock[r] = max(clock[r], sent_at[r].get(op.batch, 0.0))
                pc[r] += 1
                moved = True
        for (a, b), qa in streams.items():  # match the heads of each pair's two streams
            if a > b:
                continue
            qb = streams[(b, a)]
            while qa and qb:
                (oa, ta), (ob, tb) = qa[0], qb[0]
                if oa.kind == ob.kind:
                    break  # both send or both receive: each waits for the other
                (snd, sr), (rcv, rr) = ((oa, a), (ob, b)) if oa.kind == "send" else ((ob, b), (oa, a))
                if snd.msg != rcv.msg:
                    n = sum(1 for o in programs[rr][:pc[rr]] if o.kind == "recv" and o.peer == sr
                            and received[rr].get(o.msg) is not None)
                    raise TransportError("mismatch", rr, rcv.at, f"its receive #{n} from rank {sr} is posted for "
                                         f"{rcv.msg} but gets {snd.msg} (messages between two ranks match in "
                                         f"posting order)")
                end = max(ta, tb, free[(a, b)], free[(b, a)]) + latency
                free[(a, b)] = free[(b, a)] = end
                qa.popleft()
                qb.popleft()
                received[rr][rcv.msg] = end
                unsent[sr][step_of(snd)].discard(id(snd))
                sent_at[sr][step_of(snd)] = max(sent_at[sr].get(step_of(snd), 0.0), end)
                moved = True
        if not moved:
            break
    if all(pc[r] == len(programs[r]) for r in range(R)) and not any(streams.values()):
        return Run(events)
    raise _deadlock(programs, pc, streams)


def _deadlock(programs, pc, streams) -> TransportError:
    R = len(programs)
    for r in range(R):
        if pc[r] < len(programs[r]):
            op = programs[r][pc[r]]
            what = {"compute": lambda: f"{op.label or 'compute'} waits for " + ", ".join(map(str, op.needs)),
                    "wait_sends": lambda: f"the host waits for its sends of step {op.batch}"}[op.kind]()
            heads = []
            for p in range(R):
                q, back = streams.get((r, p)), streams.get((p, r))
                if q or back:
                    mine = f"{q[0][0].kind} {q[0][0].msg}" if q else "nothing"
                    theirs = f"{back[0][0].kind} {back[0][0].msg}" if back else "nothing"
                    heads.append(f"toward rank {p} its stream's head is {mine}, rank {p}'s is {theirs}")
            return TransportError("deadlock", r, op.at, f"{what}, which never comes (no rank can move); "
                                  + "; ".join(heads or ["no message in flight"]))
    r = next(r for r in range(R) for p in range(R) if p != r and streams[(r, p)])
    op = next(q[0][0] for (a, _), q in streams.items() if a == r and q)
    return TransportError("deadlock", r, op.at, f"{op.kind} of {op.msg} never completes: its peer never posts "
                          f"the matching op")
