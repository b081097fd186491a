"""The refined iHVP (``scoring.refine``) against explicit matrices.

The oracle builds everything dense, in float64, from plain autograd: each training example's Jacobian
of its logits in the target weights, the softmax cross-entropy's Hessian in the logits (Gauss-Newton)
or its gradient (empirical Fisher), the map ``C`` into the preconditioner's curvature coordinates
(checked against the query's captured gradient), EK-FAC's damped inverse as a diagonal matrix, and
conjugate gradients written out on those matrices. The path is the one a real LLM takes: the global
layout (every module projected into one row), masks in the eigenbasis, and, on the Llama, hashed
wide sides (MLP and vocabulary) with its output layer named as a target.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hf_grass.attribution import run_attribution_pass
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.precondition import warmup
from hf_grass.query import Attributor
from hf_grass.scoring.options import ScoringOptions
from hf_grass.scoring.queries import query_vectors
from hf_grass.scoring.refine import CurvatureMaps, Refiner
from hf_grass.testing import (
    planted_facts_corpus,
    random_token_examples,
    tiny_gpt2,
    tiny_llama,
    word_tokenizer,
)

VOCAB = 40


def build(tmp_path: Path, net: nn.Module, train: list[dict], **config: object) -> Attributor:
    settings = {"total_dim": 48, "factor_dim": 4, "dtype": "float32", "damping": 0.1}
    settings.update(config)
    cfg = GraSSConfig(**settings)  # type: ignore[arg-type]
    cache = run_attribution_pass(
        net, train, cfg, cache_dir=tmp_path / "cache", batch_size=3, disable_progress=True
    )
    return Attributor(net, None, cache, search="exact", batch_size=2)


def flat_params(attributor: Attributor) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The modules in order and each one's slice of the flat parameter vector (``[d_out, d_in]``
    with the bias column last, flattened)."""
    names, spans, start = [], {}, 0
    for t in attributor.computer.targets:
        names.append(t.name)
        spans[t.name] = (start, start + t.d_out * t.d_in)
        start += t.d_out * t.d_in
    return names, spans


def logits_of(attributor: Attributor, theta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits ``[T, V]`` for one example with the target weights set from ``theta``."""
    params = {}
    names = {id(p): n for n, p in attributor.computer.model.named_parameters()}
    _, spans = flat_params(attributor)
    for t in attributor.computer.targets:
        start, stop = spans[t.name]
        g = theta[start:stop].reshape(t.d_out, t.d_in)
        weight = g[:, :-1] if t.bias else g
        params[names[id(t.weight_parameter)]] = weight.T if t.transposed else weight
        if t.bias:
            params[names[id(t.bias_parameter)]] = g[:, -1]
    out = torch.func.functional_call(attributor.computer.model, params, (ids[None],))
    return out.logits[0]


def theta0(attributor: Attributor) -> torch.Tensor:
    parts = []
    for t in attributor.computer.targets:
        w = t.weight_parameter.detach()
        g = w.T if t.transposed else w
        if t.bias:
            g = torch.cat([g, t.bias_parameter.detach()[:, None]], dim=1)
        parts.append(g.flatten())
    return torch.cat(parts).double()


def explicit_curvature(attributor: Attributor, examples: list[dict], kind: str) -> torch.Tensor:
    """``[P, P]``: the mean over examples of ``J^T H J`` (Gauss-Newton) or ``g g^T`` (empirical)."""
    theta = theta0(attributor)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for ex in examples:
        ids = torch.tensor(ex["input_ids"])
        jac = torch.autograd.functional.jacobian(
            lambda th, ids=ids: logits_of(attributor, th, ids)[:-1], theta
        )  # [T-1, V, P]
        p = torch.softmax(logits_of(attributor, theta, ids)[:-1].detach(), dim=-1)
        if kind == "gauss-newton":
            for t in range(p.shape[0]):
                h = torch.diag(p[t]) - torch.outer(p[t], p[t])
                total += jac[t].T @ h @ jac[t]
        else:
            dz = p - torch.nn.functional.one_hot(ids[1:], p.shape[-1]).double()
            g = torch.einsum("tv,tvp->p", dz, jac)
            total += torch.outer(g, g)
    return total / len(examples)


def curvature_map(attributor: Attributor, maps: CurvatureMaps, scaled: bool = False) -> torch.Tensor:
    """``C [D_c, P]`` block-diagonal over modules: ``vec(M_out^T G M_in) / scale`` (``scaled``: without
    the division, the coordinates the factor gradients are captured in)."""
    blocks = []
    for t in attributor.computer.targets:
        m_in, m_out = maps.maps[t.name]
        m_in = m_in if m_in is not None else torch.eye(t.d_in, dtype=torch.float64)
        m_out = m_out if m_out is not None else torch.eye(t.d_out, dtype=torch.float64)
        blocks.append(torch.kron(m_out.T, m_in.T) / (1.0 if scaled else maps.scale[t.name]))
    return torch.block_diag(*blocks)


def dense_pcg(a: torch.Tensor, minv: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Preconditioned conjugate gradients from 0, written out on dense matrices (one right side);
    0 steps: the preconditioner's answer alone."""
    if steps == 0:
        return minv @ b
    x, r = torch.zeros_like(b), b.clone()
    z = minv @ r
    p, rz = z.clone(), r @ z
    for _ in range(steps):
        ap = a @ p
        alpha = rz / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        z = minv @ r
        rz, old = r @ z, rz
        p = z + (rz / old) * p
    return x


def flat(blocks: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([blocks[n].flatten(1) for n in names], dim=1)


MODELS = {
    # hashed MLP and vocabulary sides (FULL_COVARIANCE_MAX_WIDTH lowered), no bias, output layer targeted
    "llama": lambda: tiny_llama(VOCAB, hidden=16, layers=1).double(),
    # HF Conv1D (transposed weights) with biases
    "gpt2": lambda: tiny_gpt2(VOCAB, n_layer=1, n_embd=8).double(),
}


@pytest.mark.parametrize("curvature", ["gauss-newton", "empirical"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_refined_ihvp_equals_dense_conjugate_gradients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, curvature: str
) -> None:
    monkeypatch.setattr(warmup, "FULL_COVARIANCE_MAX_WIDTH", 32)
    net = MODELS[arch]().eval()  # the oracle runs the model as the library does: no dropout
    train, queries = random_token_examples(7, VOCAB, seed=1), random_token_examples(2, VOCAB, seed=7)
    extra = (
        {"target_modules": ["q_proj", "o_proj", "up_proj", "down_proj", "lm_head"]} if arch == "llama" else {}
    )
    attributor = build(tmp_path, net, train, mask_basis="eigen", **extra)
    computer, pre, basis = attributor.computer, attributor.preconditioner, attributor.basis
    assert computer.layout == "global" and basis is not None
    if arch == "llama":
        assert any(c.hashed for c in computer.compressors.values())  # type: ignore[attr-defined]

    # the queries' curvature-coordinate gradients, as the library captures them
    sample = [collate(train[:4]), collate(train[4:])]
    refiner = Refiner(computer, pre, basis, sample, steps=4, curvature=curvature)
    captured = {}
    refiner_solve = refiner.solve

    def solve(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        captured.update(b)
        return refiner_solve(b)

    monkeypatch.setattr(refiner, "solve", solve)
    refined = query_vectors(computer, [collate(queries)], pre, basis, refiner)
    names, _ = flat_params(attributor)
    b = flat(captured, names)

    # C checked against the capture: C g_q (scaled) equals the captured curvature gradient of each query
    products = refiner.products(names)
    c, captured_map = (
        curvature_map(attributor, products.maps),
        curvature_map(attributor, products.maps, scaled=True),
    )
    theta = theta0(attributor)
    for j, ex in enumerate(queries):
        ids = torch.tensor(ex["input_ids"])
        g_q = torch.autograd.functional.jacobian(
            lambda th, ids=ids: torch.nn.functional.cross_entropy(
                logits_of(attributor, th, ids)[:-1], ids[1:], reduction="sum"
            ),
            theta,
        )
        torch.testing.assert_close(captured_map @ g_q, b[j], rtol=1e-6, atol=1e-9 * b[j].abs().max().item())

    # the curvature products equal C H C^T x
    h = explicit_curvature(attributor, train, curvature)
    chc = c @ h @ c.T
    x = {n: torch.randn_like(v) for n, v in captured.items()}
    want = flat(x, names) @ chc.T
    torch.testing.assert_close(flat(products(x), names), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())

    # the solve equals conjugate gradients on the dense matrices, preconditioned by EK-FAC's inverse
    damping = torch.cat(
        [torch.full((captured[n][0].numel(),), refiner.damping(n), dtype=torch.float64) for n in names]
    )
    a = chc + torch.diag(damping)
    inv = torch.cat([pre.inverse(pre.factors[n]["eig"]).flatten() for n in names])
    for steps in (0, 1, 4):
        refiner.steps = steps
        got = flat(refiner_solve(captured), names)
        want = torch.stack([dense_pcg(a, torch.diag(inv), b[j], steps) for j in range(len(queries))])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8 * want.abs().max().item())
    # and the steps go where they should: the residual of the exact system falls below EK-FAC's
    exact = torch.linalg.solve(a, b.T).T
    refiner.steps = 12
    far = (flat(refiner_solve(captured), names) - exact).norm(dim=1)
    refiner.steps = 0
    ekfac = (flat(refiner_solve(captured), names) - exact).norm(dim=1)
    assert (far < 0.5 * ekfac).all(), (far, ekfac)

    # the query rows are the solution taken through the whitening and the final projection
    refiner.steps = 4
    plain = query_vectors(computer, [collate(queries)], pre, basis)
    assert not torch.allclose(refined.rows, plain.rows)
    torch.testing.assert_close(refined.norms, plain.norms)  # the norms are those of the gradient


def test_attributor_refines_from_the_cache_text(tmp_path: Path) -> None:
    """``refine_steps`` through the public API: the sample is re-run from the cache's text, rankings
    come back, ``refine_steps=0`` is EK-FAC alone, and what cannot be refined says so."""
    docs, facts = planted_facts_corpus(n_facts=3, n_filler=9)
    tok = word_tokenizer(docs)
    net = tiny_gpt2(tok.vocab_size, n_layer=1, n_embd=16)
    cfg = GraSSConfig(total_dim=128, factor_dim=8, dtype="float32")
    cache = run_attribution_pass(net, [{"text": d} for d in docs], cfg, tokenizer=tok, cache_dir=tmp_path / "c",
                                 batch_size=4, disable_progress=True)  # fmt: skip
    plain = Attributor(net, tok, cache, search="exact")
    again = Attributor(net, tok, cache, search="exact", refine_steps=0)
    refined = Attributor(net, tok, cache, search="exact", refine_steps=3, refine_examples=5)
    assert refined.refiner is not None and sum(len(b["input_ids"]) for b in refined.refiner.batches) == 5
    questions = [{"text": f["prompt"] + " " + f["answer"]} for f in facts]
    base = plain.attribute(questions)
    torch.testing.assert_close(again.attribute(questions), base)
    scores = refined.attribute(questions)
    assert scores.shape == base.shape and torch.isfinite(scores).all() and not torch.allclose(scores, base)
    result = refined.find_influential(facts[0]["prompt"], completion=" " + facts[0]["answer"], k=3)
    assert all(d.score > 0 for d in result.documents)
    with pytest.raises(ValueError, match="refine_steps=0 for token scores"):
        refined.find_influential(facts[0]["prompt"], completion=" x", k=3, tokens=True)
    raw = run_attribution_pass(net, [{"text": d} for d in docs], cfg.replace(preconditioner="identity"), tokenizer=tok,
                               cache_dir=tmp_path / "raw", batch_size=4, disable_progress=True)  # fmt: skip
    with pytest.raises(ValueError, match="factor-space preconditioner"):
        Attributor(net, tok, raw, refine_steps=2)


@pytest.mark.parametrize(
    "field, value, match",
    [("refine_steps", -1, "refine_steps"), ("refine_steps", 1.5, "refine_steps"),
     ("refine_curvature", "hessian", "refine_curvature"), ("refine_examples", 0, "refine_examples")],
)  # fmt: skip
def test_refine_options_are_checked(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScoringOptions(**{field: value})
