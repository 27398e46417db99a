"""Data through ``datasets``: hub names map to the right ``load_dataset`` call, and the
loading code reads local data set directories with HF_DATASETS_OFFLINE=1 and no network."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ouroboros_ds.train import corpora as C

from helpers import ROOT


@pytest.mark.parametrize("name, want", [
    ("wikitext", ("Salesforce/wikitext", {"name": "wikitext-103-raw-v1"})),
    ("wikitext-2", ("Salesforce/wikitext", {"name": "wikitext-2-raw-v1"})),
    ("wikitext:wikitext-2-v1", ("Salesforce/wikitext", {"name": "wikitext-2-v1"})),
    ("enwik8", ("LTCB/enwik8", {"data_dir": "enwik8-raw", "revision": "refs/convert/parquet"})),
    ("enwik8:enwik8", ("LTCB/enwik8", {"data_dir": "enwik8", "revision": "refs/convert/parquet"})),
    ("someone/corpus:cfg", ("someone/corpus", {"name": "cfg"})),
    ("someone/corpus", ("someone/corpus", {})),
])
def test_hub_names_map_to_load_dataset_args(name, want):
    assert C.hub_load_args(name) == want


def test_hub_names_go_through_load_dataset_and_join_rows(monkeypatch):
    """What load_text does with what load_dataset returns: wikitext rows keep their newlines,
    enwik8-raw is one row holding the file."""
    import datasets

    calls = []
    wiki_rows = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 ... \n"]
    enwik = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/">\n  <page>\n'

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs))
        rows = wiki_rows if path == "Salesforce/wikitext" else [enwik]
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert C.load_text("wikitext") == "".join(wiki_rows).encode()
    assert C.load_text("enwik8") == enwik.encode()
    assert calls == [("Salesforce/wikitext", "train", {"name": "wikitext-103-raw-v1"}),
                     ("LTCB/enwik8", "train", {"data_dir": "enwik8-raw", "revision": "refs/convert/parquet"})]


def test_local_dataset_dirs_offline_without_network(tmp_path):
    """Real load_dataset / load_from_disk in a fresh process with HF_DATASETS_OFFLINE=1 and every
    socket connection refused: parquet, json lines and save_to_disk directories of Shakespeare
    lines give the same bytes as the text itself."""
    script = textwrap.dedent(f"""
        import socket
        def no_network(*a, **k):
            raise OSError("network used")
        socket.socket.connect = no_network
        socket.create_connection = no_network
        import os, datasets
        from ouroboros_ds.train import corpora as C
        from ouroboros_ds.train import data as D
        text = C.load_text("shakespeare")[:200_000].decode("utf-8", errors="ignore")
        lines = text.splitlines(keepends=True)
        ds = datasets.Dataset.from_dict({{"text": lines, "n": list(range(len(lines)))}})
        root = {str(tmp_path)!r}
        os.makedirs(root + "/pq"); ds.to_parquet(root + "/pq/train.parquet")
        os.makedirs(root + "/js"); ds.to_json(root + "/js/train.jsonl")
        datasets.DatasetDict({{"train": ds, "validation": ds.select(range(3))}}).save_to_disk(root + "/disk")
        for d in ("pq", "js", "disk"):
            assert C.load_text(root + "/" + d) == text.encode(), d
        tok = D.load_token_data(root + "/pq", val_fraction=0.1)
        assert len(tok.train) + len(tok.val) == len(text.encode())
        print("ok", len(lines))
    """)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT,
               HF_DATASETS_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


def test_local_dir_that_is_not_a_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="--data: directory .* is not a data set"):
        C.load_text(str(tmp_path / "d"))
