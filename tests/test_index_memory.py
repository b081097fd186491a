"""Lookups sized in bytes: the index's projection, its bounded training sample, the two-stage
batches, the one decode of gathered rows, and an index that is checked when it is loaded (a
missing or damaged one leaves the exact scan working). Counters and fault injection only.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from test_index import DIM, assert_same_lists, queries, write_cache

import hf_grass.cache.index_build as index_build
import hf_grass.cache.rows as rows_module
from hf_grass.cache import CacheError, GradientCache
from hf_grass.cache.index import IndexSettings, index_vectors
from hf_grass.cache.projection import RowProjection, principal_directions
from hf_grass.cache.reader_rows import CacheRows
from hf_grass.scoring import Search, lookup, scan

# the module (hf_grass.scoring exports a function of the same name)
two_stage_module = importlib.import_module("hf_grass.scoring.two_stage")


@pytest.fixture
def cache(tmp_path: Path) -> GradientCache:
    return write_cache(tmp_path / "cache")


def test_the_projection_is_an_unbiased_estimate_of_inner_products() -> None:
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(DIM, 3, generator=gen)).Q  # 3 orthonormal directions
    proj = RowProjection.drawn(basis, 10, seed=3)
    assert proj.principal == 3 and proj.residual_width == 7
    dense = proj.apply(torch.eye(DIM)).T.double()  # [10, DIM]: the map as a matrix
    # brute force: [V^T ; S (I - V V^T)] with S the explicit sparse map (one +-1 per coordinate)
    sketch = RowProjection.drawn(torch.zeros(DIM, 0), 7, seed=3).apply(torch.eye(DIM)).T.double()
    assert torch.equal((sketch != 0).sum(0), torch.ones(DIM, dtype=torch.long))
    v = basis.double()
    want = torch.cat([v.T, sketch @ (torch.eye(DIM, dtype=torch.float64) - v @ v.T)])
    torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(5, DIM, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(proj.apply(x).double(), x @ dense.T, rtol=1e-5, atol=1e-5)
    # E[P^T P] = V V^T + (I - V V^T) E[S^T S] (I - V V^T) = I over the seeds of S
    maps = [RowProjection.drawn(basis, 10, seed=s).apply(torch.eye(DIM)).double() for s in range(400)]
    gram = sum(m @ m.T for m in maps) / len(maps)
    assert (gram - torch.eye(DIM, dtype=torch.float64)).abs().max() < 0.15
    with pytest.raises(ValueError, match="do not leave room"):
        RowProjection.drawn(basis, 3, seed=0)


def test_principal_directions_span_the_top_singular_vectors() -> None:
    gen = torch.Generator().manual_seed(1)
    # rows with 4 strong directions and a weak rest, as gradient rows are
    strong = torch.linalg.qr(torch.randn(DIM, 4, generator=gen)).Q
    sample = torch.randn(300, 4, generator=gen) * torch.tensor([40.0, 30, 20, 10]) @ strong.T
    sample += 0.1 * torch.randn(300, DIM, generator=gen)
    got = principal_directions(sample, 4, seed=0)
    torch.testing.assert_close(got.T @ got, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal
    want = torch.linalg.svd(sample, full_matrices=False).Vh[:4].T
    torch.testing.assert_close(got @ got.T, want @ want.T, rtol=0, atol=1e-4)  # the same subspace
    assert torch.equal(principal_directions(sample, 4, seed=0), got)  # seeded: the same bits


def test_a_projected_index_reranks_exactly(cache: GradientCache) -> None:
    entry = cache.build_index("flat", projection=8)  # 4 principal directions (at most half), 4 sketched
    assert entry["projection"] == {"method": "pca+sjlt", "dim": DIM, "width": 8, "principal": 4, "seed": 0}
    assert [f.get("role") for f in entry["files"]] == [None, "shortlist", "projection"]
    index = cache.index()
    assert index is not None and index.index.d == 8 and index.projection is not None
    assert index.projection.principal == 4
    # the index and its shortlist hold the projected rows (brute force: the dense map on every row)
    rows = cache.load()
    want = index_vectors(rows[index.shortlist_positions], index.projection, cosine=False)
    torch.testing.assert_close(index.shortlist_vectors, want)
    q = queries()
    exact = scan(cache, q, 7, top=True, bottom=True)
    # every row a candidate: exactly the scan's lists, whatever the projection lost
    assert_same_lists(lookup(cache, q, 7, top=True, bottom=True, search=Search("index", cache.num_rows)), exact)
    few = lookup(cache, q, 7, top=True, bottom=True, search=Search("index", 40))
    dense = scan(cache, q, top=False, dense=True).dense
    for lists in (few.top, few.bottom):
        torch.testing.assert_close(lists.scores, dense.gather(1, lists.indices), rtol=1e-5, atol=1e-5)
    # the default kind of projected rows: a graph over 8-bit vectors, re-ranked exactly
    assert cache.build_index(projection=8)["factory"] == "HNSW32,SQ8"
    assert_same_lists(lookup(cache, q, 7, top=True, bottom=True, search=Search("index", cache.num_rows)), exact)
    # rows no wider than the projection are indexed as they are (auto: IVF-PQ); projection=0 never projects
    assert IndexSettings().width(1024) == 1024 and IndexSettings().width(31744) == 1024
    assert IndexSettings().resolved_kind(1024) == "ivfpq" and IndexSettings().resolved_kind(31744) == "hnsw-sq8"
    assert IndexSettings(projection=0).width(31744) == 31744
    assert cache.build_index("flat", projection=0, rebuild=True)["projection"] is None


def test_the_training_sample_and_the_reads_are_bounded_in_bytes(
    cache: GradientCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    real = CacheRows.rows_at

    def counting(self, positions):  # noqa: ANN001, ANN202
        reads.append(int(positions.numel()))
        return real(self, positions)

    vectors: list[int] = []
    real_vectors = index_build._Build.vectors

    def counting_vectors(self, positions):  # noqa: ANN001, ANN202
        vectors.append(int(positions.numel()))
        return real_vectors(self, positions)

    monkeypatch.setattr(CacheRows, "rows_at", counting)
    monkeypatch.setattr(index_build._Build, "vectors", counting_vectors)
    monkeypatch.setattr(index_build, "READ_BYTES", 4 * DIM * 50)  # 50 full rows per read
    width = 12
    entry = cache.build_index("ivfpq", projection=width, nlist=4, pq_m=4, train_bytes=4 * width * 120)
    # the training sample: 120 rows of 12 float32 numbers (not 64 * nlist = 256); then the shortlist
    assert vectors == [120, 4] and entry["rows"] == cache.num_rows
    # the sample the principal directions come from: train_bytes of full rows (40 of 36 numbers)
    assert sum(reads) == 40 + 120 + 4 and max(reads) <= 50  # full rows are read 50 at a time
    with pytest.raises(ValueError, match="fewer than the 8 inverted lists; raise train_bytes"):
        cache.build_index("ivfpq", projection=width, nlist=8, pq_m=4, train_bytes=4 * width * 5, rebuild=True)
    with pytest.raises(TypeError, match=r"unknown index settings \['nprobe'\]; known: \["):
        cache.build_index("ivfpq", nprobe=3)


def test_two_stage_batches_are_sized_from_the_row_width(
    cache: GradientCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # int8 rows of 31,744 (and a scale and two norms): 7 queries of 1200 candidate rows in 256 MiB
    assert two_stage_module.query_batch_size(31744 + 12, 300 * 2 * 2) == 7
    assert two_stage_module.query_batch_size(2 * 1024 + 12, 300 * 2 * 2) == 108
    cache.build_index("flat")
    q = queries(12, seed=4)
    want = lookup(cache, q, 5, top=True, bottom=True, search=Search("index", 40))
    gathered: list[int] = []
    decoded: list[int] = []
    real, real_decode = CacheRows.stored_at, two_stage_module.rows_to_float32

    def counting(self, positions):  # noqa: ANN001, ANN202
        gathered.append(int(positions.numel()))
        return real(self, positions)

    def decode(stored, out=None):  # noqa: ANN001, ANN202
        decoded.append(out.data_ptr())
        return real_decode(stored, out)

    monkeypatch.setattr(CacheRows, "stored_at", counting)
    monkeypatch.setattr(two_stage_module, "rows_to_float32", decode)
    monkeypatch.setattr(two_stage_module, "chunk_rows", lambda n_query, dim: 16)
    # room for 2 queries' candidates: 40 per list, 2 lists, index and shortlist (fp16 rows)
    monkeypatch.setattr(two_stage_module, "CANDIDATE_BYTES", 2 * 160 * (2 * DIM + 12))
    got = lookup(cache, q, 5, top=True, bottom=True, search=Search("index", 40))
    assert len(gathered) == 6 and max(gathered) <= 2 * 160
    assert len(decoded) == sum(-(-g // 16) for g in gathered)  # blocks of 16 rows, decoded once each
    assert_same_lists(got, want)


def test_gathered_rows_are_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_cache(tmp_path / "cache", rows=130)
    rows = cache.load()
    calls: list[bool] = []
    real = rows_module.rows_to_float32

    def counting(stored, out=None):  # noqa: ANN001, ANN202
        calls.append(out is not None)
        return real(stored, out)

    monkeypatch.setattr(rows_module, "rows_to_float32", counting)
    for positions in ([3, 64, 65, 129], [129, 3, 64], [5, 5, 70, 3, 70]):  # sorted, unsorted, repeats
        calls.clear()
        torch.testing.assert_close(cache.rows.rows_at(torch.tensor(positions)), rows[positions])
        assert calls == [True]  # one decode, into the result


def test_a_missing_or_damaged_index_leaves_the_exact_scan(cache: GradientCache) -> None:
    entry = cache.build_index("ivfpq", projection=8)  # three files: FAISS, shortlist, projection
    assert len(entry["files"]) == 3
    q = queries()
    exact = scan(cache, q, 3, top=True, bottom=True)
    for victim in entry["files"]:
        path = cache.path / victim["file"]
        good = path.read_bytes()
        path.write_bytes(good[:-4] + bytes(b ^ 0xFF for b in good[-4:]))
        opened = GradientCache(cache.path, verify=True)  # opens: the index is checked when loaded
        assert_same_lists(lookup(opened, q, 3, top=True, bottom=True, search="exact"), exact)
        with pytest.raises(CacheError, match="does not match its sha256.*--rebuild.*search='exact'"):
            lookup(opened, q, 3, search="index")
        with pytest.raises(CacheError, match=victim["file"].split("/")[-1]):
            opened.verify(full=True)  # an explicit verification checks the index files too
        path.unlink()
        opened = GradientCache(cache.path, verify=True)
        assert_same_lists(lookup(opened, q, 3, top=True, bottom=True, search="exact"), exact)
        with pytest.raises(CacheError, match="is missing; rebuild it.*search='exact'"):
            opened.index()
        path.write_bytes(good)
    assert GradientCache(cache.path, verify=True).index() is not None
