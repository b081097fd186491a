"""The FAISS and BM25 indexes of a cache, and the two-stage lookup, against the exact scan.

The caches here are written with ``CacheWriter`` from seeded rows with some structure (a few
directions plus noise, so the inverted lists are not all alike); indexing knows nothing of how
rows were computed. Every two-stage result is compared with ``scoring.scan``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hf_grass.cache.index as index_module
from hf_grass.cache import CacheError, GradientCache
from hf_grass.cache.manifest import MANIFEST
from hf_grass.cache.reader_rows import CacheRows
from hf_grass.cache.writer import CacheWriter, ShardContent
from hf_grass.config import GraSSConfig
from hf_grass.scoring import Normalisation, Search, TopKAccumulator, lookup, scan

DIM = 36
WORDS = ["apple", "river", "mountain", "violin", "rocket", "garden", "castle", "ocean", "pepper", "tiger"]


def write_cache(path: Path, rows: int = 400, shard_size: int = 64, seed: int = 0) -> GradientCache:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, DIM, generator=gen) * 3
    config = GraSSConfig(proj_dim=DIM, dtype="float16", shard_size=shard_size, preconditioner="identity")
    header = {
        "model": {"class": "Synthetic"},
        "modules": [{"name": "m", "d_in": DIM, "d_out": DIM, "bias": False, "offset": 0, "dim": DIM}],
        "dim": DIM,
        "layout": "module",
        "num_examples": rows,
        "dataset": f"synthetic-{rows}-{seed}",
    }
    writer = CacheWriter(path, config, header)
    for shard, first in enumerate(range(0, rows, shard_size)):
        idx = list(range(first, min(first + shard_size, rows)))
        which = torch.randint(0, 6, (len(idx),), generator=gen)
        block = centres[which] + torch.randn(len(idx), DIM, generator=gen)
        block *= torch.rand(len(idx), 1, generator=gen) + 0.5  # norms vary, as gradients' do
        docs = [{"index": i, "text": f"doc {i} {WORDS[i % 10]} {WORDS[(i * 7) % 10]}", "id": None} for i in idx]
        writer.commit_shard(shard, ShardContent(idx, block.half(), docs))
    writer.finish(complete=True)
    writer.close()
    return GradientCache(path, verify=True)


@pytest.fixture
def cache(tmp_path: Path) -> GradientCache:
    return write_cache(tmp_path / "cache")


def queries(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def assert_same_lists(got, want) -> None:  # noqa: ANN001 - ScanResult
    for a, b in ((got.top, want.top), (got.bottom, want.bottom)):
        if b is None:
            continue
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.indices, b.indices)


def test_index_round_trip(cache: GradientCache) -> None:
    entry = cache.build_index("ivfpq")
    assert entry["factory"].startswith("IVF") and entry["rows"] == cache.num_rows
    on_disk = json.loads((cache.path / MANIFEST).read_text())["index"]
    assert on_disk == entry
    path = cache.path / entry["files"][0]["file"]
    assert path.is_file() and not (cache.path / index_module.BUILD_DIR).exists()
    again = GradientCache(cache.path, verify=True)  # the index file is checked with the rest
    assert path in [p for p, _ in again.files()]
    index = again.index()
    assert index is not None and index.index.ntotal == cache.num_rows
    # the shortlist: the 1 % of rows with the largest norms, kept beside the index as float32 vectors
    # of its space (rows of 36 numbers are not projected: the vectors are the rows)
    assert entry["shortlist_rows"] == 4 and entry["files"][1]["role"] == "shortlist"
    rows = cache.load()
    assert index.shortlist_positions.tolist() == sorted(rows.norm(dim=1).topk(4).indices.tolist())
    torch.testing.assert_close(index.shortlist_vectors, rows[index.shortlist_positions])
    # building again with the same settings is a no-op; rebuild=True writes the same bytes
    assert again.build_index("ivfpq") == entry
    assert again.build_index("ivfpq", rebuild=True)["files"] == entry["files"]


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw", "flat"])
def test_two_stage_equals_the_exact_scan(cache: GradientCache, kind: str) -> None:
    cache.build_index(kind)
    q = queries()
    exact = scan(cache, q, 7, top=True, bottom=True)
    # every row a candidate: the exact re-rank gives exactly the scan's lists
    params = {"nprobe": 64} if kind == "ivfpq" else None
    full = lookup(cache, q, 7, top=True, bottom=True, search=Search("index", cache.num_rows, params))
    assert full.method == "index"
    assert_same_lists(full, exact)
    # fewer candidates: whatever is found, its scores are the exact ones
    few = lookup(cache, q, 7, top=True, bottom=True, search=Search(candidates=40))  # auto: uses the index
    dense = scan(cache, q, top=False, dense=True).dense
    assert dense is not None
    for lists in (few.top, few.bottom):
        assert lists is not None
        torch.testing.assert_close(lists.scores, dense.gather(1, lists.indices), rtol=1e-5, atol=1e-5)
    assert (few.bottom.scores <= few.top.scores[:, -1:]).all()  # type: ignore[union-attr]
    if kind == "flat":  # the exact inner product: top candidates are the true top rows
        assert_same_lists(lookup(cache, q, 7, top=True, bottom=True, search=Search(candidates=7)), exact)


def test_cosine_index(cache: GradientCache) -> None:
    cache.build_index("flat", cosine=True)
    q = queries()
    unit = Normalisation("vectors")
    got = lookup(cache, q, 5, top=True, bottom=True, norms=unit, search=Search(candidates=5))
    assert_same_lists(got, scan(cache, q, 5, top=True, bottom=True, norms=unit))
    with pytest.raises(ValueError, match="built for cosine scores.*--no-cosine"):
        lookup(cache, q, 5)
    assert lookup(cache, q, 5, search="exact").method == "exact"


def test_stale_and_damaged_indexes_are_refused(cache: GradientCache) -> None:
    entry = cache.build_index("flat")
    q = queries()
    # a damaged shortlist, then a damaged index file
    short = cache.path / entry["files"][1]["file"]
    short.write_bytes(short.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CacheError, match="does not match its sha256.*--rebuild"):
        lookup(GradientCache(cache.path), q, 3)
    entry = cache.build_index("flat", rebuild=True)
    path = cache.path / entry["files"][0]["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="does not match its sha256.*--rebuild"):
        lookup(GradientCache(cache.path), q, 3)
    assert lookup(GradientCache(cache.path), q, 3, search="exact").top is not None
    cache.build_index("flat", rebuild=True)
    # the cache changed since: a shard's checksum differs from the one the index was built from
    manifest = json.loads((cache.path / MANIFEST).read_text())
    manifest["shards"][2]["sha256"] = "0" * 64
    (cache.path / MANIFEST).write_text(json.dumps(manifest))
    changed = GradientCache(cache.path)
    with pytest.raises(CacheError, match=r"stale: the cache changed since the index was built \(shards \[2\]"):
        lookup(changed, q, 3)
    with pytest.raises(CacheError, match="stale"):
        changed.index()
    with pytest.raises(ValueError, match="no BM25 index"):
        lookup(changed, q, 3, search="bm25", texts=["x"] * 5)


def test_no_index_means_the_exact_scan(cache: GradientCache) -> None:
    q = queries()
    assert lookup(cache, q, 3).method == "exact"
    with pytest.raises(ValueError, match="has no index: build it with `hf-grass index"):
        lookup(cache, q, 3, search="index")
    with pytest.raises(ValueError, match="search must be one of"):
        lookup(cache, q, 3, search="fast")


def test_interrupted_build_resumes_from_its_checkpoint(cache: GradientCache, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = write_cache(cache.path.parent / "reference")
    want = reference.build_index("ivfpq")
    real = CacheRows.iter_row_blocks
    read: list[int] = []

    def failing(self, rows_per_block, shards=None):  # noqa: ANN001, ANN202
        for block in real(self, rows_per_block, shards):
            if len(read) == 4 and fail:
                raise OSError("injected: the machine went down")
            read.append(block.rows.shape[0])
            yield block

    monkeypatch.setattr(CacheRows, "iter_row_blocks", failing)
    fail = True
    with pytest.raises(OSError, match="injected"):
        cache.build_index("ivfpq", checkpoint_rows=100)
    assert "index" not in json.loads((cache.path / MANIFEST).read_text())
    state = json.loads((cache.path / index_module.BUILD_DIR / "state.json").read_text())
    assert state["next_shard"] == 4  # checkpoints after shards 2 and 4 (every >= 100 rows)
    fail, read[:] = False, []
    got = cache.build_index("ivfpq", checkpoint_rows=100)
    assert sum(read) == cache.num_rows - 256  # only the shards after the checkpoint were read again
    assert got["files"] == want["files"]  # the same bytes as an uninterrupted build


def test_a_repeated_build_keeps_the_index_entry(cache: GradientCache) -> None:
    entry = cache.build_index("flat")
    from hf_grass.cache.manifest import carry_indexes, merge_parts

    parts = [json.loads((cache.path / "parts/rank0-of1.json").read_text())]
    assert carry_indexes(cache.path, merge_parts(parts))["index"] == entry


def test_bm25_candidates_and_the_join(cache: GradientCache) -> None:
    entry = cache.indexes.build_lexical()
    assert entry["rows"] == cache.num_rows and all((cache.path / f["file"]).is_file() for f in entry["files"])
    lexical = GradientCache(cache.path, verify=True).indexes.lexical()
    hits = lexical.search(["violin tiger", "nothing matches"], 20)
    found = hits[0][hits[0] >= 0]
    texts = {i: d["text"] for i, d in cache.documents().items()}
    assert found.numel() > 0 and all("violin" in texts[int(i)] or "tiger" in texts[int(i)] for i in found)
    assert (hits[1] == -1).all()
    q = queries(2)
    dense = scan(cache, q, top=False, dense=True).dense
    got = lookup(cache, q, 4, search="bm25", top=True, bottom=True, texts=["violin tiger", "ocean"])
    assert got.method == "bm25"
    for lists in (got.top, got.bottom):
        torch.testing.assert_close(lists.scores, dense.gather(1, lists.indices), rtol=1e-5, atol=1e-5)
    # BM25 candidates only: every helpful document shares a word with its query
    assert all("violin" in texts[i] or "tiger" in texts[i] for i in got.top.indices[0].tolist())
    cache.build_index("flat")
    joined = lookup(cache, q, 4, top=True, bottom=True, search=Search("index+bm25", cache.num_rows),
                    texts=["violin tiger", "ocean"])  # fmt: skip
    assert_same_lists(joined, scan(cache, q, 4, top=True, bottom=True))


def test_batched_lists_equal_the_dense_scores(cache: GradientCache) -> None:
    q = queries(300, seed=5)  # many queries: one matrix-matrix product per block of rows
    got = scan(cache, q, 6, top=True, bottom=True)
    dense = scan(cache, q, top=False, dense=True).dense
    want_top = dense.topk(6, dim=1)
    want_bottom = dense.topk(6, dim=1, largest=False)
    torch.testing.assert_close(got.top.scores, want_top.values)
    torch.testing.assert_close(got.bottom.scores, want_bottom.values)
    assert torch.equal(got.top.indices, want_top.indices) and torch.equal(got.bottom.indices, want_bottom.indices)
    # the accumulator takes rows from anywhere, in any blocks, and flushes in bounded memory
    acc = TopKAccumulator(q, 6, top=True, bottom=True, flush_rows=50)
    rows, idx = cache.load(), cache.indices
    for lo in range(0, rows.shape[0], 37):
        acc.add_rows(idx[lo : lo + 37], rows[lo : lo + 37])
        assert acc._pending < 50 + 37
    assert_same_lists(acc.result(), got)


def test_rows_at_reads_the_rows(cache: GradientCache) -> None:
    rows = cache.load()
    positions = torch.tensor([399, 0, 64, 63, 64, 200])
    torch.testing.assert_close(cache.rows.rows_at(positions), rows[positions])
    blocks = list((b.start, b.rows.clone()) for b in cache.rows.iter_row_blocks(50, shards=[1, 3]))
    assert [s for s, _ in blocks] == [64, 114, 192, 242]
    torch.testing.assert_close(torch.cat([r for _, r in blocks]), torch.cat([rows[64:128], rows[192:256]]))
