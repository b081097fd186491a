"""`GraSSCallback`: add gradient caching to an existing, unmodified `Trainer`.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GraSSCallback(config)])
    trainer.train()                       # the cache of train_dataset is built at on_train_end
    callback.find_influential("Who wrote ...?", k=10)

How the callback reaches what it needs without a trainer object (transformers 5 passes none to
callbacks): every event receives ``model``, ``processing_class`` and ``train_dataloader`` as keyword
arguments, and ``args`` positionally. The dataset is ``train_dataloader.dataset`` (the Trainer's
``train_dataset`` after its usual unused-column removal), read in dataset order with stable indices
(not the shuffled training order); the process group is the one Accelerate/torchrun initialised,
read through ``torch.distributed``; the device is ``args.device``. Hooks exist only during the pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_grass.attribution import run_attribution_pass
from hf_grass.cache.reader import GradientCache
from hf_grass.capture.loss import PerExampleLoss
from hf_grass.config import GraSSConfig
from hf_grass.distributed import current_distributed
from hf_grass.lookups import AttributionLookups, MultiCheckpointAttributor


class GraSSCallback(AttributionLookups, TrainerCallback):
    """Builds the gradient cache of the trainer's ``train_dataset``.

    Args:
        config: the attribution configuration (its ``cache_dir`` is where caches go).
        on_train_end: build the cache of the final model when training ends (default True).
        every_save: also build one cache per checkpoint, under ``cache_dir/checkpoint-N``, right
            after the Trainer saves it; ``attribute``/``find_influential`` then sum the scores over
            these checkpoints (TracIn-CP style), loading each checkpoint's weights for the query
            gradient.
        on_evaluate: also (re)build the cache of the current model after each evaluation.
        per_example_loss: ``fn(model, batch) -> [B]``, the per-example loss of a model whose
            output the built-in losses do not cover; used for the caches and every query (see
            ``GradientComputer``). It must depend on each example alone, never on the batch.
    """

    def __init__(
        self,
        config: GraSSConfig | None = None,
        *,
        on_train_end: bool = True,
        every_save: bool = False,
        on_evaluate: bool = False,
        per_example_loss: PerExampleLoss | None = None,
    ):
        if config is not None and not isinstance(config, GraSSConfig):
            raise TypeError(f"config must be a GraSSConfig, got {type(config).__name__}")
        self.config = config or GraSSConfig()
        self.build_on_train_end = on_train_end
        self.every_save = every_save
        self.build_on_evaluate = on_evaluate
        self.per_example_loss = per_example_loss
        self.cache: GradientCache | None = None
        self.checkpoint_caches: dict[int, GradientCache] = {}
        self._rates: list[float] = []  # learning rates of the steps since the last checkpoint
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.args: TrainingArguments | None = None
        self.dataset: Any = None  # what the caches were built from (token scores re-run its rows)

    # ---- events ---------------------------------------------------------------------------------

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.build_on_train_end:
            self.cache = self._run_pass(args, state, kwargs, self.config.cache_dir, checkpoint=None)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        scheduler = kwargs.get("lr_scheduler")
        if self.every_save and scheduler is not None and hasattr(scheduler, "get_last_lr"):
            self._rates.append(float(scheduler.get_last_lr()[0]))  # the rate this step will use

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.every_save:
            name = f"checkpoint-{state.global_step}"
            cache = self._run_pass(
                args,
                state,
                kwargs,
                os.path.join(self.config.cache_dir, name),
                checkpoint=os.path.join(args.output_dir, name),
                learning_rate=checkpoint_learning_rate(state, kwargs, args, self._rates),
            )
            self._rates = []
            self.checkpoint_caches[state.global_step] = cache

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.build_on_evaluate:
            cache_dir = os.path.join(self.config.cache_dir, f"eval-step-{state.global_step}")
            self.cache = self._run_pass(args, state, kwargs, cache_dir, checkpoint=None)

    def _run_pass(
        self,
        args: TrainingArguments,
        state: TrainerState,
        kwargs: dict[str, Any],
        cache_dir: str,
        checkpoint: str | None,
        learning_rate: float | None = None,
    ) -> GradientCache:
        model, dataloader = kwargs.get("model"), kwargs.get("train_dataloader")
        if model is None or dataloader is None or getattr(dataloader, "dataset", None) is None:
            raise ValueError(
                "GraSSCallback needs the model and the train dataloader that the Trainer passes to its "
                "callbacks; give the Trainer a train_dataset"
            )
        self.model, self.tokenizer, self.args = model, kwargs.get("processing_class"), args
        self.dataset = dataloader.dataset
        cache = run_attribution_pass(
            model,
            dataloader.dataset,
            self.config,
            self.tokenizer,
            cache_dir=cache_dir,
            batch_size=self.config.batch_size or args.per_device_eval_batch_size,
            dist=current_distributed(),
            disable_progress=args.disable_tqdm or not state.is_local_process_zero,
            device=args.device,
            checkpoint=checkpoint,
            learning_rate=learning_rate,
            per_example_loss=self.per_example_loss,
        )
        return cache

    # ---- lookup ---------------------------------------------------------------------------------

    def _attributor(self, **kwargs: Any) -> MultiCheckpointAttributor:
        if self.model is None:
            raise ValueError(
                "no cache yet: train with this callback first (the cache is built at on_train_end)"
            )
        if self.every_save and self.checkpoint_caches:
            caches = [self.checkpoint_caches[s] for s in sorted(self.checkpoint_caches)]
        elif self.cache is not None:
            caches = [self.cache]
        else:
            raise ValueError("no cache was built: enable on_train_end, every_save or on_evaluate")
        batch = self.config.batch_size or (self.args.per_device_eval_batch_size if self.args else None)
        return MultiCheckpointAttributor(
            self.model,
            self.tokenizer,
            caches,
            batch_size=batch,
            per_example_loss=self.per_example_loss,
            **kwargs,
        )

    def _cached_dataset(self) -> Any:
        return self.dataset

    def cache_dirs(self) -> list[Path]:
        return [c.path for c in ([self.cache] if self.cache else []) + list(self.checkpoint_caches.values())]


def checkpoint_learning_rate(
    state: TrainerState, kwargs: dict[str, Any], args: TrainingArguments, seen: list[float] | None = None
) -> float:
    """The learning rate of the steps that led to a checkpoint (TracIn-CP weights each checkpoint's
    scores by it): the mean of the rates the optimizer used since the previous checkpoint (``seen``,
    read from the scheduler before every step), else the last one the Trainer logged, else the
    scheduler's, else ``args.learning_rate``."""
    if seen:
        return sum(seen) / len(seen)
    for entry in reversed(state.log_history):
        if entry.get("step", 0) <= state.global_step and "learning_rate" in entry:
            return float(entry["learning_rate"])
    scheduler = kwargs.get("lr_scheduler")
    if scheduler is not None and hasattr(scheduler, "get_last_lr"):
        return float(scheduler.get_last_lr()[0])
    return float(args.learning_rate)
