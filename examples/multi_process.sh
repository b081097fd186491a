#!/usr/bin/env bash
# Multi-process caching. Every process computes its own shards of the dataset (shard s goes to
# rank s % world_size), the manifest lists them all, and the preconditioner statistics are summed
# across ranks: the cache equals a single-process one (same rows, same order, fp tolerance).
#
# Your training script needs no change: use AttributionTrainer (or GraSSCallback) as usual and
# launch it with torchrun or accelerate. The examples below launch a script `train.py` that calls
# `trainer.build_gradient_cache()` (e.g. examples/callback_existing_trainer.py).
set -euo pipefail
SCRIPT="${1:-examples/callback_existing_trainer.py}"

# 1) torchrun, 2 processes on one machine (on a CPU-only box torch uses gloo)
torchrun --nproc_per_node 2 "$SCRIPT"

# 2) accelerate, 8 GPUs (on CPU, `accelerate launch --cpu --num_processes 2` starts only one
#    process; use torchrun there)
# accelerate launch --num_processes 8 "$SCRIPT"

# 3) DeepSpeed ZeRO-3: pass the config to TrainingArguments(deepspeed="examples/ds_zero3.json")
#    in the script and launch as above. A DeepSpeed engine exists only after trainer.train() has
#    started, and an eval-only ZeRO-3 engine refuses every backward, so build the cache after (or
#    during, with GraSSCallback) training. The pass never steps the optimizer and leaves no
#    gradients; under ZeRO-3 the ranks run their forward/backward passes in lockstep (a rank with
#    fewer examples runs discarded dummy batches) because parameters are gathered collectively.
# On CPU-only machines:
#   DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 train_with_deepspeed.py
