"""Token scores through the front doors: ``Attributor.find_influential(tokens=True)``,
``hf_grass.find_influential``, ``AttributionTrainer``, the checkpoint lookups, and how they are shown
(terminal highlighting, the HTML report). The math itself is checked against per-token autograd in
tests/test_tokens.py."""

from __future__ import annotations

import json
import logging
from html.parser import HTMLParser
from pathlib import Path

import pytest
from tolerances import TOKEN_SUM_RTOL

from hf_grass import GraSSConfig, find_influential
from hf_grass.attribution import run_attribution_pass
from hf_grass.cli.highlight import format_token_result, html_report, write_html
from hf_grass.lookups import MultiCheckpointAttributor
from hf_grass.query import Attributor
from hf_grass.results import InfluenceResult, InfluentialDocument, TokenScores
from hf_grass.testing import planted_facts_corpus, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama (its tokenizer adds [BOS]) and the default cache of a planted-facts corpus."""
    docs, facts = planted_facts_corpus(n_facts=6, n_filler=18, seed=0)
    tok = word_tokenizer(docs, bos=True)
    model = tiny_llama(len(tok)).eval()
    tmp = tmp_path_factory.mktemp("tokens")
    cache = run_attribution_pass(model, docs, GraSSConfig(cache_dir=str(tmp / "cache"), total_dim=256, factor_dim=8),
                                 tok, disable_progress=True, learning_rate=0.5)  # fmt: skip
    return model, tok, cache, docs, facts


def check_token_scores(result: InfluenceResult, tok, rel: float = TOKEN_SUM_RTOL) -> None:
    docs = result.documents + result.harmful
    assert docs
    largest = max(abs(d.score) for d in docs)
    for doc in docs:
        ts, qs = doc.token_scores, doc.query_token_scores
        assert ts is not None and qs is not None
        assert len(ts.tokens) == len(ts.ids) == len(ts.scores) and len(qs.tokens) == len(qs.scores)
        assert sum(ts.scores) == pytest.approx(ts.score, rel=rel)
        assert sum(qs.scores) == pytest.approx(ts.score, rel=rel) and qs.score == ts.score
        # the cached score is the re-run's up to the int8 rows' rounding
        assert abs(ts.score - doc.score) < 0.05 * largest
        assert "".join(ts.tokens) == tok.decode(ts.ids)  # the pieces are the text, token by token
        assert "".join(qs.tokens[qs.start :]).strip() == result.completion.strip()
        assert qs.scores[-1] == 0.0  # the last token predicts nothing


def test_find_influential_with_tokens(facts) -> None:
    model, tok, cache, docs, planted = facts
    fact = planted[0]
    attributor = Attributor(model, tok, cache)
    result = attributor.find_influential(fact["prompt"], k=3, completion=" " + fact["answer"], tokens=True)
    check_token_scores(result, tok)
    assert result.documents[0].token_scores.tokens[0] == "[BOS]"
    plain = attributor.find_influential(fact["prompt"], k=3, completion=" " + fact["answer"])
    assert [d.index for d in plain.documents] == [d.index for d in result.documents]
    assert [d.score for d in plain.documents] == pytest.approx([d.score for d in result.documents], rel=1e-5)
    assert plain.documents[0].token_scores is None and "token_scores" not in plain.to_dict()["documents"][0]
    row = json.loads(json.dumps(result.to_dict()))["documents"][0]
    assert set(row["token_scores"]) == {"tokens", "ids", "scores", "score", "start"}


def test_tokens_is_a_keyword_not_a_generation_option(facts) -> None:
    """A generated completion with tokens=True: ``tokens`` must not reach model.generate."""
    model, tok, cache, _, planted = facts
    result = Attributor(model, tok, cache).find_influential(planted[1]["prompt"], k=2, tokens=True, max_new_tokens=3)
    check_token_scores(result, tok)
    # the one-call front door, with cosine scores: the shares sum to the normalised score
    result = find_influential(planted[1]["prompt"], model=model, tokenizer=tok, cache=cache, k=2, tokens=True,
                              cosine=True, max_new_tokens=3)  # fmt: skip
    check_token_scores(result, tok)
    assert all(-1.0001 <= d.token_scores.score <= 1.0001 for d in result.documents)


def test_documents_with_labels_are_rerun_from_the_training_dataset(facts, tmp_path: Path, caplog) -> None:
    """A dataset of token ids whose labels leave out the first tokens: its cached text, re-tokenized,
    would put the loss on every token. The re-run must see the pass's examples."""
    model, tok, _, docs, planted = facts
    rows = []
    for text in docs:
        ids = tok(text)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    cache = run_attribution_pass(model, rows, GraSSConfig(cache_dir=str(tmp_path / "c"), total_dim=256, factor_dim=8),
                                 tok, disable_progress=True)  # fmt: skip
    attributor = Attributor(model, tok, cache)
    prompt, completion = planted[0]["prompt"], " " + planted[0]["answer"]
    exact = attributor.find_influential(prompt, k=3, completion=completion, tokens=True, train_dataset=rows)
    check_token_scores(exact, tok)
    with caplog.at_level(logging.WARNING, logger="transformers.hf_grass"):
        attributor.find_influential(prompt, k=3, completion=completion, tokens=True)
    assert "when re-run but" in caplog.text and "train_dataset" in caplog.text
    with pytest.raises(ValueError, match="is not the document the cache holds"):
        attributor.find_influential(prompt, k=3, completion=completion, tokens=True, train_dataset=rows[::-1])


def test_compressors_without_a_factor_space_are_refused(facts, tmp_path: Path) -> None:
    model, tok, _, docs, planted = facts
    config = GraSSConfig(cache_dir=str(tmp_path / "c"), compressor="random", proj_dim=8)
    cache = run_attribution_pass(model, docs[:6], config, tok, disable_progress=True)
    with pytest.raises(ValueError, match="compressor='factgrass'"):
        Attributor(model, tok, cache).find_influential(planted[0]["prompt"], k=1, completion=" x", tokens=True)


def test_checkpoint_lookups_scale_token_scores_by_the_checkpoint_weight(facts) -> None:
    model, tok, cache, _, planted = facts
    prompt, completion = planted[2]["prompt"], " " + planted[2]["answer"]
    weighted = MultiCheckpointAttributor(model, tok, [cache]).find_influential(prompt, 2, completion, tokens=True)
    plain = Attributor(model, tok, cache).find_influential(prompt, 2, completion, tokens=True)
    check_token_scores(weighted, tok)
    for w, p in zip(weighted.documents, plain.documents):  # the cache recorded learning_rate=0.5
        assert w.score == pytest.approx(0.5 * p.score, rel=1e-5)
        assert w.token_scores.scores == pytest.approx([0.5 * s for s in p.token_scores.scores], rel=1e-9)
    with pytest.raises(ValueError, match="summed over 2 checkpoints"):
        MultiCheckpointAttributor(model, tok, [cache, cache]).find_influential(prompt, 2, completion, tokens=True)


def test_trainer_reruns_the_dataset_it_cached(tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_grass import AttributionTrainer

    docs, planted = planted_facts_corpus(n_facts=4, n_filler=8, seed=1)
    tok = word_tokenizer(docs)
    train = Dataset.from_dict({"text": docs}).map(lambda b: tok(b["text"]), batched=True)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = AttributionTrainer(model=tiny_llama(len(tok)), args=args, train_dataset=train, processing_class=tok,
                                 grass_config=GraSSConfig(cache_dir=str(tmp_path / "c"), total_dim=256, factor_dim=8))  # fmt: skip
    trainer.build_gradient_cache()
    assert trainer._cached_dataset() is train  # what the documents are re-run from
    result = trainer.find_influential(planted[0]["prompt"], k=2, completion=" " + planted[0]["answer"], tokens=True)
    check_token_scores(result, tok)


# ---- how they are shown ---------------------------------------------------------------------------


class _Tags(HTMLParser):
    """Open/close balance, classes and text of a page, with external references noted."""

    VOID = {"meta", "br", "img", "link", "hr", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.count: dict[str, int] = {}
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for cls in (dict(attrs).get("class") or "").split():
            self.count[cls] = self.count.get(cls, 0) + 1
        self.count[tag] = self.count.get(tag, 0) + 1
        self.external += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def hand_made_result() -> InfluenceResult:
    """Text that must be escaped, in every place text goes."""
    doc = InfluentialDocument(7, 2.5, "<b>bold</b> & 'q'", id='x"y',
                              token_scores=TokenScores(["<b>", "bold", "</b> &", " 'q'"], [1, 2, 3, 4], [2.0, 1.0, -0.5, 0.0], 2.5),
                              query_token_scores=TokenScores(["<p>", " is", " <i>"], [5, 6, 7], [0.5, 2.0, 0.0], 2.5, start=2))  # fmt: skip
    harmful = InfluentialDocument(3, -1.0, "plain", token_scores=TokenScores(["plain"], [9], [-1.0], -1.0))
    return InfluenceResult("<script>alert(1)</script> is", " <i>", [doc], [harmful])


def test_html_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    result = hand_made_result()
    page = html_report([result])
    parser = _Tags()
    parser.feed(page)
    parser.close()
    assert not parser.stack, f"unclosed {parser.stack}"
    assert "<script" not in page and parser.count.get("script") is None and not parser.external
    assert "url(" not in page and "@import" not in page and parser.count["style"] == 1
    assert parser.count["doc"] == 2 and parser.count["helpful"] == 1 and parser.count["harmful"] == 1
    assert parser.count["tokens"] == 3  # document tokens (two documents) and one query's
    text = "".join(parser.text)
    assert "<script>alert(1)</script> is" in text and "</b> &" in text and "x\"y" in text  # escaped, read back
    assert page.index("Most helpful") < page.index("Most harmful")
    assert "rgba(46,160,67,1.00);color:#fff" in page and "rgba(207,34,46,0.25)" in page  # shade: share of the largest
    out = write_html(tmp_path / "r.html", [result, result])
    assert out.read_text(encoding="utf-8").count('class="result"') == 2


def test_terminal_highlighting_plain_and_coloured() -> None:
    result = hand_made_result()
    plain = format_token_result(result, color=False)
    assert "\x1b" not in plain and "[+<b>]" in plain and "[+bold]" in plain and "[-</b> &]" in plain
    assert "Token scores of the most helpful documents" in plain and "Token scores of the most harmful" in plain
    assert "re-run +2.50" in plain and "strongest: <b> +2.00" in plain
    coloured = format_token_result(result, color=True)
    assert "\x1b[38;2;255;255;255;48;2;46;160;67m<b>\x1b[0m" in coloured  # the strongest token: full green
    long = TokenScores([f" w{i}" for i in range(300)], list(range(300)), [0.0] * 299 + [1.0], 1.0)
    shown = format_token_result(InfluenceResult("p", "c", [InfluentialDocument(0, 1.0, "", token_scores=long)]))
    assert "…" in shown and "[+ w299]" in shown and " w100" not in shown  # a window around the peak
