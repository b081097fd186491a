"""A cache's preconditioner: its statistics and warm-up fit read from the cache, fitted once, and the
fit saved beside the rows (``<cache>/preconditioner/<name>-<stamp>.safetensors``)."""

from __future__ import annotations

import hashlib
import json
import logging

from hf_grass.cache.files import CacheError, mmap_tensors, save_tensors
from hf_grass.cache.reader import GradientCache
from hf_grass.precondition import Eigenbasis, Preconditioner, Statistics, preconditioner_class

logger = logging.getLogger("transformers.hf_grass")


def cache_eigenbasis(cache: GradientCache) -> Eigenbasis | None:
    """The warm-up fit of a cache whose rows are whitened (None for the others)."""
    flat = cache.eigenbasis()
    return None if flat is None else Eigenbasis.from_tensors(flat)


def fitted_preconditioner(
    cache: GradientCache, name: str | None = None, damping: float | None = None, basis: Eigenbasis | None = None
) -> Preconditioner:
    """The preconditioner ``name`` (default: the cache's) fitted on the cache's statistics, with
    ``damping`` (default: the cache's). A saved fit is reused; the file name carries a hash of the
    statistics it was fitted on, so a cache that grew (resumed build) never reuses a stale fit."""
    config = cache.config
    name = name or config.preconditioner
    damping = config.damping if damping is None else damping
    cls, built = preconditioner_class(name), preconditioner_class(config.preconditioner)
    reason = cls.unavailable(built, config.eigen_masks)
    if reason is not None:
        raise ValueError(
            f"this cache gathered statistics for preconditioner={config.preconditioner!r}; {reason}. Rebuild "
            f"the cache with GraSSConfig(preconditioner={name!r}) or use {config.preconditioner!r} / "
            "'identity'."
        )
    needs = cls.statistics(config.eigen_masks)
    if not needs and not cls.whitens_rows:
        return cls.fit(Statistics(), None).with_damping(damping)  # nothing to fit (identity)
    stamp = hashlib.sha256(
        json.dumps([cache.manifest["stats"], cache.manifest.get("eigenbasis")], sort_keys=True).encode()
    ).hexdigest()[:12]
    saved = cache.path / "preconditioner" / f"{name}-{stamp}.safetensors"
    if saved.is_file():
        try:
            return cls.from_tensors(mmap_tensors(saved), damping)
        except CacheError as err:
            logger.warning("Ignoring a damaged saved preconditioner (%s); refitting.", err)
    stats = Statistics.from_tensors(cache.statistics()) if needs else Statistics()
    if needs and stats.examples <= 0:
        raise ValueError("the cache holds no examples: nothing to fit a preconditioner on")
    fitted = cls.fit(stats, basis if basis is not None else cache_eigenbasis(cache))
    try:
        saved.parent.mkdir(exist_ok=True)
        save_tensors(saved, fitted.tensors())
    except OSError as err:  # a read-only cache (e.g. in the Hub cache) still works, just unsaved
        logger.info("Could not save the fitted preconditioner to %s: %s", saved, err)
    return fitted.with_damping(damping)
