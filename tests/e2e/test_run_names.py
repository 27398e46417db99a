"""File names made from --data (and parity's --variants): plain names in the output folder, whatever
the corpus is (builtin, relative or absolute path, hub name), found again by --reuse."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ouroboros_ds.train.corpora import corpus_name, safe_name

from helpers import ROOT
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import parity as P  # noqa: E402
import staleness as E  # noqa: E402


def _corpus(folder) -> str:
    """An absolute path to a small local text file (enough for a few 16-byte windows)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "corpus.txt")
    words = "the ring sends each module's gradient one step late and still it learns".split()
    with open(path, "w") as f:
        f.write("\n".join(" ".join(words[(i + j) % len(words)] for j in range(9)) for i in range(600)))
    return os.path.abspath(path)


def _env():  # this checkout's package, also where another one is installed
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def test_corpus_names_are_plain_file_names(tmp_path, monkeypatch):
    assert corpus_name("shakespeare") == "shakespeare" and corpus_name("wikitext-2") == "wikitext-2"
    a, b = _corpus(tmp_path / "a"), _corpus(tmp_path / "b")
    assert corpus_name(a).startswith("corpus.txt-") and corpus_name(a) != corpus_name(b)  # same base name
    monkeypatch.chdir(tmp_path)
    assert corpus_name(os.path.join("a", "corpus.txt")) == corpus_name(a)  # relative: the same file, the same name
    assert corpus_name("~/corpus.txt").startswith("corpus.txt-")
    for name in (a, "a/corpus.txt", "~/corpus.txt", "org/name", "org/name:config", "/", "x" * 300 + ".txt"):
        n = corpus_name(name)
        assert os.path.basename(n) == n and not n.startswith(".") and 0 < len(n) <= 64, (name, n)
    assert corpus_name("org/name") != corpus_name("org_name") == "org_name"
    assert safe_name("default") == "default" and safe_name('{"lookahead": 1.0}') != safe_name('{"lookahead": 1.0 }')


def test_parity_runs_go_under_raw_and_are_reused(tmp_path):
    data = _corpus(tmp_path / "corpus")
    out, raw = tmp_path / "out", tmp_path / "raw"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "parity.py"), "--out", str(out), "--raw", str(raw),
           "--stages", "2", "--micro-batches", "1", "--variants", "1f1b", "paper", "--lrs", "2e-3", "--seeds", "0",
           "--steps", "2", "--eval-every", "2", "--eval-sequences", "32", "--batch", "4", "--seq-len", "16",
           "--jobs", "1"]
    r = subprocess.run(cmd + ["--data", data], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert os.listdir(tmp_path / "corpus") == ["corpus.txt"]  # nothing written beside the corpus
    names = sorted(os.listdir(raw))
    assert names == sorted(P.run_key(data, 2, 1, v, 2e-3, 0, 2) + ".json" for v in ("1f1b", "paper"))
    assert all(n.startswith(corpus_name(data) + "_g2_m1_") for n in names)
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith(f"| {data} |")]
    assert len(rows) == 2
    again = subprocess.run(cmd + ["--data", data, "--reuse"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "2 runs reused, 0 to run" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    # the same file as a relative path: the same runs, tabled under the name given now
    rel = subprocess.run(cmd + ["--data", os.path.join("corpus", "corpus.txt"), "--table-only"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert rel.returncode == 0 and "2 runs reused, 0 to run" in rel.stdout, rel.stdout[-2000:] + rel.stderr[-2000:]
    assert sum(line.startswith("| corpus/corpus.txt |") for line in (out / "results.md").read_text().splitlines()) == 2
    assert sorted(os.listdir(raw)) == names and os.listdir(tmp_path / "corpus") == ["corpus.txt"]


def test_staleness_metrics_go_under_out_and_are_reused(tmp_path, capsys):
    """Its runs are torchrun jobs (tested in test_experiment.py): here a finished run's metrics are
    laid where the grid looks for them, and --reuse must find them there instead of training."""
    data = _corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    out.mkdir()
    recs = [{"step": 0, "loss": 5.0, "seconds": 1.0, "train_seconds": 1.0},
            {"step": 1, "loss": 4.0, "seconds": 2.0, "train_seconds": 2.0},
            {"step": 2, "val_bpb": 4.5}]
    (out / f"{corpus_name(data)}_g2_1f1b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert E.main(["--out", str(out), "--data", data, "--stages", "2", "--runs", "1f1b", "--steps", "2",
                   "--eval-every", "2", "--reuse"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert f"| {data} | 2 | 1f1b | 4.5000 |" in (out / "results.md").read_text()
    assert os.listdir(tmp_path / "corpus") == ["corpus.txt"]
