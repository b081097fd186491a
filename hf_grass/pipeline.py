"""Glue shared by the Trainer subclass, the callback, the module-level API and the CLI.

It resolves defaults the way a `transformers` user expects (context length from the model config,
pad token from the tokenizer, batch size from the Trainer), finds the process group (the one
torchrun / Accelerate / DeepSpeed initialised, read through ``torch.distributed``: under DeepSpeed on
CPU Accelerate reports a single process), and runs the attribution pass.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from hf_grass.cache.build import Distributed, build_cache, model_fingerprint
from hf_grass.cache.reader import GradientCache
from hf_grass.capture.engine import GradientComputer, context_length
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource, collate


def pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


def padding_side(tokenizer: Any) -> str:
    side = getattr(tokenizer, "padding_side", "right") if tokenizer is not None else "right"
    return side if side in ("left", "right") else "right"


def current_distributed() -> Distributed:
    """Rank and world size of the running job (1 process when torch.distributed is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Distributed()


def make_source(
    dataset: Any, tokenizer: Any, config: GraSSConfig, model: nn.Module, text_column: str = "text"
) -> ExampleSource:
    max_length = config.max_length or context_length(model)
    return ExampleSource(dataset, tokenizer=tokenizer, max_length=max_length, text_column=text_column)


def make_batches(source: ExampleSource, tokenizer: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches of a (small) query set, in order."""
    examples = [source.example(i) for i in range(len(source))]
    return [
        collate(examples[i : i + batch_size], pad_token_id(tokenizer), padding_side(tokenizer))
        for i in range(0, len(examples), batch_size)
    ]


def run_attribution_pass(
    model: nn.Module,
    dataset: Any,
    config: GraSSConfig,
    tokenizer: Any = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    dist: Distributed | None = None,
    disable_progress: bool = False,
    device: torch.device | str | None = None,
    weight_gather: Any = None,
    checkpoint: str | os.PathLike | None = None,
    verify_existing: bool = False,
    text_column: str = "text",
) -> GradientCache:
    """Compress the per-example gradients of ``dataset`` into a cache (resuming if it exists)."""
    computer = GradientComputer(model, config, device=device)
    source = make_source(dataset, tokenizer, config, model, text_column)
    model_info = model_fingerprint(computer.model, computer.targets, weight_gather)
    if checkpoint is not None:  # where the weights live, so multi-checkpoint queries can reload them
        model_info["checkpoint"] = os.fspath(checkpoint)
    path = build_cache(
        computer,
        source,
        cache_dir or config.cache_dir,
        batch_size=batch_size or config.batch_size or 8,
        pad_token_id=pad_token_id(tokenizer),
        padding_side=padding_side(tokenizer),
        dist=dist or current_distributed(),
        model_info=model_info,
        disable_progress=disable_progress,
        verify_existing=verify_existing,
    )
    return GradientCache(path)
