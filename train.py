"""Train a GPT-2-style or Llama-style language model with the Ouroboros pipeline on DeepSpeed (or,
for the baseline, with DeepSpeed's stock synchronous 1F1B pipeline on the same model and data).

Launch:
  CPU-only box (2 ranks on gloo; each rank gets cores / ranks torch threads):
    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/ouroboros.json
    torchrun --nproc_per_node 2 train.py --deepspeed_config ds_configs/ouroboros.json
  One process (G = 1: modules 1 and 2 share stage 0; still the delayed update):
    python train.py --deepspeed_config ds_configs/ouroboros.json
  G = 2 stages x D = 2 data-parallel replicas (world = G x D; bf16 + ZeRO-1 config):
    deepspeed --num_gpus 4 train.py --deepspeed_config ds_configs/ouroboros_bf16_zero1.json --pipeline-parallel-size 2
  GPUs (one rank per GPU, NCCL):
    deepspeed --num_gpus 4 train.py --deepspeed_config ds_configs/ouroboros.json --pipeline-parallel-size 4
  Baseline on the same model, data and seed:
    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/ouroboros.json --schedule 1f1b
  Installed package (pip install .): the same flags through the `ouroboros-train` command or the module:
    deepspeed --num_gpus 2 $(which ouroboros-train) --deepspeed_config ds_configs/ouroboros.json
    torchrun --nproc_per_node 2 -m ouroboros_ds.train.trainer --deepspeed_config ds_configs/ouroboros.json
  Slurm: sbatch launch_scripts/ouroboros.sbatch (requeues itself on preemption, resumes from its save).

The same --seed gives both schedules the same initial weights, the same batches and the same
dropout masks, so their first losses are equal and later differences are the algorithm's.
Checkpoints: --save DIR [--save-every N] saves at the end, every N steps and on SIGTERM/SIGUSR1
(all ranks stop after the same step); --load DIR resumes exactly (--steps is the total).
Metrics (--metrics PATH, JSON lines, written by global rank 0): one line per step
{"step", "loss", "tokens", "seconds", "train_seconds", "lr"} (seconds: wall-clock since the first
step; train_seconds: time inside train_batch only, without evaluations and saves) and one per
evaluation {"step", "val_loss", "val_bpb"}; at start {"step": 0, "delays": {module: delay}}, and
every --stage-stats-every steps one line per stage {"step", "stage", "dp_rank", "in_flight_bytes",
"step_seconds", "utilization"}. Plot runs with: python -m ouroboros_ds.tools.plot A.jsonl B.jsonl --out loss.png

Hugging Face: --model DIR (a save_pretrained directory of GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma,
Phi-3, OLMo-2, ...: config, and weights if saved), --export DIR; named Llama-style sizes such as
--model llama-tiny (docs/families.md).
wandb: --wandb PROJECT (DeepSpeed's monitor; offline without an API key).
All flags: python train.py --help (they and their checks live in ouroboros_ds/train/config.py; the loop
in ouroboros_ds/train/trainer.py).
"""
import sys

from ouroboros_ds.train.trainer import cli

if __name__ == "__main__":
    sys.exit(cli())
