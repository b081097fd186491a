"""The gradient cache: layout, resume, refusal to mix, integrity checks, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_grass.attribution import AttributionPass, Batching
from hf_grass.cache import CacheError, GradientCache
from hf_grass.cache.files import FileLock
from hf_grass.capture import GradientComputer
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource
from hf_grass.testing import random_token_examples, tiny_gpt2, tiny_llama

VOCAB = 40


def build(path: Path, model, config: GraSSConfig, data, batch_size: int = 3) -> GradientCache:
    computer = GradientComputer(model, config)
    return GradientCache(
        AttributionPass(computer, ExampleSource(data), path, Batching(batch_size, disable_progress=True)).run()
    )


def file_bytes(cache: GradientCache) -> dict[str, bytes]:
    return {str(p.relative_to(cache.path)): p.read_bytes() for p, _ in cache.files()}


class Exploding:
    """A dataset that raises once when example ``at`` is read: a crash in the middle of a pass."""

    def __init__(self, data: list[dict], at: int):
        self.data, self.at, self.armed = data, at, True

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        if i == self.at and self.armed:
            self.armed = False
            raise RuntimeError("simulated crash")
        return self.data[i]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_layout_roundtrip_and_rows(tmp_path: Path, dtype: str) -> None:
    model = tiny_gpt2(VOCAB)
    data = random_token_examples(11, VOCAB)
    config = GraSSConfig(
        compressor="factgrass", proj_dim=16, shard_size=4, dtype=dtype, preconditioner="fim"
    )
    cache = build(tmp_path / "c", model, config, data)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_rows"] == 11 and len(manifest["shards"]) == 3
    assert manifest["config_hash"] == config.cache_hash()
    assert manifest["model"]["class"] == "GPT2LMHeadModel" and manifest["model"]["weights_sha256"]
    assert [m["name"] for m in manifest["modules"]][-1] == "lm_head"
    assert cache.indices.tolist() == list(range(11))
    rows = cache.load()
    assert rows.shape == (11, cache.dim) and cache.dtype == config.torch_dtype
    # rows equal a direct computation, up to the storage dtype
    computer = GradientComputer(model, config)
    from hf_grass.data import collate

    with computer.session():
        direct = computer.compute(collate(data)).rows
    torch.testing.assert_close(rows, direct.to(config.torch_dtype).float())
    # memory-mapped shard reads, documents, statistics
    (indices, grads), *_ = cache.rows.iter_shards()
    assert grads.dtype == config.torch_dtype and indices.tolist() == [0, 1, 2, 3]
    docs = cache.documents([5])
    assert docs[5]["index"] == 5
    stats = cache.statistics()
    assert float(stats["examples"]) == 11
    cache.verify()


def test_resume_after_crash_is_bit_identical(tmp_path: Path) -> None:
    model = tiny_llama(VOCAB)
    data = random_token_examples(13, VOCAB, seed=3)
    config = GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=4, ekfac_sample_size=6)
    reference = build(tmp_path / "ref", model, config, data)
    crashing = Exploding(data, at=9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(tmp_path / "resumed", model, config, crashing)
    partial = GradientCache(tmp_path / "resumed")
    assert not partial.manifest["complete"] and partial.num_rows == 8  # two complete shards kept
    resumed = build(tmp_path / "resumed", model, config, crashing)
    assert resumed.manifest["complete"]
    assert file_bytes(resumed) == file_bytes(reference)
    # a rerun on a finished cache has nothing to do and changes nothing
    again = build(tmp_path / "resumed", model, config, data)
    assert file_bytes(again) == file_bytes(reference)
    assert not list((tmp_path / "resumed" / "stats").glob("*"))[1:]  # one stats file left


def test_same_config_same_bytes(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB)
    data = random_token_examples(7, VOCAB, seed=4)
    config = GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=5)
    a = build(tmp_path / "a", model, config, data)
    b = build(tmp_path / "b", model, config, data)
    assert file_bytes(a) == file_bytes(b)


def test_mixing_is_refused(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB)
    data = random_token_examples(6, VOCAB)
    config = GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=4)
    build(tmp_path / "c", model, config, data)
    for change, what in [
        ({"proj_dim": 36, "sparsify_factor": 4}, "proj_dim"),
        ({"dtype": "float32"}, "dtype"),
        ({"target_modules": ["c_attn"]}, "target_modules"),
        ({"seed": 1}, "seed"),
    ]:
        with pytest.raises(CacheError, match=f"another configuration.*{what}"):
            build(tmp_path / "c", model, config.replace(**change), data)
    other = tiny_gpt2(VOCAB, seed=1)
    with pytest.raises(CacheError, match="another model"):
        build(tmp_path / "c", other, config, data)
    with pytest.raises(CacheError, match="another dataset"):
        build(tmp_path / "c", model, config, random_token_examples(6, VOCAB, seed=9))


def test_lock_prevents_a_second_writer(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB)
    (tmp_path / "c").mkdir()
    with (
        FileLock(tmp_path / "c" / ".lock-rank0"),
        pytest.raises(CacheError, match="another process is writing"),
    ):
        build(
            tmp_path / "c",
            model,
            GraSSConfig(compressor="factgrass", proj_dim=16),
            random_token_examples(3, VOCAB),
        )


def test_corruption_is_detected(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB)
    cache = build(
        tmp_path / "c",
        model,
        GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=3),
        random_token_examples(7, VOCAB),
    )
    shard = cache.path / cache.shards[1]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, altered content
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-000001.safetensors does not match its sha256"):
        GradientCache(cache.path, verify=True)
    shard.write_bytes(bytes(data[:-10]))  # truncated: caught without hashing
    with pytest.raises(CacheError, match="truncated"):
        GradientCache(cache.path)
    shard.unlink()
    with pytest.raises(CacheError, match="missing; rebuild shard 1"):
        GradientCache(cache.path)
    (cache.path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="does not parse"):
        GradientCache(cache.path)


def test_manifest_paths_must_stay_inside(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB)
    cache = build(
        tmp_path / "c",
        model,
        GraSSConfig(compressor="factgrass", proj_dim=16),
        random_token_examples(3, VOCAB),
    )
    manifest = json.loads((cache.path / "manifest.json").read_text())
    for bad in ("../outside.safetensors", "/etc/passwd", "shards/../../x"):
        manifest["shards"][0]["file"] = bad
        (cache.path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CacheError, match="outside the cache directory"):
            GradientCache(cache.path)


def test_unsupervised_examples_are_skipped_and_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_gpt2(VOCAB)
    data = random_token_examples(5, VOCAB)
    data[2] = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}
    data[4] = {"input_ids": [9]}  # one token: nothing to predict
    cache = build(tmp_path / "c", model, GraSSConfig(compressor="factgrass", proj_dim=16), data)
    assert cache.indices.tolist() == [0, 1, 3]
    assert cache.document_store.skipped == [2, 4]
    assert "no supervised tokens" in caplog.text


def test_bad_input_errors(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB)
    config = GraSSConfig(compressor="factgrass", proj_dim=16)
    with pytest.raises(ValueError, match="empty"):
        build(tmp_path / "e", model, config, [])
    with pytest.raises(ValueError, match="no tokenizer"):
        build(tmp_path / "t", model, config, [{"text": "hello"}])
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite loss for training example index 0"):
        build(tmp_path / "n", model, config, random_token_examples(4, VOCAB))
    assert not (tmp_path / "n" / "shards" / "shard-000000.safetensors").exists()


def test_long_sequences_are_truncated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_gpt2(VOCAB)  # context of 64 positions
    data = random_token_examples(3, VOCAB)
    data[1] = {"input_ids": list(range(4, 34)) * 3}  # 90 tokens
    config = GraSSConfig(compressor="factgrass", proj_dim=16)
    cache = build(tmp_path / "c", model, config, data)
    assert cache.summary()["truncated"] == 1 and cache.num_rows == 3
    assert "truncating" in caplog.text
    short = build(tmp_path / "s", model, config.replace(max_length=5), data)
    assert short.summary()["truncated"] == 3


def test_fp16_overflow_names_the_example(tmp_path: Path) -> None:
    """Rows finite in fp32 but too large for fp16 are an error naming the example, not stored inf."""

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(6, 3)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
            return {"logits": self.head(input_ids)}

    torch.manual_seed(0)
    data = [{"input_ids": torch.randn(6).tolist(), "labels": i % 3} for i in range(5)]
    data[3]["input_ids"] = [3e5] * 6  # huge inputs: a gradient of ~1e5 and more
    config = GraSSConfig(compressor="random", proj_dim=8, dtype="float16")
    with pytest.raises(ValueError, match="example index 3 overflows float16.*bfloat16"):
        build(tmp_path / "c16", Linear(), config, data)
    cache = build(tmp_path / "c32", Linear(), config.replace(dtype="float32"), data)
    assert cache.num_rows == 5 and torch.isfinite(cache.load()).all()


def test_format_1_caches_are_refused(tmp_path: Path) -> None:
    """Caches written by hf-grass 0.1 (format 1) are refused, saying how to fix it (issue 16 item 7):
    their eigenbasis files differ and their wide factors' estimator was biased."""
    path = tmp_path / "old"
    build(path, tiny_gpt2(VOCAB), GraSSConfig(proj_dim=16, dtype="float32"), random_token_examples(5, VOCAB))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"hf-grass 0\.1 \(cache format 1\).*Rebuild it"):
        GradientCache(path)
