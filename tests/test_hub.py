"""Hub push/pull of a gradient cache, end to end through the real ``huggingface_hub`` client.

The client talks HTTP to ``hub_server.MockHub`` on 127.0.0.1 (no network here). Xet is disabled
for these tests (``constants.HF_HUB_DISABLE_XET``): it is a separate storage protocol the mock does
not speak, so binary files take the client's Git LFS path instead.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_server import MockHub
from huggingface_hub import DatasetCard, HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError

import hf_grass.cache.reader as reader_module
import hf_grass.cache.reader_rows as reader_rows_module
import hf_grass.cache.verification as verification_module
from hf_grass import GradientCache, GraSSConfig, find_influential
from hf_grass.attribution import run_attribution_pass
from hf_grass.cache import CacheError, open_cache
from hf_grass.cache.hub import is_repo_id
from hf_grass.scoring import fitted_preconditioner
from hf_grass.testing import planted_facts_corpus, tiny_gpt2, word_tokenizer

# raised inside huggingface_hub's own LFS upload (``data=fileobj``), not by this code
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_mock_write_token"
REPO = "alice/tiny-gpt2-grads"
MODEL_NAME, MODEL_REVISION = "alice/tiny-gpt2", "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Built:
    model: Any
    tokenizer: Any
    facts: list[dict]
    cache: GradientCache  # 16 documents, 4 shards
    other: GradientCache  # 7 other documents, 2 shards: a second version of the repo


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("hub_caches")
    docs, facts = planted_facts_corpus(n_facts=4, n_filler=12, seed=3)
    tokenizer = word_tokenizer([w for d in docs for w in d.split()])
    model = tiny_gpt2(len(tokenizer))
    # as if loaded with from_pretrained: the fingerprint (and so the card) records name and revision
    model.config._name_or_path, model.config._commit_hash = MODEL_NAME, MODEL_REVISION
    config = GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=5, dtype="float16", seed=7)
    kw = {"disable_progress": True, "batch_size": 4}
    cache = run_attribution_pass(model, docs, config, tokenizer, cache_dir=tmp / "cache", **kw)
    other = run_attribution_pass(model, docs[:7], config, tokenizer, cache_dir=tmp / "other", **kw)
    return Built(model, tokenizer, facts, cache, other)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MockHub]:
    """A fresh mock Hub, with every piece of client state pointed at ``tmp_path``."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # where pulled caches land by default
    server = MockHub(token=TOKEN).start()
    try:
        yield server
    finally:
        server.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("mock-hub")], "server threads left"
    assert not server.unhandled, f"requests the mock does not implement: {server.unhandled}"


def push(cache: GradientCache, hub: MockHub, **kw: Any) -> Any:
    return cache.push_to_hub(REPO, token=TOKEN, endpoint=hub.url, **kw)


def expected_repo_files(cache: GradientCache) -> set[str]:
    root = cache.path.resolve()
    listed = {p.relative_to(root).as_posix() for p, _ in cache.files()}
    return listed | {"manifest.json", "README.md", ".gitattributes"}


def flip_tail(data: bytes, n: int = 8) -> bytes:
    """Same size, different bytes (the last ``n`` bytes inverted)."""
    return data[:-n] + bytes(b ^ 0xFF for b in data[-n:])


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_gives_an_identical_cache(built: Built, hub: MockHub) -> None:
    cache = built.cache
    fitted_preconditioner(cache)  # writes preconditioner/, which must not travel
    (cache.path / ".stray.tmp-123").write_bytes(b"partial")  # nor a temp file (nor the lock, nor parts/)
    before = tree(cache.path)

    commit = push(cache, hub)
    assert tree(cache.path) == before, "pushing modified the local cache directory"
    assert set(hub.files(REPO)) == expected_repo_files(cache)
    # binary files went through Git LFS (upload to the storage origin), not inline, and not Xet
    assert any(r[:2] == ("storage", "PUT") for r in hub.requests)
    assert not any("xet" in r[2] for r in hub.requests)

    pulled = GradientCache.from_pretrained(REPO, endpoint=hub.url)
    assert pulled.path != cache.path
    assert pulled.manifest == cache.manifest
    assert (pulled.path / "manifest.json").read_bytes() == (cache.path / "manifest.json").read_bytes()
    for (mine, _), (theirs, _) in zip(cache.files(), pulled.files(), strict=True):
        assert mine.relative_to(cache.path.resolve()) == theirs.relative_to(pulled.path.resolve())
        assert mine.read_bytes() == theirs.read_bytes()
    assert torch.equal(pulled.load(), cache.load())
    assert torch.equal(pulled.indices, cache.indices)
    assert pulled.documents() == cache.documents()
    stats, pulled_stats = cache.statistics(), pulled.statistics()
    assert stats.keys() == pulled_stats.keys() and all(torch.equal(stats[k], pulled_stats[k]) for k in stats)
    # LFS files were downloaded from the storage origin the Hub redirected to
    assert any(r[:2] == ("storage", "GET") for r in hub.requests)

    # same scores from the same prompt, local cache vs pulled cache
    fact = built.facts[0]
    kw = {"model": built.model, "tokenizer": built.tokenizer, "k": 4, "completion": " " + fact["answer"]}
    local = find_influential(fact["prompt"], cache=cache, **kw)
    remote = find_influential(fact["prompt"], cache=pulled, **kw)
    assert [(d.index, d.score, d.text) for d in local.documents] == [
        (d.index, d.score, d.text) for d in remote.documents
    ]
    assert [d.score for d in local.harmful] == [d.score for d in remote.harmful]

    # pushing the same cache again changes nothing
    assert push(cache, hub).oid == commit.oid


def test_dataset_card(built: Built, hub: MockHub) -> None:
    push(built.cache, hub)
    card = DatasetCard(hub.files(REPO)["README.md"].decode())
    assert {"hf-grass", "gradient-cache", "data-attribution"} <= set(card.data.tags)
    assert card.data.viewer is False
    text, cfg = card.text, built.cache.config
    for needle in (
        "GPT2LMHeadModel",
        MODEL_NAME,
        MODEL_REVISION,
        "`factgrass`",
        '"proj_dim": 16',
        '"sparsify_factor": 4',
        "| Seed | `7` |",
        "| Storage dtype | `float16` |",
        f"| Rows | {built.cache.num_rows} (of 16 examples, 0 skipped) |",
        f"{built.cache.dim} per row, over {len(built.cache.modules)} modules",
        f'GradientCache.from_pretrained("{REPO}")',
        f'cache="{REPO}"',
        f'AutoModelForCausalLM.from_pretrained("{MODEL_NAME}", revision="{MODEL_REVISION}")',
    ):
        assert needle in text, needle
    assert cfg.seed == 7
    # on another branch, the snippet pins that branch
    push(built.cache, hub, revision="v1")
    card = DatasetCard(hub.files(REPO, revision="v1")["README.md"].decode())
    assert f'GradientCache.from_pretrained("{REPO}", revision="v1")' in card.text


def test_find_influential_with_a_repo_id(built: Built, hub: MockHub, monkeypatch: pytest.MonkeyPatch) -> None:
    # the module-level call resolves the repo id itself; HF_ENDPOINT, set after huggingface_hub was
    # imported, still reaches it because hf_grass reads the variable at call time
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    built.cache.push_to_hub(REPO, token=TOKEN)
    fact = built.facts[1]
    kw = {"model": built.model, "tokenizer": built.tokenizer, "k": 3, "completion": " " + fact["answer"]}
    remote = find_influential(fact["prompt"], cache=REPO, **kw)
    local = find_influential(fact["prompt"], cache=built.cache.path, **kw)
    assert [(d.index, d.score) for d in remote.documents] == [(d.index, d.score) for d in local.documents]
    assert all(d.text for d in remote.documents)


def _no_reads_before_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any safetensors header parse or array read fail the test."""

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a file was read before the download was checked")

    monkeypatch.setattr(reader_rows_module, "read_header", boom)  # the shard headers
    monkeypatch.setattr(reader_rows_module, "mmap_tensors", boom)  # the rows
    monkeypatch.setattr(reader_module, "mmap_tensors", boom)  # the statistics and the eigenbasis


@pytest.mark.parametrize("how", ["storage", "commit"])
@pytest.mark.parametrize("path", ["shards/shard-000001.safetensors", "shards/shard-000000.jsonl"])
def test_tampered_file_is_refused(
    built: Built, hub: MockHub, monkeypatch: pytest.MonkeyPatch, how: str, path: str
) -> None:
    push(built.cache, hub)
    bad = flip_tail(hub.files(REPO)[path])
    if how == "storage":  # bytes changed behind the same oid / ETag / size
        hub.corrupt_file(REPO, path, bad)
    else:  # an ordinary commit replacing the file, the manifest left as it was
        HfApi(endpoint=hub.url, token=TOKEN).upload_file(
            path_or_fileobj=bad, path_in_repo=path, repo_id=REPO, repo_type="dataset"
        )
    _no_reads_before_checks(monkeypatch)
    with pytest.raises(CacheError, match=f"{path} of {REPO}@main does not match the sha256"):
        GradientCache.from_pretrained(REPO, endpoint=hub.url)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "shards/../../x.safetensors"])
def test_manifest_naming_a_path_outside_is_refused(
    built: Built, hub: MockHub, monkeypatch: pytest.MonkeyPatch, evil: str
) -> None:
    push(built.cache, hub)
    manifest = json.loads(hub.files(REPO)["manifest.json"])
    manifest["shards"][0]["file"] = evil
    HfApi(endpoint=hub.url, token=TOKEN).upload_file(
        path_or_fileobj=json.dumps(manifest).encode(),
        path_in_repo="manifest.json",
        repo_id=REPO,
        repo_type="dataset",
    )
    _no_reads_before_checks(monkeypatch)
    monkeypatch.setattr(
        verification_module, "sha256_file", lambda *a: pytest.fail("hashed before the paths were checked")
    )
    with pytest.raises(CacheError, match="outside the cache directory"):
        GradientCache.from_pretrained(REPO, endpoint=hub.url)


def test_revisions_branches_and_stale_files(built: Built, hub: MockHub) -> None:
    first = push(built.cache, hub)
    second = push(built.other, hub)  # fewer shards: the old ones must go
    assert set(hub.files(REPO)) == expected_repo_files(built.other)
    assert GradientCache.from_pretrained(REPO, endpoint=hub.url).manifest == built.other.manifest
    pinned = GradientCache.from_pretrained(REPO, revision=first.oid, endpoint=hub.url)
    assert pinned.manifest == built.cache.manifest
    assert torch.equal(pinned.load(), built.cache.load())
    assert GradientCache.from_pretrained(REPO, revision=second.oid, endpoint=hub.url).num_rows == 7

    push(built.cache, hub, revision="v1")  # creates the branch from main, then commits to it
    assert (
        GradientCache.from_pretrained(REPO, revision="v1", endpoint=hub.url).manifest == built.cache.manifest
    )
    assert GradientCache.from_pretrained(REPO, endpoint=hub.url).manifest == built.other.manifest


def test_private_repo_needs_the_token(built: Built, hub: MockHub, tmp_path: Path) -> None:
    push(built.cache, hub, private=True)
    with pytest.raises(RepositoryNotFoundError, match="no local directory"):
        GradientCache.from_pretrained(REPO, endpoint=hub.url, local_dir=tmp_path / "a")
    pulled = GradientCache.from_pretrained(REPO, endpoint=hub.url, token=TOKEN, local_dir=tmp_path / "b")
    assert pulled.path == tmp_path / "b" and pulled.manifest == built.cache.manifest


def test_offline_reuses_the_downloaded_copy_and_still_verifies(
    built: Built, hub: MockHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    push(built.cache, hub)
    pulled = GradientCache.from_pretrained(REPO, endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert GradientCache.from_pretrained(REPO, endpoint=hub.url).manifest == built.cache.manifest
    shard = pulled.path / "shards" / "shard-000002.safetensors"
    shard.write_bytes(flip_tail(shard.read_bytes()))  # local damage is caught too
    with pytest.raises(CacheError, match="shard-000002.safetensors of .* does not match"):
        GradientCache.from_pretrained(REPO, endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # online, the damaged copy still has the current commit and ETag, so only a forced download repairs it
    repaired = GradientCache.from_pretrained(REPO, endpoint=hub.url, force_download=True)
    assert torch.equal(repaired.load(), built.cache.load())


def test_a_fit_or_writer_parts_in_the_repo_are_not_downloaded(built: Built, hub: MockHub) -> None:
    push(built.cache, hub)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    for path in ("preconditioner/ekfac-000000000000.safetensors", "parts/rank0-of1.json"):
        api.upload_file(path_or_fileobj=b"{}", path_in_repo=path, repo_id=REPO, repo_type="dataset")
    pulled = GradientCache.from_pretrained(REPO, endpoint=hub.url)
    assert not (pulled.path / "preconditioner").exists() and not (pulled.path / "parts").exists()


def test_unfinished_or_damaged_caches_are_not_pushed(built: Built, hub: MockHub, tmp_path: Path) -> None:
    copy = Path(
        shutil.copytree(built.cache.path, tmp_path / "copy", ignore=shutil.ignore_patterns(".lock-*"))
    )
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(CacheError, match="unfinished build"):
        push(GradientCache(copy), hub)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shard = copy / "shards" / "shard-000000.safetensors"
    shard.write_bytes(flip_tail(shard.read_bytes()))
    with pytest.raises(CacheError, match="does not match its sha256"):
        push(GradientCache(copy), hub)
    assert (REPO, "dataset") not in {(r.repo_id, r.repo_type) for r in hub.repos.values()}


def test_local_paths_and_repo_ids(built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_cache(built.cache.path).manifest == built.cache.manifest
    assert open_cache(str(built.cache.path)).manifest == built.cache.manifest
    monkeypatch.chdir(tmp_path)
    for missing in ("grass_cache", "./a/b", "a/b/c", str(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError):  # a path, never sent to the Hub
            open_cache(missing)
    with pytest.raises(ValueError, match="local path"):
        open_cache(built.cache.path, revision="main")
    assert is_repo_id("alice/grads") and is_repo_id("org-1/my.cache_v2")
    for not_an_id in ("grads", "./a", "a/b/c", "/abs/x", "a/../b", "a--b/c", "-a/b"):
        assert not is_repo_id(not_an_id), not_an_id


def test_large_push_resumes_and_a_lazy_pull_fetches_only_the_candidates_shards(
    built: Built, hub: MockHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hf_grass.query import Attributor

    copy = Path(shutil.copytree(built.cache.path, tmp_path / "copy", ignore=shutil.ignore_patterns(".lock-*")))
    cache = GradientCache(copy)
    entry = cache.build_index("flat")
    real_commit, calls = HfApi.create_commit, []

    def failing_commit(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(kwargs.get("commit_message"))
        if len(calls) == 2 and fail:
            raise ConnectionError("injected: the connection dropped")
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", failing_commit)
    fail = True
    with pytest.raises(ConnectionError, match="injected"):
        push(cache, hub, large=True)  # 4 shards x 2 files + stats + eigenbasis + index: 3 data commits
    assert "manifest.json" not in hub.files(REPO)  # no manifest until every file is there
    uploaded = sum(1 for r in hub.requests if r[:2] == ("storage", "PUT"))
    calls.clear()
    fail = False
    commit = cache.push_to_hub(REPO, token=TOKEN, endpoint=hub.url, large=True)
    assert set(hub.files(REPO)) == expected_repo_files(cache)
    assert entry["files"][0]["file"] in hub.files(REPO)
    assert calls[-1].startswith("Upload hf-grass gradient cache") and "part" in calls[0]
    # LFS objects sent before the interruption were not sent again
    again = sum(1 for r in hub.requests if r[:2] == ("storage", "PUT")) - uploaded
    lfs_files = [f for f in hub.files(REPO) if f.endswith(".safetensors") or f.endswith(".index")]
    assert uploaded + again == len(lfs_files) and again < len(lfs_files)
    assert push(cache, hub, large=True).oid == commit.oid  # nothing changed: no new commit

    pulled = open_cache(REPO, endpoint=hub.url, lazy=True, local_dir=tmp_path / "lazy")
    assert not list((pulled.path / "shards").glob("*")) if (pulled.path / "shards").exists() else True
    assert pulled.index() is not None and pulled.remote is not None
    fact = built.facts[0]
    kw = {"k": 1, "completion": " " + fact["answer"]}
    lazy = Attributor(built.model, built.tokenizer, pulled, candidates=1).find_influential(fact["prompt"], **kw)
    exact = Attributor(built.model, built.tokenizer, cache, search="exact").find_influential(fact["prompt"], **kw)
    assert [(d.index, d.text) for d in lazy.documents + lazy.harmful] == [
        (d.index, d.text) for d in exact.documents + exact.harmful
    ]
    assert [d.score for d in lazy.documents] == pytest.approx([d.score for d in exact.documents], rel=1e-5)
    fetched = {f for f in pulled.remote.fetched if f.endswith(".safetensors")}
    assert 1 <= len(fetched) <= 2 < len(cache.shards)  # only the shards holding the two documents
    with pytest.raises(ValueError, match="revision and lazy apply to Hub repos"):
        open_cache(copy, lazy=True)
