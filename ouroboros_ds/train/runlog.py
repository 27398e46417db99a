"""What a person and a dashboard see of a run: the start-up summary, per-stage statistics gathered
to rank 0, and our metrics written through DeepSpeed's monitor (wandb, TensorBoard, CSV: whatever
the config's monitor sections enable).

DeepSpeed's monitor only writes on global rank 0, and the Ouroboros steady state has no
collective across stages, so per-stage numbers reach rank 0 by a ``gather_object`` outside
``train_batch`` (at start-up and every ``--stage-stats-every`` steps), never inside a step.
"""
from __future__ import annotations

import netrc
import os
import time

import torch.distributed as tdist

from ..core import schedule as S


def wandb_mode_default(ds_config: dict) -> str | None:
    """If the config enables wandb and no API key or login is found, default ``WANDB_MODE`` to
    ``offline`` (runs are written locally and can be sent later with ``wandb sync``) instead of
    letting ``wandb.init`` prompt or fail without network. Returns the mode in force."""
    if not ds_config.get("wandb", {}).get("enabled"):
        return None
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        try:
            logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (FileNotFoundError, netrc.NetrcParseError):
            logged_in = False
        if not logged_in:
            os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def _gather(obj):
    """All ranks' ``obj`` on rank 0 (a list in rank order), None elsewhere."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [obj]
    out = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
    tdist.gather_object(obj, out, dst=0)
    return out


def _local_layout(engine) -> dict:
    """This rank's stage, its modules (layer range, parameters, delay) for the summary."""
    module = engine.module
    G = engine.num_stages
    info = {"stage": engine.stage_id, "dp_rank": engine.mpu.get_data_parallel_rank(), "modules": []}
    if hasattr(module, "module_bounds"):  # the Ouroboros ring: one or two modules per stage
        seen = set()  # the tied embedding is in modules 1 and K: count it once, in module 1
        for k in S.modules_of(engine.stage_id, G):
            start, stop = module.module_bounds[k - 1]
            params = [p for p in module.module_parameters(k) if id(p) not in seen]
            seen.update(map(id, params))
            info["modules"].append({"module": k, "layers": [start, stop], "delay": S.delay(k, G),
                                    "params": sum(p.numel() for p in params)})
    else:  # DeepSpeed's stock pipeline: one contiguous range, synchronous (delay 0)
        info["modules"].append({"module": engine.stage_id + 1, "layers": [module._local_start, module._local_stop],
                                "delay": 0, "params": sum(p.numel() for p in module.parameters())})
    return info


def startup_summary(engine) -> list[str] | None:
    """Collective. Rank 0 gets one line per stage: modules, layer ranges, parameters, delays."""
    parts = _gather(_local_layout(engine))
    if parts is None:
        return None
    lines = []
    for info in sorted((p for p in parts if p["dp_rank"] == 0), key=lambda p: p["stage"]):
        mods = "; ".join(f"module {m['module']} layers [{m['layers'][0]}, {m['layers'][1]}) "
                         f"{m['params']:,} params delay {m['delay']}" for m in info["modules"])
        total = sum(m["params"] for m in info["modules"])
        lines.append(f"  stage {info['stage']}: {total:,} params | {mods}")
    return lines


def delays(engine) -> dict[int, int]:
    """Module -> gradient delay in steps (K - k for the ring, 0 for the synchronous baseline)."""
    if hasattr(engine.module, "module_bounds"):
        G = engine.num_stages
        return {k: S.delay(k, G) for k in range(1, S.num_modules(G) + 1)}
    return {k: 0 for k in range(1, engine.num_stages + 1)}


def track_waits(engine) -> bool:
    """Count the seconds the Ouroboros engine spends blocked on receives (its ``p2p.wait``), for
    the per-stage utilization. Wraps the channel's method on this instance only; returns False
    for an engine without a ring channel (DeepSpeed's stock 1F1B, whose receives are blocking
    calls inside its instructions: no utilization is reported for it)."""
    channel = getattr(engine, "p2p", None)
    if channel is None:
        return False
    inner = channel.wait
    engine.wait_seconds = 0.0

    def timed_wait(entry):
        t0 = time.perf_counter()
        try:
            return inner(entry)
        finally:
            engine.wait_seconds += time.perf_counter() - t0

    channel.wait = timed_wait
    return True


class PeakMemory:
    """Measured peak memory of a rank's ``train_batch`` calls, per stage-stats window.

    ``peak_activation_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` (everything the device
    holds, weights and optimizer included); on CPU the activations autograd saves, the stashed
    inputs and the weight snapshots (:class:`ouroboros_ds.ring.saved_bytes.SavedBytes`, parameters excluded).
    ``peak_rss_bytes``: the process's peak resident memory (Linux VmHWM, restarted per window)."""

    def __init__(self, engine):
        import torch

        from ..ring.saved_bytes import SavedBytes

        self.cuda = torch.cuda.is_available() and engine.device.type == "cuda"
        self.counter = None
        if not self.cuda:
            self.counter = SavedBytes()
            self.counter.exclude = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
            if hasattr(engine, "saved_bytes"):
                engine.saved_bytes = self.counter  # the ring's stashed inputs and snapshots too
        self.reset()

    def track(self, engine):
        from contextlib import nullcontext

        return self.counter.hooks() if self.counter is not None else nullcontext()

    def reset(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.reset_peak_memory_stats()
        else:
            self.counter.reset_peak()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # restart VmHWM
        except OSError:
            pass

    def report(self) -> dict:
        if self.cuda:
            import torch
            act = torch.cuda.max_memory_allocated()
        else:
            act = self.counter.peak
        rss = None
        try:
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            import resource
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.reset()
        return {"peak_activation_bytes": int(act), "peak_rss_bytes": int(rss)}


def stage_stats(engine, train_seconds: float, steps: int, peak: PeakMemory | None = None) -> list[dict] | None:
    """Collective. Rank 0 gets per-stage stats of data-parallel rank 0 over the last ``steps``
    steps: in-flight bytes now (stashed inputs and received error gradients held across steps),
    mean seconds per ``train_batch`` on that rank, and, with :func:`track_waits`, utilization =
    1 - (seconds blocked on receives) / (seconds in ``train_batch``); with ``peak``, the measured
    peak memory of the window (:class:`PeakMemory`)."""
    in_flight = engine.in_flight_bytes() if hasattr(engine, "in_flight_bytes") else 0
    mine = {"stage": engine.stage_id, "dp_rank": engine.mpu.get_data_parallel_rank(),
            "in_flight_bytes": int(in_flight), "step_seconds": float(train_seconds / max(1, steps))}
    if peak is not None:
        mine.update(peak.report())
    if hasattr(engine, "wait_seconds"):
        mine["utilization"] = max(0.0, 1.0 - engine.wait_seconds / train_seconds) if train_seconds > 0 else None
        engine.wait_seconds = 0.0
    parts = _gather(mine)
    if parts is None:
        return None
    return sorted((p for p in parts if p["dp_rank"] == 0), key=lambda p: p["stage"])


def monitor_events(engine, rec: dict) -> None:
    """Write one of train.py's metric records through DeepSpeed's monitor (rank 0 only; the
    monitor itself ignores other ranks). Steps are ``global_samples``, the x axis DeepSpeed's own
    ``Train/Samples/train_loss`` uses, so wandb's monotonic-step rule holds for all of them."""
    if not engine.monitor.enabled:
        return
    x = engine.global_samples
    names = {"tokens_per_s": "Train/Samples/tokens_per_s", "val_loss": "Eval/Samples/val_loss",
             "val_bpb": "Eval/Samples/val_bpb"}
    events = [(names[k], float(v), x) for k, v in rec.items() if k in names and "stage" not in rec]
    if "stage" in rec:  # a stage's window: its tokens/s is not the run's
        s = rec["stage"]
        events += [(f"Stage/{s}/in_flight_bytes", float(rec["in_flight_bytes"]), x),
                   (f"Stage/{s}/step_seconds", float(rec["step_seconds"]), x)]
        events += [(f"Stage/{s}/{k}", float(rec[k]), x)
                   for k in ("peak_activation_bytes", "peak_rss_bytes", "tokens_per_s") if rec.get(k) is not None]
        if rec.get("utilization") is not None:
            events.append((f"Stage/{s}/utilization", float(rec["utilization"]), x))
    if "delays" in rec:
        events += [(f"Delay/module_{k}", float(d), x) for k, d in rec["delays"].items()]
    if events:
        engine.monitor.write_events(events)
