"""The README as a user reads it.

- The library example (the python block under "Use it as a library") runs as written: saved to a
  file in an empty folder and launched with ``torchrun --nproc_per_node 2`` (2 gloo CPU ranks), with
  ``STEPS=3 SYNC_STEPS=1`` in the environment (the example reads them, so the test shortens it
  without editing it, and steps 1 and 2 are ring steps),
  under the emulation of NCCL's point-to-point rules (``helpers.train_env``).
  It must exit 0, print the loss of steps 0 and 2, both finite, the first near ln(256) (an untrained
  byte-level model is close to uniform), and a finite validation loss.
- README.md and the docs speak to users: no words about how the project is built (the patterns
  in FORBIDDEN: citations of its internal contract, its work items, its working periods).
"""
from __future__ import annotations

import glob
import math
import os
import re
import subprocess
import sys

from ouroboros_ds.ring.utils import free_port

from helpers import ROOT, train_env
README = os.path.join(ROOT, "README.md")


def library_example() -> str:
    """The first python code block of the README section headed "Use it as a library"."""
    text = open(README, encoding="utf-8").read()
    section = re.search(r"^## Use it as a library\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md: no '## Use it as a library' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "README.md: no ```python block under '## Use it as a library'"
    return block.group(1)


def test_library_example_runs_on_two_cpu_ranks(tmp_path):
    code = library_example()
    assert 'os.environ.get("STEPS"' in code, "the example must read STEPS from the environment"
    script = tmp_path / "example.py"
    script.write_text(code)
    env = train_env(STEPS="3", SYNC_STEPS="1")  # NCCL's point-to-point rules in both ranks, as for train.py
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(script)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = {int(s): float(v) for s, v in re.findall(r"^step (\d+): loss (\S+)$", r.stdout, re.M)}
    assert sorted(losses) == [0, 2], r.stdout[-3000:]
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert abs(losses[0] - math.log(256)) < 0.1, losses
    val = re.findall(r"^val loss (\S+) \((\S+) bits/byte\)$", r.stdout, re.M)
    assert len(val) == 1, r.stdout[-3000:]
    assert all(math.isfinite(float(x)) for x in val[0]), val


# Words that belong to how the project is built, not to its users (one letter in brackets, so
# that this file does not contain the words it forbids).
FORBIDDEN = [(r"\bS[P]EC\b", 0), (r"\bi[s]sues?\b", re.I), (r"\bs[e]ssions?\b", re.I)]


def test_docs_speak_to_users():
    paths = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    assert len(paths) > 1
    found = []
    for path in paths:
        for n, line in enumerate(open(path, encoding="utf-8"), start=1):
            for pattern, flags in FORBIDDEN:
                if re.search(pattern, line, flags):
                    found.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()[:120]}")
    assert not found, "\n".join(found)
