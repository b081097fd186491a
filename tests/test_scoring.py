"""Scores against explicit dense computations with explicit inverses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_capture import autograd_gradient

from hf_grass.attribution import AttributionPass, Batching
from hf_grass.cache import GradientCache
from hf_grass.capture import GradientComputer
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource, collate
from hf_grass.precondition import Statistics, preconditioner_class
from hf_grass.scoring import (
    Normalisation,
    cache_eigenbasis,
    dense_scores,
    fitted_preconditioner,
    query_vectors,
    topk_scores,
)
from hf_grass.testing import random_token_examples, tiny_gpt2, tiny_llama

VOCAB = 40
RTOL = 1e-4


def build(
    tmp_path: Path, model, config: GraSSConfig, examples: list[dict]
) -> tuple[GradientComputer, GradientCache]:
    computer = GradientComputer(model, config)
    path = AttributionPass(
        computer, ExampleSource(examples), tmp_path / "cache", Batching(3, disable_progress=True)
    ).run()
    return computer, GradientCache(path, verify=True)


def explicit_fim_scores(cache: GradientCache, queries_raw: torch.Tensor, damping: float) -> torch.Tensor:
    rows = cache.load(torch.float64)
    out = torch.zeros(queries_raw.shape[0], rows.shape[0], dtype=torch.float64)
    for name in cache.module_names:
        sl = cache.module_slice(name)
        g = rows[:, sl]
        fisher = g.T @ g / g.shape[0]
        lam = damping * torch.linalg.eigvalsh(fisher).clamp(min=0).mean()
        inverse = torch.linalg.inv(fisher + lam * torch.eye(fisher.shape[0], dtype=torch.float64))
        out += (queries_raw[:, sl].double() @ inverse) @ g.T
    return out


def test_fim_scores_equal_explicit_inverse(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB).double()
    config = GraSSConfig(compressor="grass", proj_dim=8, preconditioner="fim", dtype="float32", shard_size=5)
    train = random_token_examples(14, VOCAB, seed=0)
    computer, cache = build(tmp_path, model, config, train)
    queries = random_token_examples(3, VOCAB, seed=9)
    raw = query_vectors(computer, [collate(queries)], preconditioner_class("identity")()).rows
    for damping in (0.1, 0.5):  # damping changes without refitting
        pre = fitted_preconditioner(cache, damping=damping)
        got = dense_scores(cache, query_vectors(computer, [collate(queries)], pre).rows)
        want = explicit_fim_scores(cache, raw, damping)
        torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=RTOL * want.abs().max().item())
    # the fitted eigendecomposition is saved once and reused
    assert len(list((cache.path / "preconditioner").glob("fim-*.safetensors"))) == 1


def brute_force_factor_grads(
    model, computer: GradientComputer, examples: list[dict]
) -> dict[str, torch.Tensor]:
    """Per-example factor-space gradients from batch-of-one autograd and the explicit masks."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    out: dict[str, list[torch.Tensor]] = {t.name: [] for t in computer.targets}
    for ex in examples:
        for t in computer.targets:
            g = autograd_gradient(model, t, ex)
            out[t.name].append(computer.compressors[t.name].factor_gradient_from_full(g[None])[0])
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("compressor", ["factgrass", "logra"])
def test_kronecker_scores_equal_explicit_inverse(tmp_path: Path, kind: str, compressor: str) -> None:
    model = tiny_llama(VOCAB).double()
    config = GraSSConfig(
        compressor=compressor, proj_dim=16, preconditioner=kind, dtype="float32", shard_size=4, damping=0.1
    )
    train = random_token_examples(11, VOCAB, seed=1)
    computer, cache = build(tmp_path, model, config, train)
    queries = random_token_examples(2, VOCAB, seed=7)
    pre = fitted_preconditioner(cache)
    basis = cache_eigenbasis(cache)
    assert basis is not None
    got = dense_scores(cache, query_vectors(computer, [collate(queries)], pre, basis).rows).double()

    stats = Statistics.from_tensors(cache.statistics())
    n = stats.examples
    query_factor = brute_force_factor_grads(model, computer, queries)
    train_factor = brute_force_factor_grads(model, computer, train)
    rows = cache.load(torch.float64)
    want = torch.zeros_like(got)
    exact = torch.zeros_like(got)
    for name in cache.module_names:
        sjlt = computer.compressors[name].project_factor_matrix()
        # the rotation into the warm-up eigenbasis and the whitening of the train rows
        rot = torch.kron(basis.modules[name].q_out, basis.modules[name].q_in).double()
        whiten = basis.modules[name].whiten.reshape(-1).double()
        g_train = train_factor[name].reshape(len(train), -1)
        torch.testing.assert_close(
            rows[:, cache.module_slice(name)], ((g_train @ rot) * whiten) @ sjlt.T, rtol=1e-5, atol=1e-5
        )
        if kind == "kfac":
            a = stats.modules[name].cov_in / stats.modules[name].tokens
            s = stats.modules[name].cov_out / n
            curvature = torch.kron(s, a)  # vec index o * m_in + i
        else:
            # EK-FAC eigenvalues recomputed by brute force from the per-example factor gradients
            eig = (g_train @ rot).square().mean(0)
            torch.testing.assert_close(stats.modules[name].ekfac.reshape(-1) / n, eig, rtol=1e-6, atol=1e-12)
            curvature = rot @ torch.diag(eig) @ rot.T
        lam = 0.1 * torch.linalg.eigvalsh(curvature).clamp(min=0).mean()
        inverse = torch.linalg.inv(curvature + lam * torch.eye(curvature.shape[0], dtype=torch.float64))
        pre_q = query_factor[name].reshape(len(queries), -1) @ inverse
        want += (((pre_q @ rot) / whiten) @ sjlt.T) @ rows[:, cache.module_slice(name)].T
        exact += pre_q @ g_train.T
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())
    if compressor == "logra":  # no final projection: the whitening cancels exactly
        torch.testing.assert_close(got, exact, rtol=RTOL, atol=RTOL * exact.abs().max().item())


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("mask_basis", ["input", "eigen"])
def test_factgrass_scores_equal_the_exact_factor_space_score(tmp_path: Path, kind: str, mask_basis: str) -> None:
    """The global layout whose factor spaces fit the row stores them as they are, so the score is
    exactly the factor-space influence: checked against batch-of-one autograd gradients and explicit
    inverses, with no re-implementation of the library's whitening (which must cancel)."""
    model = tiny_llama(VOCAB).double()
    config = GraSSConfig(
        total_dim=4096, factor_dim=16, mask_basis=mask_basis, preconditioner=kind, dtype="float32",
        shard_size=4, damping=0.1,
    )  # fmt: skip
    train = random_token_examples(11, VOCAB, seed=1)
    computer, cache = build(tmp_path, model, config, train)
    assert computer.embedded and cache.manifest["layout"] == "module"  # stored without projection
    queries = random_token_examples(2, VOCAB, seed=7)
    pre = fitted_preconditioner(cache)
    basis = cache_eigenbasis(cache)
    assert basis is not None
    got = dense_scores(cache, query_vectors(computer, [collate(queries)], pre, basis).rows).double()
    stats = Statistics.from_tensors(cache.statistics())
    n = stats.examples
    query_factor = brute_force_factor_grads(model, computer, queries)  # through the fitted masks
    train_factor = brute_force_factor_grads(model, computer, train)
    exact = torch.zeros_like(got)
    # exact norms (issue 10 item 7): ||g'|| and sqrt(g'^T H^-1 g'), summed over modules
    grad_sq = torch.zeros(len(train), dtype=torch.float64)
    train_pre_sq = torch.zeros(len(train), dtype=torch.float64)
    query_grad_sq = torch.zeros(len(queries), dtype=torch.float64)
    query_pre_sq = torch.zeros(len(queries), dtype=torch.float64)
    for name in cache.module_names:
        g_train = train_factor[name].reshape(len(train), -1)
        g_query = query_factor[name].reshape(len(queries), -1)
        if mask_basis == "input":  # the factor space is masked coordinates: K-FAC / EK-FAC in it
            rot = torch.kron(basis.modules[name].q_out, basis.modules[name].q_in).double()
            a = stats.modules[name].cov_in / stats.modules[name].tokens
            kfac = torch.kron(stats.modules[name].cov_out / n, a)
            ekfac = rot @ torch.diag((g_train @ rot).square().mean(0)) @ rot.T
        else:  # masks in the eigenbasis: the coordinates are eigen-directions, scaled by sqrt(d/m)
            scale = basis.modules[name].scale
            kfac = torch.diag(torch.outer(basis.modules[name].eig_out, basis.modules[name].eig_in).reshape(-1))
            # EK-FAC's eigenvalues of the unscaled coordinates, by brute force
            ekfac = torch.diag((g_train / scale).square().mean(0).double())
        inverse = damped_inverse(kfac if kind == "kfac" else ekfac, 0.1)
        exact += (g_query @ inverse) @ g_train.T
        grad_sq += g_train.square().sum(1)
        query_grad_sq += g_query.square().sum(1)
        # both sides' preconditioned norms are in ONE geometry, the build-time K-FAC whitening at the
        # build damping (issue 17 item 7), whatever the query's preconditioner
        whitening = damped_inverse(kfac, 0.1)
        query_pre_sq += ((g_query @ whitening) * g_query).sum(1)
        train_pre_sq += ((g_train @ whitening) * g_train).sum(1)
    torch.testing.assert_close(got, exact, rtol=RTOL, atol=RTOL * exact.abs().max().item())
    # the norms stored with the rows: the gradient norm always; the preconditioned one is that of the
    # build-time K-FAC whitening, so exact against the K-FAC inverse at the build damping (0.1 here)
    stored = torch.cat([shard.norms for shard in cache.rows.iter_stored()]).double()
    torch.testing.assert_close(stored[:, 0], grad_sq.sqrt(), rtol=RTOL, atol=0)
    torch.testing.assert_close(stored[:, 1], train_pre_sq.sqrt(), rtol=RTOL, atol=0)
    # the queries' norms, in the same two geometries
    _, query_norms = query_vectors(computer, [collate(queries)], pre, basis)
    torch.testing.assert_close(query_norms[:, 0].double(), query_grad_sq.sqrt(), rtol=RTOL, atol=0)
    torch.testing.assert_close(query_norms[:, 1].double(), query_pre_sq.sqrt(), rtol=RTOL, atol=0)


def damped_inverse(curvature: torch.Tensor, damping: float) -> torch.Tensor:
    """``(C + damping * mean eigenvalue * I)^-1`` by an explicit inverse."""
    lam = damping * torch.linalg.eigvalsh(curvature).clamp(min=0).mean()
    return torch.linalg.inv(curvature + lam * torch.eye(curvature.shape[0], dtype=torch.float64))


def test_streaming_topk_equals_argsort_and_cosine(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB)
    config = GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=6, dtype="float16")
    train = random_token_examples(23, VOCAB, seed=2)
    computer, cache = build(tmp_path, model, config, train)
    pre = fitted_preconditioner(cache)
    batch = collate(random_token_examples(4, VOCAB, seed=3))
    queries = query_vectors(computer, [batch], pre, cache_eigenbasis(cache)).rows
    dense = dense_scores(cache, queries)
    for largest in (True, False):
        top = topk_scores(cache, queries, k=7, largest=largest)
        order = dense.argsort(dim=1, descending=largest)[:, :7]
        torch.testing.assert_close(top.indices, order)
        torch.testing.assert_close(top.scores, dense.gather(1, order))
    cos = dense_scores(cache, queries, norms=Normalisation("vectors"))
    rows = cache.load()
    want = (queries / queries.norm(dim=1, keepdim=True)) @ (rows / rows.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cos, want, rtol=1e-4, atol=1e-5)
    assert cos.abs().max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="larger than the number of cached rows"):
        topk_scores(cache, queries, k=24)
    with pytest.raises(ValueError, match="positive int"):
        topk_scores(cache, queries, k=0)


def test_preconditioner_mismatch_is_explained(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB)
    _, cache = build(
        tmp_path, model, GraSSConfig(compressor="factgrass", proj_dim=16), random_token_examples(5, VOCAB)
    )
    with pytest.raises(ValueError, match="Rebuild the cache with"):
        fitted_preconditioner(cache, "fim")
    assert fitted_preconditioner(cache, "kfac").name == "kfac"  # ekfac caches hold the K-FAC factors too
    assert fitted_preconditioner(cache, "identity").name == "identity"


def test_harmful_lists_hold_negative_scores_only(tmp_path: Path) -> None:
    """"Harmful" means score < 0 (DESIGN.md §2): the bottom of the ranking is not harmful when its
    scores are positive, so it is left out, and the table says so in one line (issue 10 item 6)."""
    from hf_grass.query import make_result
    from hf_grass.results import format_result
    from hf_grass.scoring import TopK

    _, cache = build(tmp_path, tiny_gpt2(VOCAB), GraSSConfig(proj_dim=16), random_token_examples(6, VOCAB))
    best = TopK(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[0, 1, 2]]))
    mixed = TopK(torch.tensor([[-2.0, -0.5, 0.25]]), torch.tensor([[5, 4, 3]]))
    result = make_result(cache, "p", " c", best, mixed)
    assert [(d.index, d.score) for d in result.harmful] == [(5, -2.0), (4, -0.5)]
    positive = TopK(torch.tensor([[0.5, 0.75, 1.0]]), torch.tensor([[5, 4, 3]]))
    result = make_result(cache, "p", " c", best, positive)
    assert result.harmful == [] and [d.index for d in result.documents] == [0, 1, 2]
    assert "Most harmful training documents: none (no document scores below 0" in format_result(result)
