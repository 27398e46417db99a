"""The ring's options: one typed, immutable record, its defaults, and every check of them.

Every consumer takes a :class:`RingConfig`: the DeepSpeed JSON's ``"ouroboros"`` object is read
into one (:meth:`RingConfig.from_section`), ``train.py``'s flags override its fields, and
``ouroboros_ds.initialize``, :class:`~ouroboros_ds.pipe.engine.OuroborosEngine` and the
:class:`~ouroboros_ds.ring.reference.Reference` run it. The defaults are the measured staleness
mitigation (docs/parity.md); :meth:`RingConfig.paper` is the paper's exact update::

    RingConfig()                          # the default: mitigated
    RingConfig.paper()                    # Huo et al., 2019, as published
    RingConfig(sync_steps=0)              # the default, the ring from the first step
    RingConfig.from_section({"paper": True})   # what {"ouroboros": {"paper": true}} means

Only the standard library is imported here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

REPLAY_MODES = ("recompute", "stash")
STAGE_CLIPS = ("split", "whole")
PARTITIONS = ("fresh", "balanced", "authors", "budget")
LOOKAHEAD_AUTO = "auto"
STALE_LR_AUTO = "auto"
STALE_LR_AUTO_FROM = 4  # 'auto' scales the lr from this many stages on (docs/parity.md measures G = 2, 3, 4, 8)
LOOKAHEAD_AUTO_MAX = 5  # 'auto' looks at most this far ahead where the stale lr is scaled (docs/parity.md: G = 4, 8)


@dataclass(frozen=True)
class RingConfig:
    replay: Literal["recompute", "stash"] = "recompute"
    """how module k < K gets its delayed gradient: 'recompute' (features replay: recompute the
    forward from the stashed input) or 'stash' (keep the forward's graph and weights: no
    recompute, more activation memory); see docs/ring.md"""
    weight_prediction: float = 1.0
    """staleness mitigation H (0: off, the paper's): module k's forward and its replay run at its
    weights predicted H x delay(k) last updates ahead, in both replay modes; see
    ouroboros_ds/ring/prediction.py LastUpdate and docs/parity.md"""
    lookahead: float | str = LOOKAHEAD_AUTO
    """staleness mitigation L ('auto': 2G - 1, 3 at G = 2, 5 at G = 3, and at most 5 with the
    delay-scaled lr, 5 at G >= 4 by default; 0: off, the paper's): module K, the fresh
    module, runs each step's losses and backwards at its weights moved L last updates ahead,
    w + L (w - w_before), and steps from its current weights; see ouroboros_ds/ring/prediction.py
    look_ahead"""
    sync_steps: int = 100
    """staleness mitigation N (0: off, the paper's): the first N steps are synchronous (every module
    backprops its own step's batch, delay 0, as 1F1B does), then the ring starts with its delays.
    Delayed gradients slow the escape from the loss's early plateau; see docs/ring.md"""
    stage_clip: Literal["split", "whole"] = "split"
    """the norm each stage clips its own gradient at, with no collective across stages: 'split' the
    config's gradient_clipping / sqrt(G), so the whole model's norm never exceeds gradient_clipping
    as with DeepSpeed's clip; 'whole' gradient_clipping on every stage, the paper's rule"""
    stale_lr_scale: float | str = STALE_LR_AUTO
    """staleness mitigation C ('auto': 1 from G = 4 stages on, 0 below; 0: off, the paper's): module
    k's lr / (1 + C x delay(k)), in every step; see ouroboros_ds/ring/staleness.py"""
    partition: Literal["fresh", "balanced", "authors", "budget"] = "fresh"
    """how train.py splits the blocks into modules 1..K (a library user builds the module with
    his own split): 'fresh' (by modelled per-stage cost, stage 0's blocks in module K: fewer stale
    weights), 'balanced' (the same loads, stage 0's blocks half/half between modules 1 and K; the
    paper's), 'authors' (L // G blocks per stage, half/half) or 'budget' (replay 'stash': blocks
    and kept graphs chosen together, the fastest modelled split within activation_budget)"""
    activation_budget: str | None = None
    """replay 'stash' only: peak activation memory per stage (saved activations, stashed inputs,
    weight snapshots); forwards past it are recomputed at the replay through the same weight
    snapshot (the same update, bit for bit): '1f1b' (train.py's default: stock 1F1B's peak on its
    busiest stage), '1.5x' (times that), '300MB', or 'inf'; see ouroboros_ds/ring/memory.py"""

    # The paper's update: what each mitigation is set to for Huo et al.'s exact algorithm.
    PAPER = {"weight_prediction": 0.0, "lookahead": 0.0, "sync_steps": 0, "stage_clip": "whole",
             "stale_lr_scale": 0.0, "partition": "balanced"}

    def __post_init__(self):
        _check(self)

    @classmethod
    def paper(cls, **changes) -> RingConfig:
        """The paper's exact update (no weight prediction, no look-ahead, no synchronous steps, each
        stage clipped at the whole threshold, no delay-scaled lr, the balanced partition), with ``changes``."""
        return cls(**{**cls.PAPER, **changes})

    @classmethod
    def from_section(cls, section: dict | None, **given) -> RingConfig:
        """The DeepSpeed JSON's ``"ouroboros"`` object (``None`` or ``{}``: the defaults;
        ``{"paper": true}``: :meth:`paper`; otherwise field: value), then ``given`` fields that
        are not None on top (train.py's flags beat the file)."""
        section = dict(section or {})
        if not isinstance(section, dict):
            raise ValueError(f"'ouroboros': must be an object of ring options, got {section!r}")
        unknown = set(section) - {"paper", *FIELDS}
        if unknown:
            raise ValueError(f"'ouroboros': unknown option(s) {sorted(unknown)}; expected paper, {', '.join(FIELDS)}")
        given = {k: v for k, v in given.items() if v is not None}
        if section.pop("paper", False):
            clash = [k for k in (*section, *given) if k in cls.PAPER and {**section, **given}[k] != cls.PAPER[k]]
            if clash:
                raise ValueError(f"'ouroboros'.paper: the paper's update has no staleness mitigation, but "
                                 f"{', '.join(sorted(set(clash)))} set one; drop them (or paper)")
            return cls.paper(**section, **given)
        return cls(**{**section, **given})

    def replace(self, **changes) -> RingConfig:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @property
    def is_paper(self) -> bool:
        return all(getattr(self, k) == v for k, v in self.PAPER.items())

    def lookahead_updates(self, stages: int) -> float:
        """The look-ahead horizon for a ring of ``stages`` stages: the number given, or 'auto': one
        update per module of the ring, K = 2G - 1 (module K's error gradients reach modules stale by
        up to K - 1 steps; docs/parity.md measures 3 at G = 2, and 5 against 3 at G = 3), at most
        LOOKAHEAD_AUTO_MAX where the stale modules' lr is scaled down (stale_lr_for > 0): they
        then move less per step, and at G = 8 a look-ahead of 15 ends 0.05 bits/byte above one of
        4 to 7 (at G = 4, 4 to 7 are level)."""
        if self.lookahead != LOOKAHEAD_AUTO:
            return float(self.lookahead)
        ring = 2 * stages - 1
        return float(min(ring, LOOKAHEAD_AUTO_MAX) if self.stale_lr_for(stages) else ring)

    def stale_lr_for(self, stages: int) -> float:
        """C of the delay-scaled lr for a ring of ``stages`` stages: the number given, or 'auto': 1
        (module k at lr / (1 + delay(k))) from STALE_LR_AUTO_FROM stages on, where the delays are
        long enough for it to pay (docs/parity.md: at G = 4 and 8 it closes part of the gap to 1F1B,
        at G = 2 it costs accuracy), 0 below."""
        if self.stale_lr_scale == STALE_LR_AUTO:
            return 1.0 if stages >= STALE_LR_AUTO_FROM else 0.0
        return float(self.stale_lr_scale)


FIELDS = tuple(f.name for f in dataclasses.fields(RingConfig))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(c: RingConfig) -> None:
    """Every check of the ring's options; each message names the option and the fix (train.py's
    flag is the option's name with dashes: --weight-prediction)."""
    if c.replay not in REPLAY_MODES:
        raise ValueError(f"replay: expected one of {REPLAY_MODES} ('recompute': features replay, recompute the "
                         f"forward at the current weights; 'stash': keep the forward's graph and weights), got "
                         f"{c.replay!r}")
    if not _number(c.weight_prediction) or c.weight_prediction < 0:
        raise ValueError(f"weight_prediction: must be a number >= 0 (0 turns it off, 1 predicts the weights a "
                         f"delayed gradient is applied to), got {c.weight_prediction!r}")
    if c.lookahead != LOOKAHEAD_AUTO and (not _number(c.lookahead) or c.lookahead < 0):
        raise ValueError(f"lookahead: must be 'auto' (2G - 1 updates, at most {LOOKAHEAD_AUTO_MAX} with the delay-scaled "
                         f"lr) or a number >= 0 (0 turns it off, L runs the "
                         f"fresh module L last updates ahead), got {c.lookahead!r}")
    if isinstance(c.sync_steps, bool) or not isinstance(c.sync_steps, int) or c.sync_steps < 0:
        raise ValueError(f"sync_steps: must be an integer >= 0 (0: none; N: the first N steps are synchronous, "
                         f"every delay 0), got {c.sync_steps!r}")
    if c.stage_clip not in STAGE_CLIPS:
        raise ValueError(f"stage_clip: must be 'split' (each stage at gradient_clipping / sqrt(G)) or 'whole' (each "
                         f"stage at gradient_clipping, the paper's rule), got {c.stage_clip!r}")
    if c.stale_lr_scale != STALE_LR_AUTO and (not _number(c.stale_lr_scale) or c.stale_lr_scale < 0):
        raise ValueError(f"stale_lr_scale: must be 'auto' (1 from {STALE_LR_AUTO_FROM} stages on, else 0) or a number "
                         f">= 0 (0: off; C: module k's lr / (1 + C x delay)), got {c.stale_lr_scale!r}")
    if c.partition not in PARTITIONS:
        raise ValueError(f"partition: expected one of {PARTITIONS}, got {c.partition!r}")
    if c.partition == "budget" and c.replay != "stash":
        raise ValueError("partition: 'budget' needs replay 'stash' (it splits the blocks by the kept graphs); "
                         "set replay to 'stash' or use partition 'balanced'")
    if c.activation_budget is not None:
        if c.replay != "stash":
            raise ValueError("activation_budget: bounds replay 'stash' (features replay keeps no graph between "
                             "steps); set replay to 'stash' or drop it")
        from .memory import parse_budget

        parse_budget(c.activation_budget)
