"""What one GPU can check, in one command (a few minutes on an H100/H200):

1. The engine's CUDA path at G = 1 against the Reference: the Ouroboros engine (the default, weight
   prediction through features replay and module K's look-ahead; the paper's update; stash replay;
   a memory-bounded replay plan) trains a small model with dropout for a few steps on the GPU; the
   single-process Reference runs the same steps on the same device; the parameters must agree
   (fp32: within 1e-4 on the GPU, whose embedding backward sums in no fixed order; bitwise on the
   CPU).
2. Per-instruction costs of a GPT-2-medium-sized block (d 1024, 16 heads, seq 1024, bf16):
   forward, backward, the tied head + loss, the optimizer step per block, and the bytes it saves,
   written as :class:`ouroboros_ds.tools.speed_map.BlockCosts` JSON for the (G, M) map::

       python -m ouroboros_ds.tools.gpu_check --out gpu_costs.json
       python -m ouroboros_ds.tools.speed_map --costs gpu_costs.json --png docs/speed_map_gpu.png

Without a GPU it runs the same code on the CPU with tiny shapes (``--tiny``, the default there),
which is how it is tested.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def engine_vs_reference(steps: int = 4, M: int = 4) -> list[str]:
    """Part 1: the engine at G = 1 (one rank) in each replay mode against the Reference."""
    import torch

    from .. import OuroborosPipelineModule, Reference, gpt2_config, gpt2_layer_specs, initialize, lm_loss
    from ..pipe.launch import init_distributed
    from ..ring.config import RingConfig
    from ..ring.memory import ReplayPlan

    dev = _device()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from ..ring.utils import free_port
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    init_distributed(timeout=datetime.timedelta(seconds=300), backend="nccl" if dev.type == "cuda" else "gloo")
    # the Reference runs on the same device: the same keyed dropout masks from the device's generator
    cfg = gpt2_config({"n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 64}, 256, dropout=0.1)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": M,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "gradient_clipping": 1.0, "steps_per_print": 10**9}
    g = torch.Generator().manual_seed(0)
    data = [[(torch.randint(0, 256, (4, 64), generator=g), torch.randint(0, 256, (4, 64), generator=g))
             for _ in range(M)] for _ in range(steps)]
    lines = []
    # the default (weight prediction through features replay, look-ahead), the paper's, stash, a mixed plan
    for replay, plan, pred, look in (("recompute", None, 1.0, 3.0), ("recompute", None, 0.0, 0.0),
                                     ("stash", None, 0.0, 0.0), ("stash", ReplayPlan({1: 1}), 0.0, 0.0)):
        spec = gpt2_layer_specs(cfg, seed=7)
        ring = RingConfig.paper(replay=replay, weight_prediction=pred, lookahead=look)
        mod = OuroborosPipelineModule(spec.specs, num_stages=1, loss_fn=lm_loss, block_indices=spec.block_indices)
        engine, *_ = initialize(model=mod, model_parameters=list(mod.parameters()), config=ds, seed=3,
                                ring=ring, replay_plan=plan)
        it = iter([mb for step in data for mb in step])
        losses = [float(engine.train_batch(it)) for _ in range(steps)]
        ref = Reference(gpt2_layer_specs(cfg, seed=7), 1, ds, lm_loss, seed=3, ring=ring).to(dev)
        ref_losses = [ref.step([(x.to(dev), y.to(dev)) for x, y in b]) for b in data]
        got = {n: p.detach().float().cpu() for n, p in _named(mod)}
        want = {n: p.detach().float().cpu() for n, p in ref.named_parameters()}
        diff = max((got[n] - want[n]).abs().max().item() for n in want)
        bitwise = all(torch.equal(got[n], want[n]) for n in want)
        ok = bitwise if dev.type == "cpu" else diff <= 1e-4
        lines.append(f"engine vs Reference, G=1 M={M} replay={replay} plan={plan} prediction={pred} lookahead={look}: "
                     f"{steps} steps on {dev.type}; "
                     f"max |param diff| {diff:.3g}, bitwise {bitwise}; losses {losses[-1]:.4f} vs "
                     f"{ref_losses[-1]:.4f}: {'OK' if ok else 'MISMATCH'}")
    return lines


def _named(mod):
    seen = set()
    for k in mod.local_modules:
        start, stop = mod.module_bounds[k - 1]
        for i, layer in zip(range(start, stop), mod.module_funcs[k]):
            if isinstance(layer, torch_module()):
                for n, p in layer.named_parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield f"{i}.{n}", p


def torch_module():
    import torch

    return torch.nn.Module


def block_costs(tiny: bool, repeats: int = 10) -> dict:
    """Part 2: a GPT-2-medium-sized block (bf16 on the GPU) timed per instruction kind."""
    import torch

    from ..ring.memory import measure_layers
    from ..models.gpt2 import Block, Embedding, FinalNorm, gpt2_config, lm_head, lm_loss

    dev = _device()
    if tiny:
        shape = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64}
        vocab, mb, seq, dtype = 256, 2, 64, torch.float32
    else:
        shape = {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024}
        vocab, mb, seq, dtype = 50257, 8, 1024, torch.bfloat16
    cfg = gpt2_config(shape, vocab, dropout=0.1)
    emb = Embedding(cfg, init_seed=0).to(dev, dtype)
    blk = Block(cfg, 1, init_seed=1).to(dev, dtype)
    norm = FinalNorm(cfg).to(dev, dtype)
    ids = torch.randint(0, vocab, (mb, seq), device=dev)
    with torch.no_grad():
        h0 = emb(ids)

    def timed(fn):
        fn()  # warm-up
        _sync()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    x = h0.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            blk(x)

    def fwd_bwd():
        y = blk(x)
        y.backward(torch.ones_like(y))

    def head_fwd():
        with torch.no_grad():
            lm_loss(lm_head(emb, norm(x)), ids)

    def head_fwd_bwd():
        lm_loss(lm_head(emb, norm(x)), ids).backward()

    f, fb = timed(fwd), timed(fwd_bwd)
    hf, hfb = timed(head_fwd), timed(head_fwd_bwd)
    params = list(blk.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    step = timed(opt.step)
    mem = measure_layers([blk], h0)[0]
    head_mem = measure_layers([norm], h0)[0].graph
    logits_bytes = mb * seq * vocab * torch.finfo(dtype).bits // 8 * 2  # logits + their fp32 loss copy, about
    return {"f": f, "b": max(fb - f, 0.0), "head_f": hf, "head_b": max(hfb - hf, 0.0), "step": step,
            "graph": float(mem.graph), "inputs": float(mem.inputs), "params": float(mem.params),
            "head_graph": float(head_mem + logits_bytes), "tokens": mb * seq}


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m ouroboros_ds.tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the default without a GPU)")
    p.add_argument("--out", default=None, help="write the block costs (speed_map --costs JSON) here")
    args = p.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    t0 = time.perf_counter()
    print(f"gpu_check: device {_device()}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")
          + ("; tiny shapes" if tiny else "; GPT-2-medium block, bf16"), flush=True)
    lines = engine_vs_reference()
    for line in lines:
        print(line, flush=True)
    costs = block_costs(tiny)
    print("block costs: " + json.dumps(costs), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(costs, f)
    print(f"gpu_check: done in {time.perf_counter() - t0:.0f} s", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if all(line.endswith("OK") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
