"""The ``hf-grass`` command line, run in-process through ``main([...])`` (plus the real entry point
once): build, info, query (table, JSON, plot), push/pull against the mock Hub, the demo, and the
exit codes of bad input (2 = usage error, 1 = runtime failure)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pytest
from hub_server import MockHub

from hf_grass import GradientCache
from hf_grass.cli import UsageError, main
from hf_grass.cli.demo import DEMO_CORPUS, DEMO_FACTS
from hf_grass.testing import planted_facts_corpus, tiny_gpt2, word_tokenizer

# raised inside huggingface_hub's own LFS upload (``data=fileobj``), not by this code
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@dataclass
class Setup:
    root: Path
    model_dir: Path
    other_model_dir: Path  # same shapes, other weights
    dataset: Path  # JSONL with text and id
    cache: Path
    docs: list[str]
    facts: list[dict]
    build_out: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """A tiny GPT-2 and tokenizer saved with save_pretrained, a JSONL corpus, and its cache built
    by ``hf-grass build``."""
    root = tmp_path_factory.mktemp("cli")
    docs, facts = planted_facts_corpus(n_facts=4, n_filler=12, seed=1)
    tokenizer = word_tokenizer([w for d in docs for w in d.split()])
    for name, seed in (("model", 0), ("other", 1)):
        model = tiny_gpt2(len(tokenizer), seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    dataset = root / "docs.jsonl"
    dataset.write_text("".join(json.dumps({"text": d, "id": f"doc-{i}"}) + "\n" for i, d in enumerate(docs)))
    cache = root / "cache"
    capture = _Capture()
    with capture:
        code = main(
            ["build", "--model", str(root / "model"), "--dataset", str(dataset), "--cache-dir", str(cache)]
            + ["--proj-dim", "64", "--shard-size", "8", "--batch-size", "8", "--no-progress"]
        )
    assert code == 0, capture.err
    return Setup(root, root / "model", root / "other", dataset, cache, docs, facts, capture.out)


class _Capture:
    """stdout/stderr of a block (the module fixture cannot use the function-scoped capsys)."""

    def __enter__(self) -> _Capture:
        import io

        self._old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self._out, self._err = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._old
        self.out, self.err = self._out.getvalue(), self._err.getvalue()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- build and info ----------------------------------------------------------------------------


def test_build_writes_a_cache_and_a_summary(setup: Setup) -> None:
    cache = GradientCache(setup.cache)
    assert cache.num_rows == len(setup.docs) and cache.manifest["complete"]
    assert cache.config.proj_dim == 64 and cache.config.shard_size == 8 and len(cache.shards) == 2
    assert cache.model_info["name_or_path"] == str(setup.model_dir)  # what query falls back to
    assert cache.documents([0])[0]["id"] == "doc-0"
    assert f"rows        {len(setup.docs)} of {len(setup.docs)} examples" in setup.build_out
    assert "tokens/s" in setup.build_out and "2 shard(s)" in setup.build_out


def test_build_from_save_to_disk_with_a_text_column_and_module_selection(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from datasets import Dataset

    Dataset.from_dict({"body": setup.docs, "text": ["ignored"] * len(setup.docs)}).save_to_disk(
        tmp_path / "ds"
    )
    base = ["build", "--model", str(setup.model_dir), "--dataset", str(tmp_path / "ds"), "--no-progress"]
    base += ["--text-column", "body", "--max-examples", "5", "--proj-dim", "16", "--compressor", "sjlt"]
    code, out, err = run(
        capsys, *base, "--cache-dir", str(tmp_path / "a"), "--target-modules", "c_attn", "lm_head"
    )
    assert code == 0, err
    cache = GradientCache(tmp_path / "a")
    assert cache.num_rows == 5 and cache.config.preconditioner == "fim"
    assert cache.module_names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "lm_head"]
    assert cache.documents([0])[0]["text"] == setup.docs[0]  # the body column, not "text"
    # one value with regex characters is a regex over full names
    code, _, err = run(capsys, *base, "--cache-dir", str(tmp_path / "b"), "--target-modules", r".*\.mlp\..*")
    assert code == 0, err
    assert all(".mlp." in n for n in GradientCache(tmp_path / "b").module_names)


def test_info_text_json_and_verify(setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "info", str(setup.cache))
    assert code == 0
    assert f"rows        {len(setup.docs)} of {len(setup.docs)} examples" in out
    assert "factgrass, 64 numbers per module" in out and "preconditioner ekfac" in out
    assert "per module: " in out and "blocks of 64 numbers" in out  # the layout, named (issue 16 item 7)

    code, out, _ = run(capsys, "info", str(setup.cache), "--json", "--verify")
    summary = json.loads(out)
    assert code == 0 and summary["rows"] == len(setup.docs) and summary["verified_files"] > 0
    assert summary["model"]["class"] == "GPT2LMHeadModel"

    broken = tmp_path / "broken"
    shutil.copytree(setup.cache, broken)
    shard = broken / "shards" / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    shard.write_bytes(bytes(data))
    assert run(capsys, "info", str(broken))[0] == 0  # sizes and headers are fine
    code, _, err = run(capsys, "info", str(broken), "--verify")
    assert code == 1 and "does not match its sha256" in err and "Traceback" not in err


# ---- query -------------------------------------------------------------------------------------


def test_query_table(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    fact = setup.facts[0]
    code, out, err = run(
        capsys, "query", "--cache", str(setup.cache), "--prompt", fact["prompt"],
        "--completion", " " + fact["answer"], "-k", "3",
    )  # fmt: skip
    assert code == 0, err
    assert f"Prompt:     {fact['prompt']!r}" in out
    assert "Most helpful training documents:" in out and "Most harmful training documents:" in out
    assert "rank       score    index  id" in out and "doc-" in out
    assert "score > 0  helpful" in out
    assert f"Loading model {setup.model_dir}" in err  # the model recorded in the manifest


def test_query_tokens_terminal_and_html(setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from html.parser import HTMLParser

    fact = setup.facts[0]
    report = tmp_path / "report.html"
    code, out, err = run(
        capsys, "query", "--cache", str(setup.cache), "--prompt", fact["prompt"],
        "--completion", " " + fact["answer"], "-k", "2", "--tokens", "--html", str(report),
    )  # fmt: skip
    assert code == 0, err
    # captured stdout is no terminal: the marked-up form, no colour codes
    assert "Token scores of the most helpful documents" in out and "\x1b[" not in out
    assert "  document: " in out and "  query:    " in out and "[+" in out and "strongest:" in out
    assert f"Token attribution report written to {report}" in err
    page = report.read_text(encoding="utf-8")
    HTMLParser().feed(page)
    assert page.startswith("<!DOCTYPE html>") and page.count('<article class="doc ') >= 2
    code, out, err = run(
        capsys, "query", "--cache", str(setup.cache), "--prompt", fact["prompt"],
        "--completion", " " + fact["answer"], "-k", "2", "--tokens", "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)[0]["documents"][0]
    assert sum(doc["token_scores"]["scores"]) == pytest.approx(doc["token_scores"]["score"], rel=1e-4)
    assert len(doc["query_token_scores"]["tokens"]) == len(doc["query_token_scores"]["scores"])
    code, _, err = run(capsys, "query", "--cache", str(setup.cache), "--prompt", "p", "--html", str(tmp_path / "no" / "r.html"))
    assert code == 2 and "does not exist" in err


def test_index_then_query_with_it_or_without(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(setup.cache, tmp_path / "cache", ignore=shutil.ignore_patterns(".lock-*")))
    code, out, err = run(capsys, "index", str(copy), "--kind", "flat", "--bm25")
    assert code == 0, err
    assert "index: Flat, 16 rows" in out and "lexical_index: BM25, 16 rows" in out
    code, out, _ = run(capsys, "info", str(copy))
    assert "index       Flat, 16 rows" in out and "bm25        BM25, 16 rows" in out
    fact = setup.facts[0]
    answers = {}
    for search in ("auto", "exact", "index+bm25"):
        code, out, err = run(
            capsys, "query", "--cache", str(copy), "--prompt", fact["prompt"], "--completion",
            " " + fact["answer"], "-k", "3", "--json", "--search", search,
        )  # fmt: skip
        assert code == 0, err
        answers[search] = [(d["index"], round(d["score"], 4)) for d in json.loads(out)[0]["documents"]]
    assert answers["auto"] == answers["exact"] == answers["index+bm25"]  # flat index, all rows candidates
    code, _, err = run(capsys, "index", "alice/some-repo")
    assert code == 2 and "pull it first" in err


def test_score_during_a_pass_equals_the_cached_query_and_selects(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fact = setup.facts[0]
    query = ["--prompt", fact["prompt"], "--completion", " " + fact["answer"], "-k", "3", "--json"]
    code, out, err = run(capsys, "query", "--cache", str(setup.cache), "--search", "exact", *query)
    assert code == 0, err
    cached = json.loads(out)[0]
    targets = tmp_path / "targets.jsonl"
    targets.write_text(json.dumps({"text": setup.docs[fact["doc"]]}) + "\n")
    chosen = tmp_path / "chosen.json"
    code, out, err = run(
        capsys, "score", "--cache", str(setup.cache), "--dataset", str(setup.dataset), *query,
        "--targets", str(targets), "--select", "2", "--select-out", str(chosen), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    during = report["results"][0]
    assert [d["index"] for d in during["documents"]] == [d["index"] for d in cached["documents"]]
    assert [d["index"] for d in during["harmful"]] == [d["index"] for d in cached["harmful"]]
    for got, want in zip(during["documents"], cached["documents"]):
        assert got["id"] == want["id"] and got["score"] == pytest.approx(want["score"], rel=1e-4)
    assert len(report["results"]) == 2  # the prompt and the target document
    assert [d["index"] for d in json.loads(chosen.read_text())] == [d["index"] for d in report["selected"]]
    assert len(report["selected"]) == 2
    code, _, err = run(capsys, "score", "--cache", str(setup.cache), "--dataset", str(setup.dataset))
    assert code == 2 and "no query" in err


def test_query_json_prompts_file_and_plot(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f["prompt"], "completion": " " + f["answer"]} for f in setup.facts[:2]]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot = tmp_path / "scores.png"
    code, out, err = run(
        capsys, "query", "--cache", str(setup.cache), "--model", str(setup.model_dir),
        "--prompts-file", str(prompts), "-k", "4", "--json", "--plot", str(plot),
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out)  # stdout is pure JSON
    assert [r["prompt"] for r in results] == [r["prompt"] for r in rows]
    for r in results:
        assert len(r["documents"]) == 4 and len(r["harmful"]) == 4
        scores = [d["score"] for d in r["documents"]]
        assert scores == sorted(scores, reverse=True)
        assert {"index", "score", "text", "id"} <= set(r["documents"][0])
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_query_generates_the_completion_and_scoring_overrides(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(setup.facts[1]["prompt"] + "\n\n")
    code, out, err = run(
        capsys, "query", "--cache", str(setup.cache), "--prompts-file", str(prompts), "--max-new-tokens", "2",
        "-k", "2", "--json", "--preconditioner", "kfac", "--cosine",
    )  # fmt: skip
    assert code == 0, err
    (result,) = json.loads(out)
    assert result["completion"] and all(-1.0001 <= d["score"] <= 1.0001 for d in result["documents"])
    # identity on a cache whose rows are whitened for ekfac is refused, saying which cache it needs
    code, _, err = run(
        capsys, "query", "--cache", str(setup.cache), "--prompts-file", str(prompts), "--max-new-tokens", "2",
        "--preconditioner", "identity",
    )  # fmt: skip
    assert code == 1 and "preconditioner='identity'" in err
    # the refined iHVP: re-runs a sample of the cache's documents from their text
    code, out, err = run(
        capsys, "query", "--cache", str(setup.cache), "--prompt", setup.facts[1]["prompt"], "--completion",
        " " + setup.facts[1]["answer"], "-k", "2", "--json", "--refine-steps", "2",
    )  # fmt: skip
    assert code == 0, err
    (refined,) = json.loads(out)
    assert refined["documents"] and all(d["score"] > 0 for d in refined["documents"])


def test_query_refuses_other_weights_unless_told(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    fact = setup.facts[0]
    argv = [
        "query",
        "--cache",
        str(setup.cache),
        "--model",
        str(setup.other_model_dir),
        "--prompt",
        fact["prompt"],
    ]
    argv += ["--completion", " " + fact["answer"], "-k", "2"]
    code, _, err = run(capsys, *argv)
    assert code == 1 and "weights differ" in err and "Traceback" not in err
    assert run(capsys, *argv, "--no-check-model")[0] == 0


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "usage: hf-grass"),
        (["build", "--dataset", "x.jsonl"], "the following arguments are required: --model"),
        (["query", "--cache", "{cache}", "--prompt", "p", "-k", "0"], "expected a positive integer"),
        (["build", "--model", "{model}", "--dataset", "{data}", "--compressor", "nope"], "invalid choice"),
        (
            ["build", "--model", "{model}", "--dataset", "{data}", "--proj-dim", "1000"],
            "invalid configuration",
        ),
        (["build", "--model", "{root}/missing", "--dataset", "{data}"], "does not exist"),
        (["build", "--model", "{model}", "--dataset", "{root}/missing.jsonl"], "does not exist"),
        (["build", "--model", "{model}", "--dataset", "{root}/bad.jsonl"], "line 2 of"),
        (["build", "--model", "{model}", "--dataset", "{root}/notext.jsonl"], "no 'text' column"),
        (["query", "--cache", "{root}/missing", "--prompt", "p"], "no gradient cache at"),
        (["query", "--cache", "{root}", "--prompt", "p"], "it has no manifest.json"),
        (["query", "--cache", "{cache}"], "no prompt"),
        (["query", "--cache", "{cache}", "--prompt", "p", "-k", "1000"], "exceeds the 16 rows"),
        (
            ["query", "--cache", "{cache}", "--prompt", "p", "--plot", "{root}/no/such/dir/x.png"],
            "does not exist",
        ),
        (["query", "--cache", "{cache}", "--prompts-file", "{root}/none.txt"], "prompts file"),
        (["query", "--cache", "{cache}", "--prompt", "p", "--refine-steps", "2", "--tokens"], "--refine-steps cannot"),
        (["info", "{root}/missing"], "no gradient cache at"),
        (["push", "{cache}", "not a repo id"], "is not a Hub repo id"),
        (["pull", "a/b/c"], "is not a Hub repo id"),
        (["demo", "--output-dir", "{root}"], "is not an earlier demo's directory"),
    ],
)
def test_usage_errors_exit_2_with_one_clean_message(
    setup: Setup, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (setup.root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (setup.root / "notext.jsonl").write_text('{"body": "no text column"}\n')
    fill = {"cache": str(setup.cache), "model": str(setup.model_dir), "data": str(setup.dataset)}
    fill["root"] = str(setup.root)
    code, out, err = run(capsys, *[a.format(**fill) for a in argv])
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    if not err.startswith("usage:"):  # argparse's own errors come with the usage line
        assert len(err.strip().splitlines()) == 1, err


def test_debug_shows_the_traceback(setup: Setup) -> None:
    with pytest.raises(UsageError, match="no gradient cache"):
        main(["info", str(setup.root / "missing"), "--debug"])


def test_the_installed_entry_point() -> None:
    exe = Path(sys.executable).with_name("hf-grass")
    if not exe.exists():
        pytest.skip("the hf-grass script is not installed in this environment")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("demo", "build", "query", "info", "push", "pull"):
        assert command in done.stdout
    done = subprocess.run([str(exe), "query", "--prompt", "x"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "the following arguments are required: --cache" in done.stderr


# ---- Hub ---------------------------------------------------------------------------------------

TOKEN = "hf_mock_write_token"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MockHub]:
    """The mock Hub of test_hub.py, reached through HF_ENDPOINT (as a user of the CLI would)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    server = MockHub(token=TOKEN).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        yield server
    finally:
        server.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("mock-hub")], "server threads left"
    assert not server.unhandled, f"requests the mock does not implement: {server.unhandled}"


def test_push_then_pull(
    setup: Setup, hub: MockHub, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(capsys, "push", str(setup.cache), "alice/cli-cache", "--token", TOKEN, "--private")
    assert code == 0, err
    assert "Pushed" in out and "manifest.json" in hub.files("alice/cli-cache")
    code, _, err = run(capsys, "pull", "alice/cli-cache", "--local-dir", str(tmp_path / "pulled"))
    assert code == 1 and "Traceback" not in err  # private: the token is needed
    code, out, err = run(
        capsys, "pull", "alice/cli-cache", "--local-dir", str(tmp_path / "pulled"), "--token", TOKEN
    )
    assert code == 0, err
    assert "verified" in out
    assert GradientCache(tmp_path / "pulled").manifest == GradientCache(setup.cache).manifest


# ---- demo --------------------------------------------------------------------------------------


def test_demo_data_ships_with_the_package() -> None:
    corpus = files("hf_grass").joinpath(DEMO_CORPUS).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in corpus.splitlines()]
    facts = json.loads(files("hf_grass").joinpath(DEMO_FACTS).read_text(encoding="utf-8"))["facts"]
    assert len(corpus.encode()) < 200_000 and 200 <= len(rows) <= 500
    assert sum(f.get("show", False) for f in facts) >= 3
    for fact in facts:
        for i in fact["documents"]:  # the fact opens its documents (GPT-2: same positions as the prompt)
            assert rows[i]["text"].startswith(f"{fact['prompt']} {fact['answer']}.")
        for i in fact["contradicted_by"]:
            assert rows[i]["text"].startswith(fact["prompt"]) and fact["answer"] not in rows[i]["text"]


def test_demo_runs_end_to_end_in_a_short_mode(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Two epochs instead of forty: the model learns little, but every stage runs and prints."""
    out_dir, plot = tmp_path / "demo", tmp_path / "demo.png"
    code, out, err = run(
        capsys, "demo", "--output-dir", str(out_dir), "--epochs", "2", "-k", "2", "--plot", str(plot)
    )
    assert code == 0, err
    for needle in ("[1/5]", "[5/5]", "planted facts", "Most helpful training documents", "Timings:", "Try:"):
        assert needle in out, needle
    assert (out_dir / "model" / "config.json").is_file() and (out_dir / "model" / "tokenizer.json").is_file()
    cache = GradientCache(out_dir / "cache")
    assert cache.num_rows == 300 and cache.model_info["name_or_path"] == str((out_dir / "model").resolve())
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # the suggested next command works: the cache names its model, whose weights match
    code, out, err = run(
        capsys, "query", "--cache", str(out_dir / "cache"), "--prompt", "The river of Veloria is the",
        "--completion", " Tamber.", "-k", "2",
    )  # fmt: skip
    assert code == 0, err


@pytest.mark.slow
def test_full_demo_finds_the_planted_documents(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The real demo (about a minute): the model recites every fact, each fact's own documents rank
    first, and both contradicting documents rank most harmful."""
    code, out, err = run(capsys, "demo", "--output-dir", str(tmp_path / "demo"))
    assert code == 0, err
    assert "the model completes 30 of the 30 planted facts" in out
    assert out.count("taught the model this answer") == 4
    assert out.count("is harmful #1") == 2
