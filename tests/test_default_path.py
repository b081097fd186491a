"""The path a real LLM takes, against brute force (issue 17 item 1).

On a real model ``GraSSConfig()`` projects every module into one shared row (the global layout),
takes factgrass's masks in the warm-up K-FAC eigenbasis, and hashes the sides too wide for a full
covariance (a vocabulary, the MLP of a 7B model). Here a tiny Llama takes that same path: the row is
narrower than its factor spaces, and ``FULL_COVARIANCE_MAX_WIDTH`` is lowered so that its MLP and
vocabulary sides are hashed. The oracle is computed independently: per-token inputs and output
gradients from plain autograd with a batch of one, float64 covariances and ``eigh``, explicit
EK-FAC / K-FAC eigenvalues, the whitening from its formula, and dense matrices of the random maps
(masks, hashes, SJLTs: the random draws are the library's, everything around them is recomputed).

- ``test_projected_scores_equal_the_explicit_formula``: for one draw, the library's scores equal the
  explicit estimator (K-FAC and EK-FAC; float32 rows), with the default masks (the top
  eigen-directions) and with a random draw of them (``mask_basis="eigen"``).
- ``test_projected_scores_are_unbiased``: averaged over seeds (hash signs and buckets, SJLTs), they
  estimate the full-space EK-FAC score (the eigen masks keep every direction of the narrow sides, so
  the curvature is fixed and only the hash and the projection are random).
- ``test_default_config_projects``: ``GraSSConfig()`` itself, int8 rows and all, on a model whose
  factor spaces do not fit the default row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hf_grass.attribution import run_attribution_pass
from hf_grass.compressors.factor_maps import EigenMap, HashMap
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.precondition import warmup
from hf_grass.query import Attributor
from hf_grass.testing import random_token_examples, tiny_llama

VOCAB = 40
WIDE = 32  # FULL_COVARIANCE_MAX_WIDTH in these tests: the MLP (48) and the vocabulary (40) are hashed


@pytest.fixture
def wide_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup, "FULL_COVARIANCE_MAX_WIDTH", WIDE)


def model() -> nn.Module:
    return tiny_llama(VOCAB, hidden=16, layers=1).double()


def module_io(net: nn.Module, names: list[str], example: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module ``(x [T, d_in] with the bias column if any, delta [T, d_out])`` of one example, from
    plain autograd of its summed token loss (no library code)."""
    seen: dict[str, list[torch.Tensor]] = {}
    modules = dict(net.named_modules())
    handles = []

    def hook(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach()[0]
        if module.bias is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        seen[name] = [x]
        output.register_hook(lambda grad: seen[name].append(grad.detach()[0]))

    for name in names:
        handles.append(modules[name].register_forward_hook(lambda m, i, o, name=name: hook(name, m, i, o)))
    ids = torch.tensor([example["input_ids"]])
    logits = net(input_ids=ids).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
    for h in handles:
        h.remove()
    return {name: (x, delta) for name, (x, delta) in seen.items()}


class Reference:
    """The independent computation: covariances, eigenbases, per-example gradients (float64)."""

    def __init__(self, net: nn.Module, names: list[str], train: list[dict], queries: list[dict]):
        for p in net.parameters():
            p.requires_grad_(True)
        self.names = names
        self.train_io = [module_io(net, names, ex) for ex in train]
        self.query_io = [module_io(net, names, ex) for ex in queries]
        self.n, self.tokens = len(train), sum(io[names[0]][0].shape[0] for io in self.train_io)
        self.cov_in = {m: sum(io[m][0].T @ io[m][0] for io in self.train_io) for m in names}
        self.cov_out = {m: sum(io[m][1].T @ io[m][1] for io in self.train_io) for m in names}

    def side(self, name: str, side: str) -> tuple[torch.Tensor | None, torch.Tensor, float]:
        """``(eigenvectors or None for a hashed side, eigenvalues per curvature coordinate, count)``."""
        cov = self.cov_in[name] if side == "in" else self.cov_out[name]
        count = float(self.tokens if side == "in" else self.n)
        if cov.shape[0] > WIDE:
            return None, cov.diagonal() / count, count
        eig, vecs = torch.linalg.eigh(cov)
        return vecs, eig.clamp(min=0) / count, count

    @staticmethod
    def gradient(io: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return io[1].T @ io[0]


def aligned(vectors: torch.Tensor, mine: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """My eigenvectors at the mask's indices, signed like the library's (an eigenvector's sign is
    arbitrary; the estimator does not depend on it), after checking they span the same directions."""
    picked = mine[:, idx]
    overlap = (vectors.double() * picked).sum(0)
    torch.testing.assert_close(overlap.abs(), torch.ones_like(overlap), rtol=0, atol=1e-4)
    return picked * overlap.sign()


def explicit_scores(attributor: Attributor, ref: Reference, kind: str, damping: float) -> torch.Tensor:
    """``[n_query, n_train]``: the library's estimator, recomputed from its definition (``top`` masks:
    my eigenvalues' largest directions, unscaled; ``eigen``: the seed's draw, scaled)."""
    top = attributor.computer.config.mask_basis == "top"
    computer, basis = attributor.computer, attributor.basis
    assert basis is not None
    wd = max(damping, 1e-3)  # the whitening's damping (MIN_WHITENING_DAMPING)
    q_vec = torch.zeros(len(ref.query_io), computer.row_dim, dtype=torch.float64)
    t_vec = torch.zeros(ref.n, computer.row_dim, dtype=torch.float64)
    damped, parts = {}, {}
    for name in ref.names:
        comp = computer.compressors[name]
        maps, row_eigs, curv_eigs, to_rows = [], [], [], []
        for side, fmap, idx in (("in", comp.map_in, comp.in_idx), ("out", comp.map_out, comp.out_idx)):
            vecs, eig, count = ref.side(name, side)
            if vecs is None:  # a hashed side: my whitening weights, the library's buckets and signs
                assert isinstance(fmap, HashMap)
                var = eig
                c = (var + wd * var.mean()).rsqrt()
                c = c / c.mean()
                torch.testing.assert_close(fmap.whiten.double(), c, rtol=1e-5, atol=0)
                train_map = torch.zeros(var.numel(), fmap.m, dtype=torch.float64)
                train_map[torch.arange(var.numel()), fmap.buckets] = fmap.signs.double() * c
                query_map = torch.zeros_like(train_map)
                query_map[torch.arange(var.numel()), fmap.buckets] = fmap.signs.double() / c
                curv = torch.eye(var.numel(), dtype=torch.float64)
                bucket_eig = torch.zeros(fmap.m, dtype=torch.float64).index_add_(0, fmap.buckets, var * c**2)
                maps.append((curv, train_map, query_map, 1.0))
                row_eigs.append(bucket_eig)
                curv_eigs.append(var)
            else:
                assert isinstance(fmap, EigenMap)
                scale = (vecs.shape[0] / idx.numel()) ** 0.5
                if top:
                    idx, scale = eig.argsort(descending=True)[: idx.numel()], 1.0
                picked = aligned(fmap.vectors, vecs, idx)
                maps.append((picked * scale, torch.eye(idx.numel(), dtype=torch.float64), None, scale))
                row_eigs.append(eig[idx])
                curv_eigs.append(eig[idx])
        (curv_in, rows_in, query_in, s_in), (curv_out, rows_out, query_out, s_out) = maps
        to_rows = (rows_in, rows_out, query_in if query_in is not None else rows_in,
                   query_out if query_out is not None else rows_out)  # fmt: skip
        g_train = torch.stack([curv_out.T @ ref.gradient(io[name]) @ curv_in for io in ref.train_io])
        g_query = torch.stack([curv_out.T @ ref.gradient(io[name]) @ curv_in for io in ref.query_io])
        if kind == "ekfac":
            eig = g_train.square().mean(0) / (s_in * s_out) ** 2
        else:
            eig = torch.outer(curv_eigs[1], curv_eigs[0])
        inverse = 1.0 / (eig + damping * eig.mean())
        damped[name] = torch.outer(row_eigs[1], row_eigs[0]) + wd * torch.outer(row_eigs[1], row_eigs[0]).mean()
        parts[name] = (g_train, g_query * inverse, to_rows)
    mean = sum(float(v.sum()) for v in damped.values()) / sum(v.numel() for v in damped.values())
    for name, (g_train, pre_query, (rows_in, rows_out, query_in, query_out)) in parts.items():
        whiten = (damped[name] / mean).rsqrt()
        train_rows = whiten * (rows_out.T @ g_train @ rows_in)
        query_rows = (query_out.T @ pre_query @ query_in) / whiten
        sjlt = computer.compressors[name].project_factor_matrix()
        t_vec += train_rows.flatten(1) @ sjlt.T
        q_vec += query_rows.flatten(1) @ sjlt.T
    return q_vec @ t_vec.T


def build(tmp_path: Path, net: nn.Module, train: list[dict], **config: object) -> Attributor:
    settings = {"total_dim": 96, "factor_dim": 8, "dtype": "float32", "damping": 0.1, "shard_size": 5}
    settings.update(config)
    cfg = GraSSConfig(**settings)  # type: ignore[arg-type]
    cache = run_attribution_pass(net, train, cfg, cache_dir=tmp_path / f"cache-{cfg.cache_hash()}",
                                 batch_size=3, disable_progress=True)  # fmt: skip
    return Attributor(net, None, cache, search="exact", batch_size=2)


@pytest.mark.parametrize("masks", ["top", "eigen"])
@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_projected_scores_equal_the_explicit_formula(tmp_path: Path, wide_sides: None, kind: str, masks: str) -> None:
    net = model()
    train, queries = random_token_examples(9, VOCAB, seed=1), random_token_examples(3, VOCAB, seed=7)
    attributor = build(tmp_path, net, train, preconditioner=kind, mask_basis=masks)
    computer = attributor.computer
    assert computer.layout == "global" and computer.config.mask_basis == masks
    hashed = {name for name, c in computer.compressors.items() if c.hashed}  # type: ignore[attr-defined]
    assert any("lm_head" in n for n in hashed) and any("down_proj" in n for n in hashed)
    got = attributor.scores(attributor.query_vectors([collate(queries)])).double()
    ref = Reference(net, attributor.cache.module_names, train, queries)
    want = explicit_scores(attributor, ref, kind, damping=0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def full_space_ekfac(ref: Reference, damping: float) -> torch.Tensor:
    """The full-space EK-FAC score ``sum_l g_q^T H_l^-1 g_i`` in the K-FAC eigenbasis (a wide side in
    its own coordinates), every direction kept: what the projected estimator estimates."""
    out = torch.zeros(len(ref.query_io), ref.n, dtype=torch.float64)
    for name in ref.names:
        bases = []
        for side in ("in", "out"):
            vecs, eig, _ = ref.side(name, side)
            bases.append(vecs if vecs is not None else torch.eye(eig.numel(), dtype=torch.float64))
        q_in, q_out = bases
        g_train = torch.stack([q_out.T @ ref.gradient(io[name]) @ q_in for io in ref.train_io])
        g_query = torch.stack([q_out.T @ ref.gradient(io[name]) @ q_in for io in ref.query_io])
        eig = g_train.square().mean(0)
        out += (g_query / (eig + damping * eig.mean())).flatten(1) @ g_train.flatten(1).T
    return out


def test_projected_scores_are_unbiased(tmp_path: Path, wide_sides: None) -> None:
    net = model()
    # two training documents as queries: their self-influence makes the scores large against the
    # estimator's noise, so 24 draws can see a bias of a few percent
    train = random_token_examples(9, VOCAB, seed=1)
    queries = train[:2] + random_token_examples(1, VOCAB, seed=7)
    draws = []
    for seed in range(24):  # factor_dim 16 keeps every direction of the 16-wide sides
        attributor = build(tmp_path, net, train, factor_dim=16, total_dim=200, seed=seed)
        draws.append(attributor.scores(attributor.query_vectors([collate(queries)])).double())
    assert attributor.computer.layout == "global"
    ref = Reference(net, attributor.cache.module_names, train, queries)
    samples = torch.stack(draws)
    want = full_space_ekfac(ref, damping=0.1)
    error = (samples.mean(0) - want).abs()
    standard_error = samples.std(0) / len(draws) ** 0.5
    assert (error <= 4 * standard_error + 1e-6 * want.abs().max()).all(), (error / standard_error).max()
    # the test has power: the mean's standard error is small against the scores it checks
    assert standard_error.max() < 0.05 * want.abs().max(), (standard_error.max(), want.abs().max())


def test_default_config_projects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``GraSSConfig()`` (int8 rows of 31,744 numbers, eigen masks of 128 per side, EK-FAC, damping
    0.001) on a model whose factor spaces (7 modules of up to 128 x 128) do not fit one row, so every
    module is projected into it, and whose sides wider than 100 are hashed: the scores equal the
    float32 rows' up to the int8 storage, and those the explicit estimator. Its 8,200-word output
    layer is left out, as an LLM's is (``targets.WIDE_OUTPUT``)."""
    monkeypatch.setattr(warmup, "FULL_COVARIANCE_MAX_WIDTH", 100)
    net = tiny_llama(8200, hidden=128, layers=1).double()
    train = random_token_examples(6, 8200, seed=2)
    queries = random_token_examples(2, 8200, seed=5)
    cache = run_attribution_pass(net, train, GraSSConfig(), cache_dir=tmp_path / "default", batch_size=3,
                                 disable_progress=True)  # fmt: skip
    default = Attributor(net, None, cache, search="exact")
    computer = default.computer
    assert computer.layout == "global" and computer.row_dim == 31744 and "lm_head" not in computer.module_names
    assert any(c.hashed for c in computer.compressors.values())  # type: ignore[attr-defined]
    exact = Attributor(net, None, run_attribution_pass(net, train, GraSSConfig(dtype="float32"),
                       cache_dir=tmp_path / "fp32", batch_size=3, disable_progress=True), search="exact")  # fmt: skip
    vectors = default.query_vectors([collate(queries)])
    got, want = default.scores(vectors).double(), exact.scores(vectors).double()
    # int8 rows: each entry within half a step of its row's largest entry / 127
    rows = exact.cache.load(torch.float64)
    bound = vectors.rows.double().abs() @ (rows.abs().amax(dim=1, keepdim=True) / 254).expand_as(rows).T
    assert ((got - want).abs() <= bound + 1e-9).all()


def test_the_default_masks_follow_the_model_size() -> None:
    """``mask_basis`` left at None: the top eigen-directions (and, ``damping`` left at None, the
    damping that goes with them) where the factor spaces are more than ``TOP_MASKS_MIN_RATIO`` times
    the row (a real LLM), a random draw of them otherwise; a value the
    user gives is kept (the resolved configuration a cache records carries the choice)."""
    from hf_grass.capture import GradientComputer
    from hf_grass.capture.engine import TOP_MASKS_MIN_RATIO
    from hf_grass.config import DEFAULT_DAMPING, TOP_MASKS_DAMPING

    net = tiny_llama(VOCAB, hidden=32)
    computer = GradientComputer(net, GraSSConfig(total_dim=64))
    size = sum(c.m_in * c.m_out for c in computer.compressors.values())  # type: ignore[attr-defined]
    assert size > TOP_MASKS_MIN_RATIO * 64 and computer.config.mask_basis == "top"
    assert computer.config.damping == TOP_MASKS_DAMPING  # the damping that goes with top masks
    wide = size // 8  # between the row and TOP_MASKS_MIN_RATIO rows
    small = GradientComputer(net, GraSSConfig(total_dim=wide)).config
    assert (small.mask_basis, small.damping) == ("eigen", DEFAULT_DAMPING)
    given = GradientComputer(net, GraSSConfig(total_dim=64, mask_basis="eigen", damping=0.02))
    assert (given.config.mask_basis, given.config.damping) == ("eigen", 0.02)
    assert GradientComputer(net, GraSSConfig(proj_dim=16)).config.mask_basis == "input"
