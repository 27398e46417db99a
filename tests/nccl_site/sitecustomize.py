"""Start-up hook of the test suite's ``train.py`` runs: NCCL's point-to-point rules on gloo.

``tests/helpers.py``'s ``train_env()`` puts this folder on ``PYTHONPATH``, so every Python
process of a launch (the ``torchrun`` or ``deepspeed`` launcher and each ``train.py`` rank) runs
this file at interpreter start. With ``OUROBOROS_NCCL_EMULATION`` set and not "0" it installs
``tests/nccl_emulation.py`` right after the process first imports ``torch``, before any process
group or engine exists, so the ranks' traffic follows NCCL's rules as on GPUs. It imports nothing
itself (a process that never imports torch is left alone, and torch is never imported early or
half-initialized); with the variable off or unset it does nothing at all. Another
``sitecustomize`` further along ``sys.path`` (a virtual environment's, say) still runs.
"""
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_EMULATION = os.path.join(os.path.dirname(_HERE), "nccl_emulation.py")


def _install_emulation():
    module = sys.modules.get("nccl_emulation")
    if module is None:
        spec = importlib.util.spec_from_file_location("nccl_emulation", _EMULATION)
        module = importlib.util.module_from_spec(spec)
        sys.modules["nccl_emulation"] = module  # the same module a test importing it gets
        spec.loader.exec_module(module)
    module.install()


class _AfterTorch:
    """Meta-path finder that wraps torch's loader once: install after ``import torch`` completes."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                _install_emulation()
            except Exception as e:
                sys.stderr.write(f"tests/nccl_site/sitecustomize.py: installing the NCCL emulation failed: {e!r}\n")
                raise
        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def _chain():
    """Run the next ``sitecustomize`` on ``sys.path``, which this one hides."""
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == _HERE:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


if os.environ.get("OUROBOROS_NCCL_EMULATION", "") not in ("", "0") and "torch" not in sys.modules:
    sys.meta_path.insert(0, _AfterTorch())
_chain()
