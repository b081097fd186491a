"""Scoring during the pass (nothing stored) against caching the same data and querying the cache.

The torchrun version (two processes, each scoring its shards, lists merged) is in
``test_distributed.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_grass.attribution import run_attribution_pass
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.lookups import MultiCheckpointAttributor
from hf_grass.query import Attributor
from hf_grass.scoring import ScanResult, scan
from hf_grass.testing import random_token_examples, tiny_gpt2

VOCAB = 40
N_TRAIN = 29
K = 6


def setup(tmp_path: Path, **config: object) -> tuple[torch.nn.Module, list[dict], Attributor]:
    model = tiny_gpt2(VOCAB, seed=0)
    train = random_token_examples(N_TRAIN, VOCAB, seed=0)
    cfg = GraSSConfig(shard_size=8, ekfac_sample_size=12, batch_size=3, **config)  # type: ignore[arg-type]
    cache = run_attribution_pass(model, train, cfg, cache_dir=tmp_path / "cache", disable_progress=True)
    return model, train, Attributor(model, None, cache, batch_size=3, search="exact")


def assert_lists_equal(got: ScanResult, want: ScanResult) -> None:
    assert got.top is not None and want.top is not None and got.bottom is not None and want.bottom is not None
    # the same rows (bit for bit) times the same query vectors: only the matmul's blocking differs,
    # which moves a float32 score by a few ulps of the largest score
    assert got.top.indices.tolist() == want.top.indices.tolist()
    assert got.bottom.indices.tolist() == want.bottom.indices.tolist()
    scale = max(want.top.scores.abs().max().item(), want.bottom.scores.abs().max().item())
    torch.testing.assert_close(got.top.scores, want.top.scores, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got.bottom.scores, want.bottom.scores, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "config",
    [
        {},  # the default: int8 rows whitened in the warm-up's eigenbasis, EK-FAC
        {"preconditioner": "identity", "dtype": "float16", "total_dim": None, "proj_dim": 16},
        {"preconditioner": "fim", "dtype": "float32", "total_dim": None, "proj_dim": 16},
    ],
    ids=["default", "identity-fp16", "fim-fp32"],
)
def test_scores_during_the_pass_equal_cache_then_query(tmp_path: Path, config: dict) -> None:
    _, train, attributor = setup(tmp_path, **config)
    queries = random_token_examples(4, VOCAB, seed=5)
    want = attributor.attribute_top_k(queries, K)
    assert isinstance(want, ScanResult)
    got = attributor.score_dataset(train, queries, k=K)
    assert got.method == "during-pass" and got.num_examples == N_TRAIN
    assert_lists_equal(got, want)


def test_unit_normalised_scores_and_selection(tmp_path: Path) -> None:
    _, train, attributor = setup(tmp_path)
    attributor.cosine, attributor.normalize = True, "preconditioned"
    queries = random_token_examples(3, VOCAB, seed=7)
    dense = attributor.attribute(queries)
    assert isinstance(dense, torch.Tensor)
    got = attributor.score_dataset(train, queries, k=K, select=5)
    assert_lists_equal(got, attributor.attribute_top_k(queries, K))
    # selection: the highest mean (unit-normalised) score over the queries
    assert got.selected is not None
    assert got.selected.indices[0].tolist() == dense.mean(dim=0).argsort(descending=True)[:5].tolist()
    torch.testing.assert_close(got.selected.scores[0], dense.mean(dim=0).sort(descending=True).values[:5])


def test_another_dataset_and_examples_without_loss(tmp_path: Path) -> None:
    """A dataset the cache never saw (indices are its own), with an example that has no supervised
    tokens: it is skipped and never listed; k larger than the dataset is refused."""
    model, train, attributor = setup(tmp_path)
    # its first 12 examples are the reference's warm-up sample, so a cache of it has the same
    # eigenbasis, and its rows are comparable with the reference's query vectors: the brute force
    other = train[:12] + random_token_examples(11, VOCAB, seed=3)
    other[15] = {"input_ids": other[15]["input_ids"], "labels": [-100] * len(other[15]["input_ids"])}
    queries = random_token_examples(2, VOCAB, seed=9)
    got = attributor.score_dataset(other, queries, k=K, bottom=False)
    assert got.bottom is None and got.skipped == [15] and got.num_examples == 23
    cache = run_attribution_pass(model, other, attributor.config, cache_dir=tmp_path / "other", disable_progress=True)
    basis = attributor.basis.to_tensors() if attributor.basis is not None else {}
    same = cache.eigenbasis() or {}
    assert basis.keys() == same.keys() and all(torch.equal(basis[key], same[key]) for key in basis)
    vectors = attributor.query_vectors([collate(queries)]).rows
    want = scan(cache, vectors, K, top=True)
    assert got.top is not None and want.top is not None
    assert got.top.indices.tolist() == want.top.indices.tolist()
    assert 15 not in got.top.indices.flatten().tolist()
    with pytest.raises(ValueError, match="k=24 exceeds"):
        attributor.score_dataset(other, queries, k=24)


def test_multi_checkpoint_lookups_take_one_reference(tmp_path: Path) -> None:
    """The callback's lookups (one cache per checkpoint): one cache is the reference, at its own
    weights; several are refused with a hint."""
    model, train, attributor = setup(tmp_path)
    queries = random_token_examples(2, VOCAB, seed=9)
    one = MultiCheckpointAttributor(model, None, [attributor.cache], batch_size=3, search="exact")
    got = one.score_dataset(train, queries, k=K)
    assert_lists_equal(got, one.attribute_top_k(queries, K))
    two = MultiCheckpointAttributor(model, None, [attributor.cache, attributor.cache])
    with pytest.raises(ValueError, match="one reference cache, but there are 2"):
        two.score_dataset(train, queries, k=K)
