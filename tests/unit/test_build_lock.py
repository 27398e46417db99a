"""A JIT build of DeepSpeed's comm op killed part-way leaves torch's lock file, and every later
start would wait on it forever: the start-up removes a lock older than any build, never a live one."""
import os
import time

import pytest

from ouroboros_ds.pipe.launch import _comm_op_lock, clear_stale_build_lock


def test_stale_lock_goes_and_a_live_one_stays(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _comm_op_lock()
    if lock is None:
        pytest.skip("this accelerator builds no comm op")
    assert lock.startswith(str(tmp_path))
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    open(lock, "w").close()
    clear_stale_build_lock(stale_after=600)
    assert os.path.exists(lock), "a build that started just now still holds its lock"
    old = time.time() - 3600
    os.utime(lock, (old, old))
    clear_stale_build_lock(stale_after=600)
    assert not os.path.exists(lock)
    assert "interrupted build" in capsys.readouterr().out
    clear_stale_build_lock(stale_after=600)  # no lock: nothing to do, no error
