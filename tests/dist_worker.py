"""Launched by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Builds the gradient cache of a fixed tiny model with AttributionTrainer (optionally under DeepSpeed
ZeRO-2/3, after a zero-learning-rate training step so a training engine exists), then scores fixed
queries, and has rank 0 save the scores and a few facts about the run.

With ``--poison INDEX`` that training example gets a token (``POISON``) that makes the model's
numerics fail on it alone: a NaN activation in the forward (``--poison-at forward``: a non-finite
loss) or a NaN gradient in the backward (``backward``). Each rank then writes the error it raised to
``error-rank{r}.txt`` and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from datasets import Dataset
from transformers import TrainingArguments

from hf_grass import AttributionTrainer, GraSSConfig
from hf_grass.testing import random_token_examples, tiny_gpt2

VOCAB = 40
N_TRAIN = 23
POISON = 1  # never drawn by random_token_examples (ids 4..VOCAB-1)


def poison(model: torch.nn.Module, at: str) -> None:
    """NaN in the first block's MLP output (forward) or in the gradient reaching it (backward), for
    the batch rows that hold the POISON token."""
    rows: dict[str, torch.Tensor] = {}

    def remember(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        rows["bad"] = (kwargs["input_ids"] == POISON).any(dim=1)[:, None, None]

    def corrupt(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        bad = rows["bad"]
        if at == "forward":
            return out.masked_fill(bad, float("nan"))
        if out.requires_grad:
            out.register_hook(lambda grad: grad.masked_fill(bad, float("nan")))
        return out

    model.register_forward_pre_hook(remember, with_kwargs=True)
    model.transformer.h[0].mlp.register_forward_hook(corrupt)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero", type=int, default=0, help="DeepSpeed ZeRO stage (0: no DeepSpeed)")
    parser.add_argument("--preconditioner", default="ekfac")
    parser.add_argument("--poison", type=int, default=None, help="training example index to poison")
    parser.add_argument("--poison-at", choices=["forward", "backward"], default="forward")
    opts = parser.parse_args()
    model = tiny_gpt2(VOCAB, seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    train = Dataset.from_list(random_token_examples(N_TRAIN, VOCAB, seed=0))
    ds_config = None
    if opts.zero:
        ds_config = {
            "zero_optimization": {"stage": opts.zero, "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_allow_untested_optimizer": True,
        }
    args = TrainingArguments(
        output_dir=os.path.join(opts.out, "trainer"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,
        max_steps=1,
        learning_rate=0.0,
        weight_decay=0.0,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not opts.zero,
        deepspeed=ds_config,
    )
    config = GraSSConfig(
        compressor="factgrass",
        proj_dim=16,
        shard_size=4,
        ekfac_sample_size=10,
        preconditioner=opts.preconditioner,
        dtype="float32",
        cache_dir=os.path.join(opts.out, "cache"),
    )

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    trainer = AttributionTrainer(
        model=model, args=args, train_dataset=train, data_collator=collate, grass_config=config
    )
    if opts.zero:
        trainer.train()  # creates the DeepSpeed training engine; lr 0 keeps the weights
    if opts.poison is not None:
        from hf_grass.capture import unwrap_model

        poison(unwrap_model(trainer.model), opts.poison_at)
        rows = random_token_examples(N_TRAIN, VOCAB, seed=0)
        rows[opts.poison]["input_ids"][0] = POISON
        try:
            trainer.build_gradient_cache(Dataset.from_list(rows))
        except ValueError as err:
            rank = torch.distributed.get_rank()
            with open(os.path.join(opts.out, f"error-rank{rank}.txt"), "w") as fh:
                fh.write(str(err))
            torch.distributed.barrier()  # both ranks wrote theirs before either exits
            sys.exit(3)
        raise AssertionError("the poisoned example raised no error")
    grads_before = [p.grad for p in trainer.model.parameters()]
    cache = trainer.build_gradient_cache()
    leftover = [g is not None and bool(g.abs().sum() > 0) for g in grads_before] != [
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainer.model.parameters()
    ]
    queries = random_token_examples(3, VOCAB, seed=5)
    scores = trainer.attribute(queries)
    from hf_grass.distributed import current_distributed
    from hf_grass.scoring import topk_scores

    attributor = trainer._attributor()
    vectors = attributor.query_vectors([collate(queries)]).rows
    split = topk_scores(cache, vectors, k=5, dist=current_distributed())
    # the same dataset scored during a pass (nothing stored): each rank its shards, lists merged
    during = trainer.score_dataset(train, queries, k=5, select=4)
    # torch.distributed is the ground truth: under DeepSpeed on CPU, Accelerate reports 1 process
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank == 0:
        torch.save(scores, os.path.join(opts.out, "scores.pt"))
        torch.save({"values": split.scores, "indices": split.indices}, os.path.join(opts.out, "topk.pt"))
        assert during.top is not None and during.bottom is not None and during.selected is not None
        torch.save(
            {
                "top": during.top.indices,
                "top_scores": during.top.scores,
                "bottom": during.bottom.indices,
                "selected": during.selected.indices,
            },
            os.path.join(opts.out, "during.pt"),
        )
        with open(os.path.join(opts.out, "info.json"), "w") as fh:
            json.dump(
                {
                    "world_size": world,
                    "rows": cache.num_rows,
                    "grads_changed": leftover,
                    "global_step": trainer.state.global_step,
                },
                fh,
            )
    # a clean shutdown: every rank is past its last collective before the group goes
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
