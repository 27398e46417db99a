"""Shared test setup: import paths for `python -m pytest` from the repository root.

Spawned ranks (tests/ring.py) inherit this process's environment and sys.path, so they share
one torch-extensions cache: DeepSpeed's CPU comm op is JIT-built once (TORCH_EXTENSIONS_DIR if
set, else torch's default ~/.cache/torch_extensions/py<ver>_cpu) and reused by every rank.
"""
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(TESTS), TESTS):  # `import ouroboros_ds` and `import ring`
    if path not in sys.path:
        sys.path.insert(0, path)
