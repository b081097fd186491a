"""The attribution pass: a model and a dataset in, a gradient cache on disk out.

``run_attribution_pass`` is what ``AttributionTrainer.build_gradient_cache``, ``GraSSCallback`` and
``hf-grass build`` call. It resolves defaults the way a `transformers` user expects (context length
from the model config, pad token and padding side from the tokenizer, the running process group)
and runs ``AttributionPass`` (``runner.py``: warm-up, statistics, sharding, writing).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_grass.attribution.batches import Batching, BatchRunner
from hf_grass.attribution.runner import AttributionPass
from hf_grass.cache.reader import GradientCache
from hf_grass.capture.engine import GradientComputer, context_length, forward_parameters
from hf_grass.capture.fingerprint import model_fingerprint
from hf_grass.capture.loss import PerExampleLoss
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource
from hf_grass.distributed import Distributed, current_distributed

__all__ = ["AttributionPass", "BatchRunner", "Batching", "PassOptions", "example_source", "run_attribution_pass"]


def example_source(
    dataset: Any,
    tokenizer: Any,
    config: GraSSConfig,
    model: nn.Module,
    text_column: str = "text",
    *,
    all_columns: bool = False,
    prefix: list[int] | None = None,
) -> ExampleSource:
    """The dataset as examples truncated to ``config.max_length`` (default: the model's context).

    Columns of non-causal-LM rows that the model's forward does not take are left out (as the
    Trainer does), unless ``all_columns`` (a user's ``per_example_loss`` may read any column).
    ``prefix``: the special ids text rows begin with (queries: the cache's ``document_store.prefix``).
    """
    max_length = config.max_length or context_length(model)
    return ExampleSource(
        dataset,
        tokenizer=tokenizer,
        max_length=max_length,
        text_column=text_column,
        model_inputs=None if all_columns else forward_parameters(model),
        prefix=prefix,
    )


@dataclass(frozen=True)
class PassOptions:
    """How ``run_attribution_pass`` runs, beyond what the ``GraSSConfig`` fixes.

    Args:
        batch_size: examples per forward/backward (default ``config.batch_size`` or 8).
        dist: the process group (default: the one torch.distributed runs in, if any).
        disable_progress: no progress bars.
        device: where the compressors live (default: each module's device).
        checkpoint: the directory the weights were saved to, recorded so that multi-checkpoint
            queries can reload them.
        learning_rate: the learning rate at that checkpoint, recorded so that multi-checkpoint
            queries can weight it (TracIn-CP).
        verify_existing: on resume, also re-hash the shards already written and redo damaged ones.
        text_column: the column holding raw text.
        per_example_loss: ``fn(model, batch) -> [B]``, the loss of models the built-in losses do
            not cover (see ``GradientComputer``); queries must then use the same function.
    """

    batch_size: int | None = None
    dist: Distributed | None = None
    disable_progress: bool = False
    device: torch.device | str | None = None
    checkpoint: str | os.PathLike | None = None
    learning_rate: float | None = None
    verify_existing: bool = False
    text_column: str = "text"
    per_example_loss: PerExampleLoss | None = None


def run_attribution_pass(
    model: nn.Module,
    dataset: Any,
    config: GraSSConfig,
    tokenizer: Any = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    options: PassOptions | None = None,
    **option_fields: Any,
) -> GradientCache:
    """Compress the per-example gradients of ``dataset`` into a cache (resuming if it exists).

    Args:
        model: the model (any wrapper: DDP, DeepSpeed, PEFT).
        dataset: a ``datasets.Dataset``, a list of dicts or a list of strings.
        config: what to compute and where (``config.cache_dir`` unless ``cache_dir`` is given).
        tokenizer: tokenizes text rows; its pad token and padding side pad the batches.
        options: the run's ``PassOptions``; ``option_fields`` (``batch_size=``, ``dist=``, ...) change
            single fields of it.
    """
    try:
        opts = dataclasses.replace(options or PassOptions(), **option_fields)
    except TypeError:
        known = sorted(f.name for f in dataclasses.fields(PassOptions))
        raise TypeError(f"unknown options {sorted(option_fields)}; run_attribution_pass takes {known}") from None
    loss = opts.per_example_loss
    computer = GradientComputer(model, config, device=opts.device, per_example_loss=loss)
    source = example_source(dataset, tokenizer, config, model, opts.text_column, all_columns=loss is not None)
    model_info = model_fingerprint(computer.model, computer.targets)
    if opts.checkpoint is not None:
        model_info["checkpoint"] = os.fspath(opts.checkpoint)
    if opts.learning_rate is not None:
        model_info["learning_rate"] = float(opts.learning_rate)
    batching = Batching.for_tokenizer(tokenizer, opts.batch_size or config.batch_size or 8, opts.disable_progress)
    runner = AttributionPass(
        computer, source, cache_dir or config.cache_dir, batching, opts.dist or current_distributed(), model_info
    )
    return GradientCache(runner.run(verify_existing=opts.verify_existing))
