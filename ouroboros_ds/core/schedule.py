"""The Ouroboros schedule as data: pure Python, no torch.

Placement (the ring). ``G`` pipeline stages hold ``K = G + 1`` modules, numbered 1..K as in
the paper. Stage 0 holds module 1 (embedding and the first blocks) *and* module K (the last
blocks, the tied output projection and the loss); stage s >= 1 holds module s + 1. A batch
travels stage 0 (module 1) -> 1 -> ... -> G-1 -> stage 0 (module K).

Delays. At step t module k applies the gradient of batch ``t - (K - k)``: module K is fresh,
module 1 is the stalest (delay G). Module k < K learns that gradient by *features replay*:
it recomputes its forward from the stashed input with the current weights and backprops the
error gradient that module k + 1 computed for that batch one step earlier.

One step (one ``train_batch()``) runs M micro-batches. Each stage runs the per-stage list of
:class:`Action` returned by :func:`ouroboros_schedule` once per step, the same list every step;
the engine maps each action to one DeepSpeed ``PipeInstruction``. Text form ``<k><KIND><mb>``
(``1F0``, ``3B2``, ``2SEND_F1``) or ``STEP``; :meth:`Action.parse` reads it back.

The actions, their pseudo-code, and what each pairs with (k < K unless said):

``kLOADj``   (k = 1) load micro-batch j of batch t: token ids for module 1, labels for module K.
``kRECV_Fj`` post a receive of module k's input for micro-batch j of batch t.  Pairs with (k-1)SEND_Fj.
``kFj``      x = input(k, j); stash (x, dropout key of (t, j)); y = module_k(x) without a graph.
             Waits on kRECV_Fj (k > 1) or kLOADj (k = 1).
``kSEND_Fj`` send y downstream.  Pairs with (k+1)RECV_Fj on the next stage, in the same step.
``kRECV_Bj`` post a receive of dL/dy for micro-batch j, for the batch that module k replays *next*
             step (t + 1 - delay(k)).  Pairs with (k+1)SEND_Bj (or KSEND_Bj) in the same step.
``kBj``      the replay: b = t - delay(k); (x, key) = stash(k, b, j); y = module_k(x) under key,
             with the current weights; y.backward(dL/dy of (b, j)), received last step.
             Does nothing while b < 0 (warm-up: the module has no gradient yet), nor, after a
             synchronous warm-up of S steps, while b < S (batch b was replayed in its own step).
``kSEND_Bj`` send dL/dx of (b, j) upstream (k > 1).  Pairs with (k-1)RECV_Bj, same step.
``KLj``      module K, fresh: x = input(K, j); loss = module_K(x) vs labels; (loss / M).backward().
             Waits on KRECV_Fj.  ``KSEND_Bj`` sends dL/dx to module K-1 (used there next step).
``STEP``     reduce the stage's gradients over its data-parallel group, clip the stage's norm,
             optimizer step; modules without a gradient yet keep their weights.

Between stages only point-to-point messages flow. When both ends of a hand-off live on one
stage (G = 1: modules 1 and 2 both on stage 0) there is no SEND/RECV: the hand-off is local.

Where the receives sit (docs/ring.md#transport). Messages carry no tags and match by posting
order, and on NCCL each pair of stages runs its sends and receives on one stream in issue order,
a send completing only with its receive. So both ends of a pair issue that pair's messages in one
order, every step: the step's activations downstream, then their error gradients upstream. A
stage posts its activation receives just before its first forward (stage 0: module K's, right
after its own activations went out) and the error-gradient receives after its last activation
send; stage 0 posts module 1's after module K's error gradients went out (at G = 2 both travel
between the same two stages). :mod:`ouroboros_ds.core.nccl` runs the result under those rules.

Synchronous steps (``sync_steps``: the first steps of a run, before the ring starts). Every delay
is 0: module k replays batch t itself, in the same step, so ``kRECV_Bj`` receives this step's
error gradient and ``kBj`` waits for it. Stage 0 runs module K's losses right after its forwards
and its replays of module 1 after them; every other stage forwards, then replays as the error
gradients come back. The messages and their order on each channel are the ring step's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

LOAD, F, B, L = "LOAD", "F", "B", "L"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
STEP = "STEP"
COMPUTE = (F, B, L)
SENDS = (SEND_F, SEND_B)
RECVS = (RECV_F, RECV_B)
KINDS = (LOAD, F, B, L, SEND_F, RECV_F, SEND_B, RECV_B, STEP)

_TEXT = re.compile(r"^(\d+)(LOAD|SEND_F|RECV_F|SEND_B|RECV_B|F|B|L)(\d+)$")


@dataclass(frozen=True)
class Action:
    """One instruction of one stage: ``kind`` done by ring module ``k`` (1..K) on micro-batch ``mb``."""

    kind: str
    k: int = 0
    mb: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of {KINDS}")

    def __str__(self) -> str:
        return STEP if self.kind == STEP else f"{self.k}{self.kind}{self.mb}"

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> "Action":
        text = text.strip()
        if text == STEP:
            return cls(STEP)
        m = _TEXT.match(text)
        if not m:
            raise ValueError(f"cannot parse action {text!r}: expected e.g. '1F0', '2SEND_B3' or 'STEP'")
        return cls(m.group(2), int(m.group(1)), int(m.group(3)))


# ---------------------------------------------------------------- placement and delays
def num_modules(stages: int) -> int:
    """K = G + 1: the ring's modules."""
    return stages + 1


def stage_of(k: int, stages: int) -> int:
    """The stage that holds ring module ``k``: K sits on stage 0 beside module 1."""
    K = num_modules(stages)
    if not 1 <= k <= K:
        raise ValueError(f"module {k} out of range 1..{K}")
    return 0 if k == K else k - 1


def modules_of(stage: int, stages: int) -> list[int]:
    """Modules held by ``stage``: [1, K] on stage 0, [stage + 1] elsewhere."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} out of range 0..{stages - 1}")
    return [1, num_modules(stages)] if stage == 0 else [stage + 1]


def delay(k: int, stages: int, synchronous: bool = False) -> int:
    """Steps between a batch's forward through module ``k`` and the update that uses its gradient
    (0 in a synchronous step)."""
    return 0 if synchronous else num_modules(stages) - k


def stash_depth(k: int, stages: int, synchronous: bool = False) -> int:
    """Batches whose inputs module k keeps stashed during a step: K - k + 1 (docs/ring.md#memory);
    one fewer between steps, after the replay has consumed the oldest. Module K keeps none."""
    return delay(k, stages, synchronous) + (1 if k < num_modules(stages) else 0)


def replays_batch(b: int, synchronous: bool, sync_steps: int) -> bool:
    """Whether a module backprops batch b in a step whose replay (``b = t - delay``) falls on it.

    A synchronous step backprops its own batch. A ring step replays a batch ``delay`` steps old,
    and skips it when it is one of the first ``sync_steps``: that batch was already backpropagated
    and applied in its own synchronous step, and its stash and error gradient are gone. With no
    synchronous steps the same test skips ``b < 0``, the ring's warm-up.
    """
    return synchronous or b >= sync_steps


# ---------------------------------------------------------------- the schedule
def ouroboros_schedule(stages: int, micro_batches: int, synchronous: bool = False) -> list[list[Action]]:
    """Per-stage action lists of one Ouroboros step, for G = ``stages`` and M = ``micro_batches``.

    Every stage first forwards all M micro-batches, then replays its delayed batch; stage 0
    computes module K's losses last. Forwarding first sends the work that the next stage waits
    for as early as possible and costs no memory (the forward keeps no graph, and the inputs are
    stashed for the replay anyway); the replays, whose error gradients are already local, fill
    the time until the micro-batches come back around the ring. The simulator chose this order
    over interleaved ones (``docs/`` and ``tests/unit/test_schedule.py`` show the numbers).

    ``synchronous``: the list of a synchronous step (delay 0). The replays need this step's error
    gradients, which start at module K's losses, so stage 0 runs the losses before module 1's
    replays; the other stages' lists are the ring step's, their replays now waiting for the
    gradient to come back around the ring.
    """
    G, M = stages, micro_batches
    if isinstance(G, bool) or not isinstance(G, int) or G < 1:
        raise ValueError(f"stages (pipeline-parallel size) must be an integer >= 1, got {G!r}")
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"micro_batches (gradient_accumulation_steps) must be an integer >= 1, got {M!r}")
    K = num_modules(G)
    plan: list[list[Action]] = []
    for s in range(G):
        k = s + 1
        remote_down = stage_of(k + 1, G) != s  # False only for G = 1: module 2 is module K
        acts: list[Action] = []
        if s > 0:
            acts += [Action(RECV_F, k, j) for j in range(M)]
        for j in range(M):
            if s == 0:
                acts.append(Action(LOAD, 1, j))
            acts.append(Action(F, k, j))
            if remote_down:
                acts.append(Action(SEND_F, k, j))
        if s > 0 and remote_down:  # after this step's activations: the pair's order (see above)
            acts += [Action(RECV_B, k, j) for j in range(M)]
        elif remote_down:  # stage 0: module K's inputs, posted right after module 1's activations
            # went out, so that they arrive while stage 0 replays
            acts += [Action(RECV_F, K, j) for j in range(M)]
        replays = []
        for j in range(M):
            replays.append(Action(B, k, j))
            if k > 1:
                replays.append(Action(SEND_B, k, j))
        losses = []
        if s == 0:
            for j in range(M):
                losses.append(Action(L, K, j))
                if remote_down:
                    losses.append(Action(SEND_B, K, j))
            if remote_down:
                losses += [Action(RECV_B, 1, j) for j in range(M)]
        acts += losses + replays if synchronous else replays + losses
        acts.append(Action(STEP))
        plan.append(acts)
    return plan


def format_schedule(plan: list[list[Action]], mark: tuple[int, int] | None = None) -> str:
    """The grid as text, one row per stage; ``mark=(stage, index)`` brackets one action."""
    rows = []
    for s, acts in enumerate(plan):
        cells = [f"[{a}]" if mark == (s, i) else str(a) for i, a in enumerate(acts)]
        rows.append(f"{'>' if mark and mark[0] == s else ' '} stage {s}: " + " ".join(cells))
    return "\n".join(rows)


def parse_schedule(text: str) -> list[list[Action]]:
    """Read back what :func:`format_schedule` wrote (without a mark)."""
    plan = []
    for line in text.strip().splitlines():
        _, _, body = line.partition(":")
        plan.append([Action.parse(tok) for tok in body.split()])
    return plan
