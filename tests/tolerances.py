"""Numerical tolerances shared by the test files, kept in one place so they are tightened together.

Import as ``from tolerances import ...``: pytest puts ``tests/`` on ``sys.path`` for test modules
in a directory without ``__init__.py`` (its default "prepend" import mode).
"""

from __future__ import annotations

# Exact identities (two ways of computing the same linear map) on float64 inputs. The maps are
# sums of at most a few thousand products of O(1) numbers, so float64 agrees to ~1e-13; rtol is
# the 1e-5 and atol only guards entries that are zero up to rounding.
EXACT_RTOL = 1e-5
EXACT_ATOL = 1e-9

# float32 inputs against the float64 result: float32 accumulation over a few hundred terms.
FLOAT32_RTOL = 1e-4
FLOAT32_ATOL = 1e-4

# Statistical checks of E||Cg||^2 = ||g||^2 and E<Cg,Ch> = <g,h>: the mean ratio over many
# vectors (and, where the guarantee is only over the random draw, over several draws) must be
# within this relative distance of 1.
STAT_REL = 0.05
# JL concentration on isotropic Gaussian inputs: with k = 512..576 the per-vector ratio has std
# ~ sqrt(2/k) ~ 0.06. A map that is unbiased but uses far fewer than k effective rows (say an SJLT
# whose row blocks collapse onto k/8 rows: std ~ 0.18) exceeds 0.15; a correct one never comes near.
STAT_MAX_STD = 0.15

# Token scores (tests/test_tokens.py): a score split over tokens sums back to it exactly up to float64
# rounding where every map is float64 (uncompressed, and the query side always); the K-FAC caches'
# rows are whitened in float32 (the pass's own rows), so there the document side sums to 1e-4 at most
# (the target; measured ~2e-7).
TOKEN_EXACT_RTOL = 1e-10
TOKEN_SUM_RTOL = 1e-4
