"""Helpers for multi-process tests: run a function on N gloo ranks (CPU), one thread each."""
from __future__ import annotations

import os
import traceback

import torch
import torch.multiprocessing as mp

from ouroboros_ds.utils import free_port


def _entry(rank, world, port, fn, args, errfile):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(fn, world: int, *args, tmpdir: str, timeout: float = 600):
    """Run ``fn(rank, *args)`` on ``world`` spawned processes; raise with the ranks' tracebacks."""
    errfile = os.path.join(tmpdir, "rank_error")
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, errfile), nprocs=world,
                             join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=timeout):
            pass
    except Exception as e:
        msgs = []
        for r in range(world):
            if os.path.exists(f"{errfile}.{r}"):
                msgs.append(f"--- rank {r}:\n" + open(f"{errfile}.{r}").read())
        raise RuntimeError("\n".join(msgs) or str(e)) from None
