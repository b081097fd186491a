"""Preconditioners, from the statistics gathered during the pass to their application at query time.

- ``linalg``: the float64 helpers every fit shares (symmetrise, eigh, Kronecker rotations).
- ``eigenbasis``: the warm-up K-FAC fit of kfac/ekfac caches and the whitening of their rows.
- ``statistics``: the running float64 sums written with every shard.
- ``preconditioner``: ``Preconditioner``, fitted once per cache and applied to query gradients.
"""

from hf_grass.precondition.eigenbasis import fit_eigenbasis, is_whitened, rotate
from hf_grass.precondition.preconditioner import Preconditioner
from hf_grass.precondition.statistics import ModuleSpec, StatsAccumulator

__all__ = ["ModuleSpec", "Preconditioner", "StatsAccumulator", "fit_eigenbasis", "is_whitened", "rotate"]
