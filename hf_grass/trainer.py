"""`AttributionTrainer`: a `transformers.Trainer` that also caches gradients and attributes.

trainer = AttributionTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             grass_config=GraSSConfig(compressor="factgrass", proj_dim=1024))
trainer.train()                               # optional
trainer.build_gradient_cache()                # attribution pass over train_dataset
trainer.attribute(query_dataset)              # [n_query, n_train] scores
trainer.find_influential("Who wrote ...?", k=10)

The behaviour lives in `AttributionMixin`, so that any `Trainer` subclass gets it (TRL's):

class SFTAttributionTrainer(AttributionMixin, SFTTrainer): ...
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Trainer

from hf_grass.attribution import run_attribution_pass
from hf_grass.cache.reader import GradientCache, open_cache
from hf_grass.capture.loss import PerExampleLoss
from hf_grass.config import GraSSConfig
from hf_grass.distributed import current_distributed
from hf_grass.lookups import AttributionLookups
from hf_grass.query import Attributor


class AttributionMixin(AttributionLookups):
    """``build_gradient_cache``, ``attribute``, ``find_influential`` and ``score_dataset`` for any
    ``transformers.Trainer`` subclass: put it first among the bases,
    ``class SFTAttributionTrainer(AttributionMixin, SFTTrainer)``.

    It uses what every Trainer has (``model``, ``args``, ``train_dataset``, ``processing_class``), so
    the cache holds the trainer's own ``train_dataset``: for TRL's ``SFTTrainer``, the rows it
    tokenized (chat template applied, prompt or non-assistant tokens masked as its loss masks them).

    Args:
        grass_config: the attribution configuration (default ``GraSSConfig()``); every other
            argument is the Trainer's.
        per_example_loss: ``fn(model, batch) -> [B]``, the per-example loss of a model whose
            output the built-in losses (causal LM, classification, regression, multi-label) do not
            cover; used for the cache and for every query (see ``GradientComputer``). It must be
            per example: example i's loss depends on example i only, never on the rest of the batch.
    """

    # what the Trainer it is mixed into provides
    model: Any
    args: Any
    train_dataset: Any
    processing_class: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a Trainer listed first would receive grass_config and fail with a message that names neither
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(AttributionMixin):
            raise TypeError(
                f"{cls.__name__}: put AttributionMixin before the Trainer class among the bases, e.g. "
                "class MyTrainer(AttributionMixin, SFTTrainer)"
            )

    def __init__(
        self,
        *args: Any,
        grass_config: GraSSConfig | None = None,
        per_example_loss: PerExampleLoss | None = None,
        **kwargs: Any,
    ):
        if not isinstance(self, Trainer):
            raise TypeError(
                f"AttributionMixin needs a transformers.Trainer to mix into; {type(self).__name__} is not one "
                "(class MyTrainer(AttributionMixin, Trainer))"
            )
        super().__init__(*args, **kwargs)
        self.per_example_loss = per_example_loss
        if grass_config is not None and not isinstance(grass_config, GraSSConfig):
            raise TypeError(f"grass_config must be a GraSSConfig, got {type(grass_config).__name__}")
        self.grass_config = grass_config or GraSSConfig()
        self.gradient_cache: GradientCache | None = None
        self._cache_dataset: Any = None  # what build_gradient_cache built the cache from

    def build_gradient_cache(
        self, dataset: Any = None, cache_dir: str | os.PathLike | None = None, verify_existing: bool = False
    ) -> GradientCache:
        """Attribution pass over ``dataset`` (default: ``train_dataset``), in dataset order.

        Every process computes its own shards (Accelerate / torchrun); an existing cache is resumed,
        and its missing or truncated shards (with ``verify_existing``, also those failing their
        sha256) are recomputed.
        """
        dataset = self.train_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("no dataset: pass one, or give the trainer a train_dataset")
        config = self.grass_config
        self.gradient_cache = run_attribution_pass(
            self.model,
            dataset,
            config,
            self.processing_class,
            cache_dir=cache_dir,
            batch_size=config.batch_size or self.args.per_device_eval_batch_size,
            dist=current_distributed(),
            disable_progress=self.args.disable_tqdm or not self.is_local_process_zero(),
            device=self.args.device,
            verify_existing=verify_existing,
            per_example_loss=self.per_example_loss,
        )
        self._cache_dataset = dataset
        return self.gradient_cache

    def _cached_dataset(self) -> Any:
        return self._cache_dataset

    def _attributor(self, **kwargs: Any) -> Attributor:
        cache = self.gradient_cache
        if cache is None:
            path = self.grass_config.cache_dir
            if not os.path.isfile(os.path.join(path, "manifest.json")):
                raise ValueError(f"no gradient cache at {path!r}: call trainer.build_gradient_cache() first")
            cache = self.gradient_cache = open_cache(path)
        # the dataset the cache was built from, for a refined iHVP (refine_steps) to re-run a sample of
        kwargs.setdefault("train_dataset", getattr(self, "_cache_dataset", None))
        return Attributor(
            self.model,
            self.processing_class,
            cache,
            batch_size=self.grass_config.batch_size or self.args.per_device_eval_batch_size,
            disable_progress=self.args.disable_tqdm,
            per_example_loss=self.per_example_loss,
            **kwargs,
        )


class AttributionTrainer(AttributionMixin, Trainer):
    """A Trainer with ``build_gradient_cache``, ``attribute``, ``find_influential`` and
    ``score_dataset`` (``AttributionMixin`` on ``transformers.Trainer``; its arguments are
    ``AttributionMixin``'s: ``grass_config``, ``per_example_loss``, and the Trainer's own)."""
