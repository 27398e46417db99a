"""NCCL's point-to-point rules, emulated on gloo, so that CPU tests catch what only GPUs would show.

On GPUs ``torch.distributed`` point-to-point goes through NCCL, which is stricter than gloo:

1. **No tags.** NCCL ignores ``tag=``: the messages between two ranks match their receives in
   the order both sides post them. gloo matches by tag, so an order mismatch that NCCL turns into
   wrong data or a size error goes unnoticed on gloo.
2. **Streams in issue order.** Single ``isend``/``irecv``/``send``/``recv`` between two ranks run
   on that pair's own communicator and stream (one per process group and peer, both directions);
   ``batch_isend_irecv`` runs on the process group's communicator, on one stream per group, and a
   whole batch progresses as one unit. On a stream each operation starts when the one issued
   before it has finished: a receive issued early holds up everything issued after it until its
   message arrives. Messages on different communicators never match each other (a batched send
   is not received by a single ``irecv``). gloo starts every request at once.
3. **Rendezvous.** A send may wait until the peer has reached the matching receive. Two ranks that
   each issue "receive, then send" to each other deadlock, and so do two that each issue "send,
   then receive", unless each side's two operations are in one batch. gloo lets both go through.

:func:`install` makes gloo process groups behave like this in the calling process: it replaces
``isend``, ``irecv``, ``send``, ``recv`` and ``batch_isend_irecv`` in ``torch.distributed`` and in
``torch.distributed.distributed_c10d``. DeepSpeed looks them up there at every call
(``deepspeed.comm`` calls ``torch.distributed.<name>``, and its ``batch_isend_irecv`` rebuilds
each ``P2POp`` with ``getattr(torch.distributed, op)``), so its pipeline traffic is emulated too.
Groups of other backends, and messages a rank sends to itself, keep torch's own functions.

How it works, per process:

- Each (process group, peer) single-operation stream is a worker thread that runs a FIFO of the
  operations issued to it, in issue order; each group's batched stream is another worker thread.
  The caller's tag is ignored: the emulation uses fixed gloo tags of its own for each kind of
  communicator, so single and batched messages never match each other, and its control messages
  never match data.
- Rendezvous: when a receive reaches the head of its stream, the stream sends the peer a small
  control token (with the receive's size) and waits; a send at the head of its stream waits for
  that token, answers with a header (its own size, and whether the two agree), then sends the
  data. A batch posts the tokens of all its receives at once, and each of its sends goes out as
  soon as its own token arrives (the batch's operations progress together, as NCCL's grouped
  operations do); the batch completes when all are done.
- Sizes are checked by the emulation, before any data moves: a gloo receive of a message larger
  than its buffer aborts the whole process (``Received data size doesn't match expected size`` is
  thrown on gloo's I/O thread), and a smaller one silently fills part of the buffer. A mismatch
  is an error on both ranks, raised by ``wait()``; the streams stay usable.
- ``isend``/``irecv`` return an :class:`EmulatedWork` (``wait``, ``is_completed``,
  ``is_success``, ``exception``, ``result``, ``source_rank``, ``get_future``, ``synchronize``);
  blocking ``send``/``recv`` issue and wait. ``batch_isend_irecv`` returns one work for the whole
  batch, as PyTorch does on NCCL (on gloo it returns one per operation). An error on a worker is
  raised again by ``wait()``, naming the pair and the operation.
- A ``wait()`` that blocks longer than ``OUROBOROS_NCCL_EMULATION_TIMEOUT`` seconds (default
  120; :func:`set_timeout` or ``install(timeout=...)``) raises a ``RuntimeError`` that names the
  NCCL emulation, the rank, the peer and the operation it waits for, and every pending operation
  of this rank's streams: a test that would deadlock on GPUs fails fast and readably instead.
- :func:`issued` reads back, per stream, the operations issued so far (peer, ``"send"`` or
  ``"recv"``, shape, dtype).
- A ``TorchDispatchMode`` active where an operation is issued (a recorder of ``c10d`` ops) is
  active on the worker that runs it too, so it still sees the ``c10d`` sends and receives (the
  emulation's control messages among them).

Not emulated: NCCL's ordering of batched operations with the group's collectives (a collective
issued after a batch runs after it on GPUs), and NCCL's eager completion of small sends (the
emulation always waits for the receiver, the stricter case).

Activation in the tests (``tests/helpers.py``): on unless ``OUROBOROS_NCCL_EMULATION=0``. Spawned
ranks call :func:`install` before any engine is built; ``train.py`` launched by ``torchrun`` or
``deepspeed`` gets it from ``tests/nccl_site/sitecustomize.py``, which ``train_env()`` puts on
``PYTHONPATH``. With ``OUROBOROS_NCCL_EMULATION_LOG=<file>`` every installing process appends a
line when it installs and, at exit, the number of operations it emulated.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import os
import queue
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

ENV = "OUROBOROS_NCCL_EMULATION"
TIMEOUT_ENV = "OUROBOROS_NCCL_EMULATION_TIMEOUT"
LOG_ENV = "OUROBOROS_NCCL_EMULATION_LOG"
DEFAULT_TIMEOUT = 120.0

__all__ = ["ENV", "TIMEOUT_ENV", "LOG_ENV", "enabled", "install", "uninstall", "installed", "set_timeout",
           "issued", "clear_issued", "pending", "discard", "EmulatedWork", "Issued", "isend", "irecv", "send",
           "recv", "batch_isend_irecv"]

# gloo tags of the emulation's own messages, one set per communicator kind: a message of one kind
# never matches a receive of another (the caller's tag plays no part).
_TAGS = {"pair": {"token": 2_000_000_001, "header": 2_000_000_002, "data": 2_000_000_003},
         "batch": {"token": 2_000_000_011, "header": 2_000_000_012, "data": 2_000_000_013}}
_SPEC_LEN = 16   # control message: [status, nbytes, dtype index, ndim, dims...]
_MAX_DIMS = _SPEC_LEN - 4
_READY, _OK, _MISMATCH = 1, 2, 3
_DTYPES = [getattr(torch, n) for n in ("float32", "float64", "float16", "bfloat16", "uint8", "int8", "int16",
                                       "int32", "int64", "bool", "complex64", "complex128", "float8_e4m3fn",
                                       "float8_e5m2", "uint16", "uint32", "uint64") if hasattr(torch, n)]
_RECORD_LEN = 10_000  # operations kept per stream by issued()

_lock = threading.RLock()
_installed = False
_timeout = None           # seconds; None: read the environment at install
_originals: dict = {}     # name -> torch's function (distributed_c10d's, the one torch.distributed exports)
_replaced: list = []      # (module, name, original) put back by uninstall()
_streams: dict = {}       # ("pair", id(group), group peer) | ("batch", id(group)) -> _Stream
_records: dict = {}       # stream key (readable) -> deque of Issued
_counts: collections.Counter = collections.Counter()
_gloo: dict = {}          # (id(group), device type) -> (group, is gloo)
_seq = itertools.count()
_log_armed = False

Issued = collections.namedtuple("Issued", "peer op shape dtype")
Issued.__doc__ = """One operation as issued: the peer's global rank, "send" or "recv", shape, dtype."""


# ------------------------------------------------------------------ switches
def enabled(default: str = "1") -> bool:
    """Whether ``OUROBOROS_NCCL_EMULATION`` asks for the emulation ("0" or empty: no)."""
    return os.environ.get(ENV, default) not in ("", "0")


def installed() -> bool:
    """Whether this process runs its gloo point-to-point under the emulation now."""
    return _installed


def set_timeout(seconds: float) -> float:
    """Set how long a ``wait()`` may block before it reports a deadlock; returns the old value."""
    global _timeout
    with _lock:
        old, _timeout = _current_timeout(), float(seconds)
    return old


def _current_timeout() -> float:
    if _timeout is not None:
        return _timeout
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)


def install(timeout: float | None = None) -> None:
    """Emulate NCCL's point-to-point rules on this process's gloo groups (idempotent).
    ``timeout``: seconds a ``wait()`` may block (default: ``OUROBOROS_NCCL_EMULATION_TIMEOUT``, else 120)."""
    global _installed, _timeout
    with _lock:
        if timeout is not None:
            _timeout = float(timeout)
        elif _timeout is None:
            _timeout = _current_timeout()
        if _installed:
            return
        ours = {"isend": isend, "irecv": irecv, "send": send, "recv": recv, "batch_isend_irecv": batch_isend_irecv}
        for name, fn in ours.items():
            _originals.setdefault(name, getattr(c10d, name))
            for module in (c10d, dist):
                current = getattr(module, name, None)
                if current is not fn:
                    _replaced.append((module, name, current))
                    setattr(module, name, fn)
        # Destroying a group first lets its streams finish what was issued, as NCCL's shutdown
        # waits for the communicator's outstanding operations (a rank's last sends are still in
        # flight when it returns from its last step).
        _originals.setdefault("destroy_process_group", c10d.destroy_process_group)
        for module in (c10d, dist):
            _replaced.append((module, "destroy_process_group", getattr(module, "destroy_process_group")))
            setattr(module, "destroy_process_group", destroy_process_group)
        # P2POp checks its op against distributed_c10d's isend/irecv: accept torch's and ours, so
        # that P2POps made before and after install() both pass.
        _replaced.append((c10d, "_check_op", c10d._check_op))
        c10d._check_op = _check_op
        _installed = True
        atexit.register(_end_streams)
    _log(f"installed pid={os.getpid()} rank={os.environ.get('RANK')}")


def _end_streams() -> None:
    """At exit, end the workers (see :func:`destroy_process_group`): each one's operations get up
    to 2 s in all to end, then the idle workers up to 5 s in all to return."""
    _retire(lambda st: True, 2.0, join=5.0)


def _retire(select, settle: float, join: float = 0.0) -> None:
    """Forget this process's streams that ``select(stream)`` picks and end their workers: first
    wait (up to ``settle`` seconds in all) for their operations to end, then wait (up to ``join``
    seconds in all) for the workers whose stream is idle to return. A worker still inside an
    operation is left to end with its group's timeout."""
    with _lock:
        keys = [k for k, st in _streams.items() if select(st)]
        mine = [_streams.pop(k) for k in keys]
    deadline = time.monotonic() + settle
    for st in mine:
        while st.pending and time.monotonic() < deadline:
            time.sleep(0.01)
    for st in mine:
        st.close()
    deadline = time.monotonic() + join
    for st in mine:
        if not st.pending:
            st.join(max(0.0, deadline - time.monotonic()))


def uninstall() -> None:
    """Put torch's functions back; the streams finish what was issued and end. Functions kept
    from the emulation (in a ``P2POp``, say) fall through to torch's from now on."""
    global _installed
    with _lock:
        if not _installed:
            return
        while _replaced:
            module, name, original = _replaced.pop()
            setattr(module, name, original)
        _installed = False
        streams = list(_streams.values())
        _streams.clear()
    for s in streams:
        s.close()


def destroy_process_group(group=None) -> None:
    """torch's ``destroy_process_group``, after this process's streams of the group (all of them
    for the default group) finished their operations, for up to the emulation's timeout."""
    everything = group is None or group is c10d.GroupMember.WORLD
    # workers joined, not left running: a worker thread that used torch and is still alive when
    # the process exits can abort it ("terminate called without an active exception")
    # (on a loaded machine a worker can take seconds to wake: join for the whole timeout)
    _retire(lambda st: everything or st.group is group, _current_timeout(), join=_current_timeout())
    return _originals["destroy_process_group"](group)


def _check_op(op) -> None:
    if _kind_of(op) is None:
        raise ValueError("Invalid ``op``. Expected ``op`` to be of type ``torch.distributed.isend`` or "
                         "``torch.distributed.irecv``.")


# ------------------------------------------------------------------ records
def issued() -> dict:
    """Per stream of this process, the operations issued to it so far (the last 10000), as
    :class:`Issued`. Keys: ``("pair", group name, peer global rank)`` for single operations and
    ``("batch", group name)`` for batched ones."""
    with _lock:
        return {k: list(v) for k, v in _records.items()}


def clear_issued() -> None:
    """Forget the record of :func:`issued`."""
    with _lock:
        _records.clear()


def pending() -> dict:
    """Per stream of this process, a line for each operation not finished yet (the first one runs)."""
    with _lock:
        return {s.label: [op.describe(state=True) for op in s.pending] for s in _streams.values() if s.pending}


def discard(group, settle: float = 60.0) -> None:
    """Forget this process's streams of ``group`` (one that a test deadlocked on purpose), after
    waiting up to ``settle`` seconds for their operations to end (stuck ones end when gloo's
    timeout of the group fails them). The group's later operations get new streams."""
    _retire(lambda st: st.group is group, settle)


def _log(line: str) -> None:
    global _log_armed
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(f"{line}\n")
    if not _log_armed:
        _log_armed = True
        atexit.register(_log_exit)


def _log_exit() -> None:
    with _lock:
        counts = dict(_counts)
    total = sum(counts.values())
    detail = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))
    _log(f"exit pid={os.getpid()} rank={os.environ.get('RANK')} emulated_ops={total} ({detail})")


# ------------------------------------------------------------------ helpers
def _kind_of(fn) -> str | None:
    if fn is isend or fn is _originals.get("isend") or fn is getattr(c10d, "isend", None):
        return "send"
    if fn is irecv or fn is _originals.get("irecv") or fn is getattr(c10d, "irecv", None):
        return "recv"
    name = getattr(fn, "__name__", None)
    return {"isend": "send", "irecv": "recv"}.get(name) if getattr(fn, "__module__", "").startswith("torch") else None


def _group(group):
    return c10d._get_default_group() if group is None else group


def _emulated(group, tensor) -> bool:
    """Only gloo groups this rank belongs to, with tensors gloo carries."""
    if not _installed or group is c10d.GroupMember.NON_GROUP_MEMBER:
        return False
    key = (id(group), tensor.device.type)
    hit = _gloo.get(key)
    if hit is None or hit[0] is not group:
        try:
            ok = type(group._get_backend(tensor.device)).__name__ == "ProcessGroupGloo"
        except Exception:  # noqa: BLE001 - no backend for that device: not ours
            ok = False
        hit = _gloo[key] = (group, ok)
    return hit[1]


def _group_peer(group, peer, group_peer) -> int:
    if group_peer is not None:
        return group_peer
    if peer is None:
        raise RuntimeError("NCCL emulation: a receive from any source (src=None) does not exist on NCCL; "
                           "name the peer")
    return peer if group is c10d._get_default_group() else dist.get_group_rank(group, peer)


def _group_name(group) -> str:
    if group is c10d._get_default_group():
        return "WORLD"
    return f"group {getattr(group, 'group_name', None) or hex(id(group))}"


def _spec(tensor: torch.Tensor, status: int) -> torch.Tensor:
    out = torch.zeros(_SPEC_LEN, dtype=torch.int64)
    dims = list(tensor.shape)[:_MAX_DIMS]
    dtype = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1
    out[:4 + len(dims)] = torch.tensor([status, tensor.numel() * tensor.element_size(), dtype,
                                        tensor.dim() if tensor.dim() <= _MAX_DIMS else -1, *dims])
    return out


def _read_spec(spec: torch.Tensor) -> tuple:
    """(status, nbytes, text) of a control message."""
    v = spec.tolist()
    ndim, dtype = v[3], (_DTYPES[v[2]] if 0 <= v[2] < len(_DTYPES) else "?")
    shape = tuple(v[4:4 + ndim]) if ndim >= 0 else "(more than 12 dims)"
    return v[0], v[1], f"{shape} {str(dtype).replace('torch.', '')}, {v[1]} bytes"


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


class _SizeMismatch(RuntimeError):
    """Both ends learned of it from the header; no data moved, so the stream is still in step."""


@contextlib.contextmanager
def _modes(modes):
    """Enter, on this worker, the dispatch modes that were active where the operation was issued."""
    if not modes:
        yield
        return
    with contextlib.ExitStack() as stack:
        for m in modes:
            stack.enter_context(m)
        yield


def _dispatch_modes():
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        return tuple(_get_current_dispatch_mode_stack())
    except Exception:  # noqa: BLE001 - no mode stack to carry
        return ()


# ------------------------------------------------------------------ operations and work
class _Op:
    """One send or receive on a stream."""

    def __init__(self, kind, tensor, group, peer, stream_kind):
        self.kind, self.tensor, self.group, self.peer = kind, tensor, group, peer
        self.global_peer = dist.get_global_rank(group, peer) if group is not c10d._get_default_group() else peer
        self.stream_kind = stream_kind
        self.seq = next(_seq)
        self.state = "queued"

    def describe(self, state: bool = False) -> str:
        where = "to" if self.kind == "send" else "from"
        text = (f"#{self.seq} {self.kind} {where} rank {self.global_peer} "
                f"{tuple(self.tensor.shape)} {str(self.tensor.dtype).replace('torch.', '')}")
        return f"{text} [{self.state}]" if state else text


class _Item:
    """What a stream runs as one unit: one operation, or a whole batch. Completes once."""

    def __init__(self, ops, label, modes):
        self.ops, self.label, self.modes = ops, label, modes
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.callbacks: list = []

    @property
    def state(self) -> str:
        return "; ".join(op.state for op in self.ops)

    def describe(self, state: bool = False) -> str:
        if len(self.ops) == 1:
            return self.ops[0].describe(state)
        return "batch [" + ", ".join(op.describe(state) for op in self.ops) + "]"

    def finish(self, error=None):
        with _lock:  # get_future() registers under the same lock: no callback is missed
            self.error = error
            self.done.set()
            callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            cb()


class EmulatedWork:
    """The request of an emulated operation (or batch), like torch's ``Work``."""

    def __init__(self, item: _Item, rank: int):
        self._item, self._rank = item, rank
        self._future = None

    def wait(self, timeout=None) -> bool:
        limit = _current_timeout()
        if timeout is not None:
            limit = min(limit, timeout.total_seconds() if hasattr(timeout, "total_seconds") else float(timeout))
        if not self._item.done.wait(limit):
            raise RuntimeError(_deadlock_report(self._item, self._rank, limit))
        if self._item.error is not None:
            raise RuntimeError(f"NCCL emulation: rank {self._rank}, {self._item.label}: {self._item.describe()} "
                               f"failed: {self._item.error}") from self._item.error
        return True

    def is_completed(self) -> bool:
        return self._item.done.is_set()

    def is_success(self) -> bool:
        return self._item.done.is_set() and self._item.error is None

    def exception(self):
        return self._item.error

    def result(self) -> list:
        return [op.tensor for op in self._item.ops]

    def source_rank(self) -> int:
        return self._item.ops[0].peer

    _source_rank = source_rank

    def synchronize(self) -> None:
        """CPU tensors: nothing to order on a device stream."""

    def block_current_stream(self) -> None:
        self.wait()

    def get_future(self):
        with _lock:
            if self._future is None:
                fut = self._future = torch.futures.Future()

                def complete():
                    if self._item.error is None:
                        fut.set_result(self.result())
                    else:
                        fut.set_exception(self._item.error)
                if self._item.done.is_set():
                    complete()
                else:
                    self._item.callbacks.append(complete)
        return self._future


def _deadlock_report(item: _Item, rank: int, limit: float) -> str:
    lines = [f"NCCL emulation (tests/nccl_emulation.py): rank {rank} waited {limit:g} s for {item.describe()} "
             f"on the {item.label} and it has not completed: under NCCL's point-to-point rules this run "
             "deadlocks or hangs (messages between two ranks match in posting order whatever the tag, each "
             "stream runs its operations in issue order, and a send waits for the peer's matching receive).",
             f"Pending operations of rank {rank}'s streams (the first of each one runs; "
             f"{TIMEOUT_ENV} sets the wait):"]
    with _lock:
        streams = list(_streams.values())
    busy = [s for s in streams if s.pending]
    for s in busy:
        lines.append(f"  {s.label}: " + "; ".join(it.describe(state=True) for it in list(s.pending)))
    if not busy:
        lines.append("  (none)")
    return "\n".join(lines)


# ------------------------------------------------------------------ streams
class _Stream:
    """A worker thread running its items one after the other, in issue order."""

    def __init__(self, key, label, group, run):
        self.key, self.label, self.group, self._run = key, label, group, run
        self.pending: collections.deque = collections.deque()
        self.broken: str | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"nccl-emulation {label}", daemon=True)
        self._thread.start()

    def submit(self, item: _Item) -> None:
        with _lock:
            self.pending.append(item)
        self._queue.put(item)

    def close(self) -> None:
        """End the worker once it has run what was issued before."""
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            error = None
            try:
                if self.broken:
                    raise RuntimeError(f"an earlier operation on this stream failed ({self.broken}); "
                                       "nothing after it runs")
                with _modes(item.modes):
                    self._run(item)
            except _SizeMismatch as e:
                error = e
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                error = e
                if not self.broken:
                    self.broken = f"{item.describe()}: {type(e).__name__}: {str(e)[:300]}"
            with _lock:
                self.pending.remove(item)
            item.finish(error)


def _stream(kind: str, group, peer=None) -> _Stream:
    key = (kind, id(group), peer)
    with _lock:
        s = _streams.get(key)
        if s is None or s.group is not group:
            me = group.rank()
            me_global = dist.get_global_rank(group, me) if group is not c10d._get_default_group() else me
            if kind == "pair":
                other = dist.get_global_rank(group, peer) if group is not c10d._get_default_group() else peer
                label = f"pair stream {_group_name(group)} {me_global}<->{other}"
                s = _Stream(key, label, group, _run_single)
            else:
                label = f"batch stream {_group_name(group)} (rank {me_global})"
                s = _Stream(key, label, group, _run_batch)
            _streams[key] = s
        return s


def _record(kind: str, group, ops) -> None:
    name = _group_name(group)
    with _lock:
        for op in ops:
            key = ("pair", name, op.global_peer) if kind == "pair" else ("batch", name)
            _records.setdefault(key, collections.deque(maxlen=_RECORD_LEN)).append(
                Issued(op.global_peer, op.kind, tuple(op.tensor.shape), op.tensor.dtype))
            _counts[f"{kind} {op.kind}"] += 1


# ------------------------------------------------------------------ the protocol
def _recv_side(op: _Op, tags: dict, token_work=None) -> None:
    """Receive ``op``'s message: the token (already posted when ``token_work`` is given), the
    sender's header, then the data if both sizes agree."""
    pg, peer = op.group, op.peer
    if token_work is None:
        token_work = pg.send([_spec(op.tensor, _READY)], peer, tags["token"])
    op.state = f"receive posted; waiting for rank {op.global_peer} to reach the matching send"
    header = torch.zeros(_SPEC_LEN, dtype=torch.int64)
    pg.recv([header], peer, tags["header"]).wait()
    token_work.wait()
    status, nbytes, theirs = _read_spec(header)
    if status != _OK:
        raise _SizeMismatch(f"size mismatch: rank {op.global_peer} sends {theirs}, this receive expects "
                            f"{_read_spec(_spec(op.tensor, 0))[2]} (no data moved)")
    op.state = f"receiving the data from rank {op.global_peer}"
    pg.recv([_wire(op.tensor)], peer, tags["data"]).wait()
    op.state = "done"


def _send_side(op: _Op, tags: dict, token_work=None) -> None:
    """Send ``op``'s message once the peer's receive has posted its token."""
    pg, peer = op.group, op.peer
    token = torch.zeros(_SPEC_LEN, dtype=torch.int64)
    if token_work is None:
        token_work = pg.recv([token], peer, tags["token"])
    else:
        token_work, token = token_work
    op.state = f"waiting for rank {op.global_peer} to reach the matching receive"
    token_work.wait()
    _, theirs_nbytes, theirs = _read_spec(token)
    mine = op.tensor.numel() * op.tensor.element_size()
    agree = theirs_nbytes == mine
    pg.send([_spec(op.tensor, _OK if agree else _MISMATCH)], peer, tags["header"]).wait()
    if not agree:
        raise _SizeMismatch(f"size mismatch: this send has {_read_spec(_spec(op.tensor, 0))[2]}, rank "
                            f"{op.global_peer} posted a receive of {theirs} (no data moved)")
    op.state = f"sending the data to rank {op.global_peer}"
    pg.send([_wire(op.tensor)], peer, tags["data"]).wait()
    op.state = "done"


def _run_single(item: _Item) -> None:
    op = item.ops[0]
    op.state = "running"
    (_recv_side if op.kind == "recv" else _send_side)(op, _TAGS["pair"])


def _run_batch(item: _Item) -> None:
    """All of the batch's receives post their tokens now; each (peer, direction) lane then runs its
    operations in order, the lanes side by side; the batch ends when every lane has."""
    tags = _TAGS["batch"]
    lanes: dict = {}
    for op in item.ops:
        op.state = "running"
        lanes.setdefault((op.peer, op.kind), []).append(op)
    posted = {}
    for op in item.ops:  # posting order per peer = list order: the peer's batch matches it in order
        if op.kind == "recv":
            posted[op.seq] = op.group.send([_spec(op.tensor, _READY)], op.peer, tags["token"])
        else:
            token = torch.zeros(_SPEC_LEN, dtype=torch.int64)
            posted[op.seq] = (op.group.recv([token], op.peer, tags["token"]), token)
    errors = []

    def lane(ops, modes=()):
        with _modes(modes):  # the stream's own thread has entered them already
            for op in ops:
                try:
                    (_recv_side if op.kind == "recv" else _send_side)(op, tags, posted[op.seq])
                except BaseException as e:  # noqa: BLE001 - collected below
                    errors.append((op, e))
                    if not isinstance(e, _SizeMismatch):
                        return

    runs = list(lanes.values())
    threads = [threading.Thread(target=lane, args=(ops, item.modes), daemon=True,
                                name=f"nccl-emulation {item.label} lane") for ops in runs[1:]]
    for t in threads:
        t.start()
    lane(runs[0])
    for t in threads:
        t.join()
    if errors:
        text = "; ".join(f"{op.describe()}: {e}" for op, e in errors)
        if all(isinstance(e, _SizeMismatch) for _, e in errors):
            raise _SizeMismatch(text)
        raise RuntimeError(text) from errors[0][1]


def _issue(kind: str, group, ops) -> EmulatedWork:
    for op in ops:
        if not op.tensor.is_contiguous():
            raise ValueError(f"NCCL emulation: {op.describe()}: tensors must be contiguous")
    stream = _stream(kind, group, ops[0].peer if kind == "pair" else None)
    item = _Item(ops, stream.label, _dispatch_modes())
    _record(kind, group, ops)
    stream.submit(item)
    return EmulatedWork(item, dist.get_rank())


# ------------------------------------------------------------------ the replacements
def isend(tensor, dst=None, group=None, tag=0, group_dst=None):
    """``torch.distributed.isend`` under NCCL's rules (``tag`` ignored) on gloo groups."""
    g = _group(group)
    if not _emulated(g, tensor):
        return _originals["isend"](tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)
    peer = _group_peer(g, dst, group_dst)
    if peer == g.rank():
        return _originals["isend"](tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)
    return _issue("pair", g, [_Op("send", tensor, g, peer, "pair")])


def irecv(tensor, src=None, group=None, tag=0, group_src=None):
    """``torch.distributed.irecv`` under NCCL's rules (``tag`` ignored) on gloo groups."""
    g = _group(group)
    if not _emulated(g, tensor):
        return _originals["irecv"](tensor, src=src, group=group, tag=tag, group_src=group_src)
    peer = _group_peer(g, src, group_src)
    if peer == g.rank():
        return _originals["irecv"](tensor, src=src, group=group, tag=tag, group_src=group_src)
    return _issue("pair", g, [_Op("recv", tensor, g, peer, "pair")])


def send(tensor, dst=None, group=None, tag=0, group_dst=None):
    """``torch.distributed.send``: the emulated ``isend``, waited for."""
    g = _group(group)
    if not _emulated(g, tensor):
        return _originals["send"](tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)
    work = isend(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)
    if work is not None:
        work.wait()


def recv(tensor, src=None, group=None, tag=0, group_src=None):
    """``torch.distributed.recv``: the emulated ``irecv``, waited for; returns the sender's global rank."""
    g = _group(group)
    if not _emulated(g, tensor):
        return _originals["recv"](tensor, src=src, group=group, tag=tag, group_src=group_src)
    work = irecv(tensor, src=src, group=group, tag=tag, group_src=group_src)
    work.wait()
    return src if src is not None else dist.get_global_rank(g, work.source_rank())


def batch_isend_irecv(p2p_op_list):
    """``torch.distributed.batch_isend_irecv`` under NCCL's rules on gloo groups: one unit on the
    group's batched stream; one work for the whole batch, as on NCCL."""
    c10d._check_p2p_op_list(p2p_op_list)
    first = p2p_op_list[0]
    g = _group(first.group)
    if not _emulated(g, first.tensor):
        rebuilt = []
        for p in p2p_op_list:  # torch's batch tells sends by ``op is isend``: hand it the current one
            q = object.__new__(type(p))
            q.__dict__.update(p.__dict__)
            q.op = c10d.isend if _kind_of(p.op) == "send" else c10d.irecv
            rebuilt.append(q)
        return _originals["batch_isend_irecv"](rebuilt)
    ops = []
    for p in p2p_op_list:
        kind = _kind_of(p.op)
        if kind is None:
            raise ValueError(f"NCCL emulation: P2POp with op {p.op!r}: expected isend or irecv")
        peer = p.group_peer if getattr(p, "group_peer", None) is not None else _group_peer(g, p.peer, None)
        ops.append(_Op(kind, p.tensor, g, peer, "batch"))
    return [_issue("batch", g, ops)]
