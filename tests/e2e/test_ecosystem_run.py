"""train.py as a user with a Hugging Face model and a wandb account runs it:
``--model HF_DIR --wandb PROJECT --export DIR --metrics PATH`` on 2 torchrun ranks, no API key
and no network. Checks the start-up summary, that wandb ran offline by default and logged what
the metrics file says (read back from the ``.wandb`` file wandb wrote), and that the export loads
with ``from_pretrained``."""
from __future__ import annotations

import glob
import json
import os
import struct

from helpers import run_train, train_env


def read_wandb_history(path: str) -> list[dict]:
    """History rows of an offline run's ``run-*.wandb`` file.

    The file is a LevelDB-style log (what wandb's ``datastore`` writes): a 7-byte header
    ``:W&B`` + magic + version, then 32 KiB blocks of chunks ``crc32(4) length(2) type(1)``,
    type 1 = a whole record, 2/3/4 = first/middle/last piece; each record is a ``Record``
    protobuf. wandb 0.31 no longer ships a Python reader, so this is one.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    block, pos, records, piece = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            piece = chunk
        elif kind == 3:
            piece += chunk
        elif kind == 4:
            records.append(piece + chunk)
    rows = []
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def test_hf_model_wandb_offline_export_end_to_end(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from ouroboros_ds.pipe.launch import _comm_op_lock

    torch.manual_seed(0)
    src = tmp_path / "hf_in"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=256,
                               bos_token_id=None, eos_token_id=None)).save_pretrained(src)
    metrics, out = tmp_path / "m.jsonl", tmp_path / "hf_out"
    # Caches stay where they are (a fresh HOME would rebuild DeepSpeed's JIT op, ~30 s); HOME: no
    # ~/.netrc login, so no API key anywhere.
    env = {k: v for k, v in train_env().items() if not k.startswith("WANDB_")}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.dirname(os.path.dirname(_comm_op_lock())))
    env.setdefault("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    env.update(WANDB_DIR=str(tmp_path), HOME=str(tmp_path), WANDB_SILENT="true")
    steps = 10
    r = run_train(["--model", str(src), "--wandb", "ouroboros-test", "--export", str(out), "--metrics", str(metrics),
                   "--steps", str(steps), "--sync-steps", "3", "--seq-len", "32", "--max-bytes", "100000",
                   "--eval-every", "5",
                   "--eval-batches", "2", "--stage-stats-every", "5"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # The progress bar (launching rank), updated every step with loss and tokens/s.
    bar = r.stderr.replace("\r", "\n")
    assert all(f"| {i}/{steps} [" in bar for i in range(steps + 1)), bar[-2000:]
    assert "loss=" in bar and "tok_s=" in bar

    # Start-up summary: one line per stage with layers, parameters and delays.
    assert f"initialized from {src}" in r.stdout
    # 2 blocks on G=2 (authors' rule): module 1 = embedding, module 2 = block 1, module 3 = block 2 + norm + head.
    lines = {ln.split(":")[0].strip(): ln for ln in r.stdout.splitlines() if ln.startswith("  stage ")}
    assert set(lines) == {"stage 0", "stage 1"}, r.stdout[-3000:]
    assert ("stage 0: 23,008 params | module 1 layers [0, 1) 10,240 params delay 2; "
            "module 3 layers [2, 5) 12,768 params delay 0") in lines["stage 0"]
    assert "module 2 layers [1, 2) 12,704 params delay 1" in lines["stage 1"]

    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    losses = [x["loss"] for x in recs if "loss" in x]
    evals = [x for x in recs if "val_bpb" in x]
    stats = [x for x in recs if "in_flight_bytes" in x]
    assert len(losses) == steps and [e["step"] for e in evals] == [5, 10]
    assert [(s["step"], s["stage"]) for s in stats] == [(5, 0), (5, 1), (10, 0), (10, 1)]
    assert all(s["in_flight_bytes"] > 0 and 0 < s["utilization"] <= 1 for s in stats), stats

    # wandb ran offline (no key) and its own files hold the same numbers.
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, os.listdir(tmp_path)
    rows = read_wandb_history(runs[0])
    logged = [row["Train/Samples/train_loss"] for row in rows if "Train/Samples/train_loss" in row]
    assert logged == losses  # float64 JSON both ways: exact
    assert [row["Eval/Samples/val_bpb"] for row in rows if "Eval/Samples/val_bpb" in row] == [e["val_bpb"] for e in evals]
    assert [row["Stage/1/in_flight_bytes"] for row in rows if "Stage/1/in_flight_bytes" in row] == \
        [s["in_flight_bytes"] for s in stats if s["stage"] == 1]
    assert [row["Stage/0/utilization"] for row in rows if "Stage/0/utilization" in row] == \
        [s["utilization"] for s in stats if s["stage"] == 0]
    assert sum("Train/Samples/tokens_per_s" in row for row in rows) == steps
    assert [row["Train/Samples/tokens_per_s"] for row in rows if "Train/Samples/tokens_per_s" in row] == \
        [x["tokens_per_s"] for x in recs if "loss" in x]
    assert [row["Stage/0/tokens_per_s"] for row in rows if "Stage/0/tokens_per_s" in row] == \
        [s["tokens_per_s"] for s in stats if s["stage"] == 0]
    assert all(s["tokens_per_s"] > 0 and s["peak_activation_bytes"] > 0 for s in stats), stats
    assert [row.get(f"Delay/module_{k}") for k in (1, 2, 3) for row in rows[:1]] == [2, 1, 0]

    # The trained model comes back with from_pretrained, tied, and differs from the start.
    model = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(src)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert not torch.equal(model.transformer.wte.weight, start.transformer.wte.weight)
