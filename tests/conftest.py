"""Shared test setup: import paths for `python -m pytest` from the repository root.

Spawned ranks (tests/helpers.py) inherit this process's environment and sys.path, so they share
one torch-extensions cache: DeepSpeed's CPU comm op is JIT-built once (TORCH_EXTENSIONS_DIR if
set, else torch's default ~/.cache/torch_extensions/py<ver>_cpu) and reused by every rank.
"""
import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(TESTS), TESTS):  # `import ouroboros_ds` and `import ring`
    if path not in sys.path:
        sys.path.insert(0, path)

_SHM = "/dev/shm"
_shm_before: set = set()


def _ds_shm_files() -> set:
    try:
        return {f for f in os.listdir(_SHM) if f.startswith("deepspeed_allreduce_buffer_")}
    except OSError:
        return set()


def pytest_configure(config):
    """Registers the ``full`` marker; also builds DeepSpeed's comm op here, once, if the install did
    not: a rank that a test ends on purpose (a timeout, a killed peer) must never be the one building it."""
    from ouroboros_ds.pipe.launch import build_comm_op

    _register_markers(config)
    _shm_before.update(_ds_shm_files())
    build_comm_op()


def pytest_unconfigure():
    """End the pooled ranks (tests/helpers.py), then a safety net for
    ouroboros_ds.pipe.launch.release_shm_buffers: a rank that died before it could unlink its DeepSpeed
    shm buffer leaves ~66 MB of RAM in /dev/shm; those of this test run go now."""
    from helpers import close_pools

    close_pools()
    for name in _ds_shm_files() - _shm_before:
        try:
            os.unlink(os.path.join(_SHM, name))
        except OSError:
            pass


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run the full grids (e.g. the transport check over G 1-16 x M 1-32) and the tests "
                          "marked 'full' instead of a representative point per case")


def _register_markers(config):
    config.addinivalue_line("markers", "full: runs only with --full (another point of a grid, or a path a quick "
                                       "test also takes; its comment names that test)")


def pytest_collection_modifyitems(config, items):
    """Without --full, the tests marked ``full`` are deselected (reported as such, never silently)."""
    if config.getoption("--full"):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("full") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_generate_tests(metafunc):
    if "full_grid" in metafunc.fixturenames:
        metafunc.parametrize("full_grid", [metafunc.config.getoption("--full")], ids=["full" if
                             metafunc.config.getoption("--full") else "quick"])


@pytest.fixture(autouse=True)
def _torch_threads_as_found():
    """Every test leaves torch's thread count as it found it (some compare with the ranks on one
    thread): a later test must not silently run on one core."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
