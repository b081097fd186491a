"""Token-level attribution against per-token autograd.

The brute force: the gradient of an example's loss with respect to each module's weight *as used at
one position t* (a zero float64 perturbation ``E_t`` added to the module's output at that position
only, ``y_t += E_t x_t``; its gradient is ``delta_t x_t^T``), from plain autograd in float64 on tiny
models built from ``LlamaConfig`` / ``GPT2Config``. Each position's explicit gradient then goes
through the cache's maps as explicit dense matrices (masks or fitted maps, rotation, whitening, the
final projection; the query's preconditioner): per-token rows on both sides, whose inner products
are the per-token scores. The library never builds a per-token row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tolerances import TOKEN_EXACT_RTOL, TOKEN_SUM_RTOL

import hf_grass.attribution.runner as runner_module
from hf_grass.attribution import AttributionPass, Batching
from hf_grass.cache import GradientCache
from hf_grass.capture import GradientComputer
from hf_grass.capture.loss import per_example_loss
from hf_grass.config import GraSSConfig
from hf_grass.data import IGNORE_INDEX, ExampleSource, collate
from hf_grass.precondition.warmup import WarmupCovariances
from hf_grass.scoring import cache_eigenbasis, fitted_preconditioner
from hf_grass.scoring.queries import preconditioned_factor
from hf_grass.scoring.tokens import TokenAttribution, document_tokens, project_transpose, query_tokens
from hf_grass.testing import NO_DROPOUT, random_token_examples, tiny_gpt2, tiny_llama

VOCAB = 40
PROMPT = 3  # the query's first tokens are its prompt (label -100)
DOCS = [0, 4, 7]


class NarrowWarmup(WarmupCovariances):
    """Sides wider than 36 (the tiny Llama's 40-word lm_head output, its 48-wide MLP) are hashed, as a
    real model's vocabulary is (``FULL_COVARIANCE_MAX_WIDTH``)."""

    def __init__(self, widths: dict, device: torch.device | str = "cpu", **kwargs: Any) -> None:
        super().__init__(widths, device, max_width=36, **kwargs)


def per_token_gradients(model, targets, ids: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    """Per module ``[T, d_out, d_in]``: the loss's gradient w.r.t. the weight as used at each position
    (bias as the last column), by plain autograd through zero perturbations."""
    T = len(ids)
    perturbations, handles = {}, []
    for t in targets:
        e = torch.zeros(T, t.d_out, t.d_in, dtype=torch.float64, requires_grad=True)
        perturbations[t.name] = e

        def hook(module, inputs, output, e=e, bias=t.bias):
            x = inputs[0]
            if bias:
                x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)
            return output + torch.einsum("bti,toi->bto", x, e)

        handles.append(t.module.register_forward_hook(hook))
    try:
        logits = model(input_ids=torch.tensor([ids])).logits
        loss = per_example_loss(logits, torch.tensor([labels]), "sum").sum()
        grads = torch.autograd.grad(loss, list(perturbations.values()))
    finally:
        for h in handles:
            h.remove()
    return dict(zip(perturbations, grads))


def train_token_rows(computer: GradientComputer, basis, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[T, dim]``: each position's train row through explicit dense maps (S (W * R G'))."""
    T = next(iter(grads.values())).shape[0]
    rows = torch.zeros(T, computer.row_dim, dtype=torch.float64)
    for name, (start, stop) in computer.offsets.items():
        comp = computer.compressors[name]
        gp = comp.factor_gradient_from_full(grads[name])  # the train side's (dense) masks or maps
        if basis is not None:
            gp = basis.modules[name].rotate(gp) * basis.modules[name].whiten
        rows[:, start:stop] += gp.reshape(T, -1) @ comp.project_factor_matrix().T
    return rows


def query_token_rows(computer, pre, basis, grads: dict[str, torch.Tensor], hashed: set[str]) -> torch.Tensor:
    """``[T, dim]``: each position's query vector (preconditioned, whitened, projected densely)."""
    T = next(iter(grads.values())).shape[0]
    rows = torch.zeros(T, computer.row_dim, dtype=torch.float64)
    for name, (start, stop) in computer.offsets.items():
        comp = computer.compressors[name]
        curvature = name in hashed
        g = comp.curvature_gradient_from_full(grads[name]) if curvature else comp.factor_gradient_from_full(grads[name])
        if basis is not None or pre.acts_on == "factors":
            g = preconditioned_factor(computer, name, g, pre, basis, curvature)
        rows[:, start:stop] += g.reshape(T, -1) @ comp.project_factor_matrix().T
    if basis is None and pre.acts_on == "rows":
        rows = pre.precondition_rows(rows, computer.offsets)
    return rows


def built_cache(tmp_path: Path, model, config: GraSSConfig):
    """``(train, basis, preconditioner, computer)`` of a cache of 12 random documents, the computer
    rebuilt from the cache's configuration with the basis's maps attached."""
    train = random_token_examples(12, VOCAB, seed=1)
    path = AttributionPass(GradientComputer(model, config), ExampleSource(train), tmp_path / "cache",
                           Batching(3, disable_progress=True)).run()  # fmt: skip
    cache = GradientCache(path)
    basis = cache_eigenbasis(cache)
    pre = fitted_preconditioner(cache, basis=basis)
    computer = GradientComputer(model, cache.config)
    if basis is not None:
        basis.attach(computer.compressors)
    return train, basis, pre, computer


def setup(tmp_path: Path, model, config: GraSSConfig, side: str = "right"):
    """A cache of 12 random documents, the query, and the token attribution of three documents."""
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train, basis, pre, computer = built_cache(tmp_path, model, config)
    ids = random_token_examples(1, VOCAB, lo=7, hi=8, seed=5)[0]["input_ids"]
    labels = [IGNORE_INDEX] * PROMPT + ids[PROMPT:]
    query = query_tokens(computer, collate([{"input_ids": ids, "labels": labels}]), pre, basis)
    docs = ExampleSource([train[i] for i in DOCS])
    found = document_tokens(computer, query, docs, pre, basis, batching=Batching(2, padding_side=side))
    return model, computer, pre, basis, train, (ids, labels), query, found


def check_against_brute_force(tmp_path: Path, model, config: GraSSConfig, rtol: float, side: str = "right") -> dict:
    model, computer, pre, basis, train, (ids, labels), query, found = setup(tmp_path, model, config, side)
    q_tokens = query_token_rows(computer, pre, basis, per_token_gradients(model, computer.targets, ids, labels),
                                query.curvature)  # fmt: skip
    q = q_tokens.sum(0)
    # the brute force's query vector is the library's (its float64 form, and the lookup's float32 one)
    torch.testing.assert_close(q, query.exact, rtol=1e-9, atol=1e-9 * q.abs().max().item())
    torch.testing.assert_close(q.float(), query.vectors.rows[0], rtol=1e-5, atol=1e-5 * q.abs().max().item())
    errors = {"document_sum": 0.0, "query_sum": 0.0}
    for j, i in enumerate(DOCS):
        doc = train[i]["input_ids"]
        d_tokens = train_token_rows(computer, basis, per_token_gradients(model, computer.targets, doc, doc))
        row = d_tokens.sum(0)
        score = float(q @ row)
        assert found.ids[j] == doc
        assert found.scores[j] == pytest.approx(score, rel=rtol)
        scale = float((d_tokens @ q).abs().max())
        torch.testing.assert_close(found.documents[j], d_tokens @ q, rtol=rtol, atol=rtol * scale)
        scale = float((q_tokens @ row).abs().max())
        torch.testing.assert_close(found.query[j], q_tokens @ row, rtol=rtol, atol=rtol * scale)
        errors["document_sum"] = max(errors["document_sum"], _relative_sum_error(found, j, "documents"))
        errors["query_sum"] = max(errors["query_sum"], _relative_sum_error(found, j, "query"))
    return errors


def _relative_sum_error(found: TokenAttribution, j: int, side: str) -> float:
    contributions = getattr(found, side)[j]
    score = found.scores[j]
    assert contributions is not None and score is not None
    return abs(float(contributions.sum()) - score) / abs(score)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_uncompressed_token_scores_are_exact(tmp_path: Path, arch: str) -> None:
    """Factor spaces as wide as the modules, stored as they are (the embedded global layout), and
    no preconditioner: the score is the exact gradient inner product ``<g_q, g_i>``, and each
    position's share is ``sum_l <G_q,l, delta_t x_t^T>`` from autograd alone, no library map."""
    model = tiny_llama(VOCAB) if arch == "llama" else tiny_gpt2(VOCAB, **NO_DROPOUT)
    config = GraSSConfig(total_dim=40000, factor_dim=256, mask_basis="input", preconditioner="identity",
                         dtype="float32", shard_size=4)  # fmt: skip
    model, computer, _, _, train, (ids, labels), query, found = setup(tmp_path, model, config)
    assert computer.embedded
    q_grads = per_token_gradients(model, computer.targets, ids, labels)
    for j, i in enumerate(DOCS):
        doc = train[i]["input_ids"]
        d_grads = per_token_gradients(model, computer.targets, doc, doc)
        doc_side = sum(torch.einsum("toi,oi->t", d_grads[n], q_grads[n].sum(0)) for n in d_grads)
        query_side = sum(torch.einsum("toi,oi->t", q_grads[n], d_grads[n].sum(0)) for n in d_grads)
        score = float(doc_side.sum())
        torch.testing.assert_close(found.documents[j], doc_side, rtol=TOKEN_EXACT_RTOL, atol=TOKEN_EXACT_RTOL * abs(score))
        torch.testing.assert_close(found.query[j], query_side, rtol=TOKEN_EXACT_RTOL, atol=TOKEN_EXACT_RTOL * abs(score))
        assert found.scores[j] == pytest.approx(score, rel=TOKEN_EXACT_RTOL)
        # uncompressed, the contributions sum to the score to float64 rounding on both sides
        assert _relative_sum_error(found, j, "documents") < TOKEN_EXACT_RTOL
        assert _relative_sum_error(found, j, "query") < TOKEN_EXACT_RTOL
        # the query's last token predicts nothing: it carries no gradient, so no share
        assert float(found.query[j][-1]) == 0.0


CASES = {
    # masks in the module's own coordinates: the factor space rotated into the warm-up eigenbasis
    "input masks, rotation, ekfac": dict(compressor="factgrass", proj_dim=16, preconditioner="ekfac"),
    # masks in the eigenbasis, wide sides hashed (NarrowWarmup), every module in one global row
    "eigen masks, hashed, global": dict(mask_basis="eigen", total_dim=64, factor_dim=8, preconditioner="kfac"),
    "eigen masks, hashed, per module, int8": dict(mask_basis="eigen", proj_dim=16, preconditioner="ekfac", dtype="int8"),
    "identity (rows)": dict(compressor="factgrass", proj_dim=16, preconditioner="identity"),
    "fim (rows)": dict(compressor="factgrass", proj_dim=16, preconditioner="fim"),
    "logra, kfac": dict(compressor="logra", proj_dim=16, preconditioner="kfac"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_token_scores_equal_per_token_autograd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.setattr(runner_module, "WarmupCovariances", NarrowWarmup)
    config = GraSSConfig(**{"dtype": "float32", "shard_size": 4, **CASES[case]})
    errors = check_against_brute_force(tmp_path, tiny_llama(VOCAB), config, rtol=1e-6)
    # float64 model, compressed: a K-FAC cache's rows are whitened in float32 (the pass's rows,
    # bit for bit); the query side sums to the score to float64 rounding
    assert errors["document_sum"] < TOKEN_SUM_RTOL and errors["query_sum"] < TOKEN_EXACT_RTOL


def test_hashed_sides_are_in_curvature_coordinates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "WarmupCovariances", NarrowWarmup)
    config = GraSSConfig(mask_basis="eigen", total_dim=64, factor_dim=8, dtype="float32", shard_size=4)
    _, computer, _, basis, *_, query, _ = setup(tmp_path, tiny_llama(VOCAB), config)
    assert basis is not None and basis.has_hashed_sides
    hashed = {n for n, c in computer.compressors.items() if c.hashed}
    assert "lm_head" in hashed and query.curvature == hashed
    assert query.factors["lm_head"][1].shape[-1] == VOCAB  # the output side in its own coordinates


def test_gpt2_conv1d_bias_left_padding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "WarmupCovariances", NarrowWarmup)
    config = GraSSConfig(mask_basis="eigen", total_dim=64, factor_dim=8, dtype="float32", shard_size=4)
    errors = check_against_brute_force(tmp_path, tiny_gpt2(VOCAB, **NO_DROPOUT), config, rtol=1e-6, side="left")
    assert errors["document_sum"] < TOKEN_SUM_RTOL and errors["query_sum"] < TOKEN_EXACT_RTOL


def test_float32_model_sums_to_float_tolerance(tmp_path: Path) -> None:
    """The default configuration (eigen masks, global layout, EK-FAC) on a float32 model: the factors
    come in float32, the contractions run in float64, so the shares sum to the score the re-run
    row gives to float32 rounding."""
    model = tiny_llama(VOCAB).eval()
    config = GraSSConfig(total_dim=64, factor_dim=8, dtype="int8", shard_size=4)
    train, basis, pre, computer = built_cache(tmp_path, model, config)
    assert basis is not None
    ids = random_token_examples(1, VOCAB, lo=7, hi=8, seed=5)[0]["input_ids"]
    batch = collate([{"input_ids": ids, "labels": [IGNORE_INDEX] * PROMPT + ids[PROMPT:]}])
    query = query_tokens(computer, batch, pre, basis)
    found = document_tokens(computer, query, ExampleSource([train[i] for i in DOCS]), pre, basis)
    for j in range(len(DOCS)):
        assert _relative_sum_error(found, j, "documents") < TOKEN_SUM_RTOL
        assert _relative_sum_error(found, j, "query") < TOKEN_SUM_RTOL


@pytest.mark.parametrize("compressor", ["factgrass", "logra"])
def test_project_transpose_is_the_adjoint(compressor: str) -> None:
    from hf_grass.compressors import make_compressor

    comp = make_compressor(GraSSConfig(compressor=compressor, proj_dim=16), "m", d_in=12, d_out=9)
    y = torch.randn(3, comp.output_dim, dtype=torch.float64)
    want = y @ comp.project_factor_matrix()
    torch.testing.assert_close(project_transpose(comp, y), want, rtol=1e-12, atol=1e-12)


def test_token_factors_sum_to_the_factor_gradients() -> None:
    """The capture's per-token factors (``CaptureRequest.token_factors``) are what ``factor_grads``
    sums over tokens, for a module called once per forward."""
    from hf_grass.capture import CaptureRequest

    model = tiny_llama(VOCAB).double()
    computer = GradientComputer(model, GraSSConfig(compressor="factgrass", proj_dim=16))
    batch = collate(random_token_examples(3, VOCAB, seed=2), padding_side="left")
    with computer.session():
        grads = computer.compute(batch, CaptureRequest(rows=False, factor_grads=True, token_factors=True))
    for name, (xs, ds) in grads.token_factors.items():
        torch.testing.assert_close(torch.einsum("bto,bti->boi", ds, xs), grads.factor_grads[name])
