"""The benchmark's table (``python -m ouroboros_ds.tools.bench``): step times, ratios, measured and
simulated utilization, memory, from the ranks' records."""
from __future__ import annotations

import statistics

SINGLE = ("1proc-1thread", "1proc-all")  # the single-process rows: not pipelines, reported last


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _predict(name, ranks, G, M):
    """Simulator prediction from the measured mean instruction costs: per-stage utilization.
    DeepSpeed's schedules run through :mod:`ouroboros_ds.tools.rivals` (their own instruction lists),
    Ouroboros through :func:`ouroboros_ds.core.simulate.simulate` on the ring schedule."""
    from ..core.schedule import ouroboros_schedule
    from ..core.simulate import Costs, simulate, steady_steps

    means = [{k: statistics.mean(v) for k, v in r[name]["durations"].items()} for r in ranks]
    if name.startswith("1f1b") or name == "dualpipev":
        from . import rivals

        phases = (0, 1) if name == "dualpipev" else (0,)
        costs = rivals.RivalCosts(forward=[[m.get(f"F:{p}", 0.0) for p in phases] for m in means],
                                  backward=[[m.get(f"B:{p}", 0.0) for p in phases] for m in means],
                                  step=[m.get("STEP:0", 0.0) for m in means])
        scheds = rivals.dualpipev_schedules(G, M) if name == "dualpipev" else rivals.train_schedules(G, M)
        return rivals.simulate_rival(scheds, costs).utilization
    fwd, rep, loss, step = {}, {}, 0.0, 0.0
    for s, m in enumerate(means):
        for key, v in m.items():
            kind, mod = key.split(":")
            if kind == "F":
                fwd[int(mod)] = v
            elif kind == "B":
                rep[int(mod)] = v
            elif kind == "L":
                loss = v
            elif kind == "STEP":
                step = max(step, v)
    window = steady_steps(G)
    tl = simulate(ouroboros_schedule(G, M), Costs(forward=fwd, replay=rep, loss=loss, step=step), steps=window.stop)
    return tl.steady_utilization(window)


def step_times(ranks) -> dict:
    """Per configuration: the median over rounds of the slowest rank's mean step time."""
    return {name: _median([max(r[name]["step_times"][i] for r in ranks if r[name]["step_times"])
                           for i in range(len(ranks[0][name]["step_times"]))])
            for name in ranks[0] if not name.startswith("_")}


def report(args, ranks) -> str:
    G, M = args.stages, args.micro_batches
    tokens = args.micro_batch_size * M * args.seq_len
    st = step_times(ranks)
    t1 = st.get("1proc-1thread")
    lines = ["| configuration | step (s) | tokens/s | vs 1F1B | vs 1F1B+ckpt | vs DualPipeV | eta "
             "| util measured (per stage) | util simulated | peak activation memory MB (per stage) "
             "| peak RSS MB (per stage) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    mb = 2 ** 20
    names = [n for n in ranks[0] if not n.startswith("_") and n not in SINGLE]
    for name in names + list(SINGLE):
        if name not in st:
            continue
        cells = [name, f"{st[name]:.3f}", f"{tokens / st[name]:,.0f}"]
        for rival in ("1f1b", "1f1b+ckpt", "dualpipev"):
            cells.append(f"{st[rival] / st[name]:.3f}" if rival in st else "-")
        if name in names:
            cells.append(f"{t1 / (G * st[name]):.3f}" if t1 else "-")
            util = [sum(r[name]["busy"]) / sum(r[name]["wall"]) for r in ranks]  # over all timed rounds
            cells.append(" / ".join(f"{u:.3f}" for u in util))
            cells.append(" / ".join(f"{u:.3f}" for u in _predict(name, ranks, G, M)))
            mem = [r[name]["memory"] for r in ranks]
            key = "cuda_max_allocated" if "cuda_max_allocated" in mem[0] else "saved_activations_peak"
            cells.append(" / ".join(f"{m[key] / mb:.4g}" for m in mem))
            cells.append(" / ".join(f"{m['peak_rss'] / mb:.0f}" for m in mem))
        else:
            cells.append(f"{t1 / st[name]:.3f}" if t1 else "-")  # eta of a one-process run: speed-up over 1 thread
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    costs = []
    for name in names:
        if name.startswith("ouro"):
            means = {}
            for r in ranks:
                means.update({k: statistics.mean(v) * 1e3 for k, v in r[name]["durations"].items()})
            costs.append(f"{name}: blocks of modules 1..K {ranks[0][name].get('blocks_per_module')}; mean ms per "
                         "instruction " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(means.items())))
            if ranks[0][name].get("plan"):
                costs.append(f"{name}: {ranks[0][name]['plan']}")
        elif name in ranks[0]:
            per = [{k: statistics.mean(v) * 1e3 for k, v in r[name]["durations"].items()} for r in ranks]
            costs.append(f"{name}: mean ms per instruction (F:phase, B:phase), by stage " + "; ".join(
                ", ".join(f"{k} {v:.1f}" for k, v in sorted(p.items())) for p in per))
    held = "; ".join(f"{name} " + " / ".join(
        f"{r[name]['memory']['stashed_inputs'] / mb:.3g} + {r[name]['memory']['weight_snapshots'] / mb:.3g}"
        for r in ranks) for name in names if name.startswith("ouro"))
    costs.append(f"held between steps, stashed inputs + weight snapshots MB, by stage: {held}")
    faults = "; ".join(f"{name} " + " / ".join(f"{_median(r[name]['page_faults']):,.0f}" for r in ranks)
                       for name in names)
    costs.append(f"minor page faults per step, by stage (first touch of fresh memory; a load-independent "
                 f"hint of allocation churn): {faults}")
    rss = ", ".join(f"{r['_rank']['peak_rss_kb'] / 1024:.0f}" for r in ranks)
    return (out + "\n\n" + "\n".join(costs) + f"\n\nprocess peak RSS per rank over the whole run (MB, all engines "
            f"together): {rss}; torch threads per rank: {ranks[0]['_rank']['threads']}; device: "
            f"{ranks[0]['_rank']['device']}")
