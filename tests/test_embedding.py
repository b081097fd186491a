"""nn.Embedding and tied embeddings: one-hot factors against their dense one-hots, the warm-up sums
and the eigen / hashed vocabulary paths of the default configuration against autograd, and the
embeddings hf_grass refuses.

The rows of embeddings and tied output layers under the per-module layout meet the autograd oracle in
``test_capture.py``, with the Linear layers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_capture import autograd_gradient
from test_compressors import ShapeRecorder
from tolerances import EXACT_ATOL, EXACT_RTOL
from torch import nn

from hf_grass.attribution import AttributionPass, Batching
from hf_grass.cache import GradientCache
from hf_grass.capture import CaptureRequest, GradientComputer, find_target_modules, per_example_loss
from hf_grass.capture.targets import cache_targets
from hf_grass.compressors import make_compressor
from hf_grass.compressors.factor_maps import EigenMap, HashMap
from hf_grass.config import COMPRESSORS, GraSSConfig
from hf_grass.data import ExampleSource, collate
from hf_grass.kernels.onehot import OneHot
from hf_grass.precondition.warmup import WarmupCovariances, fit_eigen_masks, module_widths
from hf_grass.testing import random_token_examples, tiny_gpt2, tiny_llama

VOCAB, WIDTH = 30, 10
EVERY = r".*"  # embeddings are targets only when named: name every weight


def one_hot_case(seed: int = 0) -> tuple[OneHot, torch.Tensor]:
    """Ids ``[3, 7]`` (a zero row, id -1, among them) and a dense factor ``[3, 7, WIDTH]``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 7), generator=gen)
    ids[1, 2] = -1
    return OneHot(ids, VOCAB, torch.float64), torch.randn(3, 7, WIDTH, generator=gen, dtype=torch.float64)


def random_maps(c: Any, hashed: str, seed: int = 0) -> tuple[Any, Any]:
    """Factor maps for factgrass ``c``: the ``hashed`` side ("in"/"out") a HashMap, the other an EigenMap."""
    gen = torch.Generator().manual_seed(seed)
    maps = []
    for side, d, m in (("in", c.d_in, c.m_in), ("out", c.d_out, c.m_out)):
        if side == hashed:
            signs = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
            whiten = torch.rand(d, generator=gen) + 0.5
            maps.append(HashMap(torch.randint(0, m, (d,), generator=gen), signs, whiten, m))
        else:
            q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
            maps.append(EigenMap(q[:, :m].float(), math.sqrt(d / m)))
    return maps[0], maps[1]


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("name", COMPRESSORS)
def test_one_hot_factor_equals_its_dense_one_hot(name: str, side: str) -> None:
    """An embedding's ids (input side) and a tied embedding's use (output side) give what the dense
    one-hot rows give, for every compressor."""
    onehot, dense = one_hot_case()
    d_in, d_out = (VOCAB, WIDTH) if side == "in" else (WIDTH, VOCAB)
    c = make_compressor(GraSSConfig(compressor=name, proj_dim=16), "model.embed_tokens", d_in, d_out)
    pair, reference = (
        ((onehot, dense), (onehot.dense(), dense))
        if side == "in"
        else ((dense, onehot), (dense, onehot.dense()))
    )
    torch.testing.assert_close(c.compress(*pair), c.compress(*reference), rtol=EXACT_RTOL, atol=EXACT_ATOL)


@pytest.mark.parametrize("side", ["in", "out"])
def test_one_hot_in_a_fitted_basis(side: str) -> None:
    """factgrass with masks in a fitted basis: the one-hot side hashed (a vocabulary wider than
    FULL_COVARIANCE_MAX_WIDTH) or in an eigenbasis; factors, rows and the curvature-space gradient."""
    onehot, dense = one_hot_case(1)
    d_in, d_out = (VOCAB, WIDTH) if side == "in" else (WIDTH, VOCAB)
    for hashed in ("in", "out"):
        c = make_compressor(GraSSConfig(total_dim=64, factor_dim=6), "lm_head", d_in, d_out)
        c.set_maps(*random_maps(c, hashed))
        pair, reference = (
            ((onehot, dense), (onehot.dense(), dense))
            if side == "in"
            else ((dense, onehot), (dense, onehot.dense()))
        )
        for method in ("factors", "compress", "curvature_gradient"):
            got, want = getattr(c, method)(*pair), getattr(c, method)(*reference)
            torch.testing.assert_close(
                got, want, rtol=EXACT_RTOL, atol=EXACT_ATOL, msg=f"{method} ({hashed} hashed)"
            )
        # the curvature space keeps the hashed side's own coordinates
        g = torch.einsum("bto,bti->boi", reference[1], reference[0])
        torch.testing.assert_close(
            c.curvature_gradient(*pair), c.curvature_gradient_from_full(g), rtol=EXACT_RTOL, atol=EXACT_ATOL
        )


@pytest.mark.parametrize("name", ["factgrass", "logra"])
def test_one_hot_is_never_built(name: str) -> None:
    """A 50k vocabulary: nothing as large as the [B, T, vocab] one-hot is built (a hashed side too)."""
    vocab, batch, tokens = 50_000, 2, 16
    c = make_compressor(GraSSConfig(compressor=name, proj_dim=256), "model.embed_tokens", vocab, 64)
    ids = torch.randint(0, vocab, (batch, tokens))
    delta = torch.randn(batch, tokens, 64)
    layouts = [c]
    if name == "factgrass":
        hashed = make_compressor(GraSSConfig(total_dim=256, factor_dim=16), "model.embed_tokens", vocab, 64)
        hashed.set_maps(*random_maps(hashed, "in"))
        layouts.append(hashed)
    for comp in layouts:
        with ShapeRecorder() as rec:
            comp.compress(OneHot(ids, vocab), delta)
        assert rec.outputs
        op, shape, numel = rec.largest()
        assert numel < batch * tokens * vocab, f"{name} built {shape} via {op}"


# ---- the warm-up and the default configuration's paths ---------------------------------------------


def recorded_factors(model: nn.Module, modules: dict[str, str]) -> dict[str, list[torch.Tensor]]:
    """Forward hooks that keep each named module's input (``"in"``) or output gradient (``"out"``);
    installed inside the capture session, so they see the outputs the capture hooks return."""
    seen: dict[str, list[torch.Tensor]] = {key: [] for key in modules}

    def hook(key: str, what: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if what == "in":
            seen[key].append(inputs[0].detach())
        else:
            output.register_hook(lambda g: seen[key].append(g.detach()))

    named = dict(model.named_modules())
    for key, spec in modules.items():
        module, what = spec.split(":")
        named[module].register_forward_hook(lambda m, i, o, k=key, w=what: hook(k, w, m, i, o))
    return seen


@pytest.mark.parametrize("max_width", [64, 16])
def test_warm_up_sums_of_one_hot_sides(max_width: int) -> None:
    """The warm-up's sums of a tied GPT-2: the output layer's vocabulary side adds the token counts
    of the embedding's use to its own output gradients (a diagonal above max_width), its hidden side
    adds the embedding's output gradients to its inputs; the position embedding's input sum is its
    position counts. All over the real tokens of a left-padded batch."""
    model = tiny_gpt2(40, tie=True).double()
    computer = GradientComputer(model, GraSSConfig(proj_dim=16, target_modules=EVERY))
    batch = collate(random_token_examples(3, 40, seed=4), padding_side="left")
    real = batch["attention_mask"].bool()
    sums = WarmupCovariances(module_widths(computer.compressors), max_width=max_width)
    with computer.session():
        seen = recorded_factors(
            model, {"h": "lm_head:in", "dlogits": "lm_head:out", "demb": "transformer.wte:out"}
        )
        computer.compute(batch, CaptureRequest(rows=False, full_covariances=sums))
    h, dlogits, demb = (seen[k][0][real] for k in ("h", "dlogits", "demb"))
    ids = batch["input_ids"][real]
    counts = torch.bincount(ids, minlength=40).double()
    out = dlogits.T @ dlogits + torch.diag(counts)
    want_out = out if max_width >= 40 else torch.diagonal(out)
    torch.testing.assert_close(sums.output_covariance("lm_head"), want_out, rtol=1e-10, atol=1e-10)
    hidden = h.T @ h + demb.T @ demb
    want_in = hidden if max_width >= 32 else torch.diagonal(hidden)
    torch.testing.assert_close(sums.input_covariance("lm_head"), want_in, rtol=1e-10, atol=1e-10)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)[real]
    pos_counts = torch.bincount(positions, minlength=64).double()
    want_pos = pos_counts if max_width < 64 else torch.diag(pos_counts)
    torch.testing.assert_close(sums.input_covariance("transformer.wpe"), want_pos)
    assert sums.tokens["lm_head"] == 2 * int(real.sum())  # both uses' tokens


@pytest.mark.parametrize("max_width", [64, 36])
@pytest.mark.parametrize("family", ["gpt2-tied", "llama"])
def test_default_configuration_matches_autograd(family: str, max_width: int) -> None:
    """The default configuration (masks in the warm-up eigenbasis) on the embeddings: the vocabulary
    side in an eigenbasis (max_width 64) or hashed (36 < vocab 40, as a real vocabulary is above
    8192). Rows and curvature-space gradients equal the compressors' explicit maps of autograd's
    per-example gradients."""
    model = (tiny_gpt2(40, tie=True) if family == "gpt2-tied" else tiny_llama(40)).double()
    computer = GradientComputer(model, GraSSConfig(target_modules=EVERY))
    examples = random_token_examples(3, 40, seed=11)
    batch = collate(examples, padding_side="left")
    sums = WarmupCovariances(module_widths(computer.compressors), max_width=max_width)
    with computer.session():
        computer.compute(batch, CaptureRequest(rows=False, full_covariances=sums))
        sums.new_batch(len(examples))
        fit_eigen_masks(computer.compressors, sums, damping=0.1).attach(computer.compressors)
        grads = computer.compute(batch, CaptureRequest(rows=True, curvature_grads=True))
    vocab_side = {"gpt2-tied": ("lm_head", "map_out"), "llama": ("model.embed_tokens", "map_in")}[family]
    fmap = getattr(computer.compressors[vocab_side[0]], vocab_side[1])
    assert isinstance(fmap, HashMap if max_width < 40 else EigenMap)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    for i, ex in enumerate(examples):
        row = torch.zeros(computer.row_dim, dtype=torch.float64)
        for t in computer.targets:
            g = autograd_gradient(model, t, ex)[None]
            comp = computer.compressors[t.name]
            start, stop = computer.offsets[t.name]
            row[start:stop] += comp.compress_gradient(g)[0]
            if t.name in grads.curvature_grads:
                torch.testing.assert_close(
                    grads.curvature_grads[t.name][i], comp.curvature_gradient_from_full(g)[0]
                )
        torch.testing.assert_close(grads.rows[i], row, rtol=1e-6, atol=1e-6 * row.abs().max().item())
    assert vocab_side[0] in grads.curvature_grads or max_width >= 40


# ---- tied uses, padding ids, refusals ----------------------------------------------------------------


def test_excluding_the_tied_embedding_leaves_its_use_out() -> None:
    """The rows then miss the embedding's use, which is not negligible (the oracle test is not vacuous)."""
    model = tiny_gpt2(40, tie=True).double()
    both = GradientComputer(model, GraSSConfig(compressor="random", proj_dim=16, target_modules=EVERY))
    head_only = GradientComputer(
        model, GraSSConfig(compressor="random", proj_dim=16, target_modules=EVERY, exclude_modules=["wte"])
    )
    assert next(t for t in head_only.targets if t.name == "lm_head").tied is None
    batch = collate(random_token_examples(2, 40, seed=3))
    rows = []
    for computer in (both, head_only):
        with computer.session():
            out = computer.compute(batch).rows
        start, stop = computer.offsets["lm_head"]
        rows.append(out[:, start:stop])
    assert (rows[0] - rows[1]).norm() > 1e-3 * rows[0].norm()
    assert "its use by transformer.wte is left out" in head_only.coverage().line()


def test_padding_idx_gets_no_gradient() -> None:
    """Llama's embedding has padding_idx = the pad id: a pad id inside a document (a real token) reads
    the row but its gradient does not reach it."""
    from test_capture import check_against_autograd

    model = tiny_llama(40).double()
    assert model.model.embed_tokens.padding_idx == 0
    examples = [{"input_ids": [5, 0, 7, 9, 0, 4]}, {"input_ids": [8, 6, 0]}]
    # a dense map: it sees the padding row's column (a mask may not keep it)
    config = GraSSConfig(compressor="random", proj_dim=16, target_modules=["embed_tokens", "lm_head"])
    check_against_autograd(model, config, examples, "right")


def test_batch_shared_position_ids_are_refused() -> None:
    """GPT-2 without position_ids reads positions of shape [1, T]: no per-example gradient."""

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])

    model = tiny_gpt2(40)
    computer = GradientComputer(model, GraSSConfig(proj_dim=16, target_modules=EVERY), per_example_loss=loss)
    batch = collate(random_token_examples(2, 40, seed=1, lo=6, hi=7))
    with computer.session(), pytest.raises(ValueError, match=r"transformer\.wpe.*exclude_modules"):
        computer.compute(batch)


class ScaledByFrequency(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, scale_grad_by_freq=True)
        self.head = nn.Linear(8, 20)

    def forward(self, input_ids: torch.Tensor) -> dict:
        return {"logits": self.head(self.emb(input_ids))}


def test_embeddings_that_cannot_be_captured_are_refused() -> None:
    model = ScaledByFrequency()
    assert [t.name for t in find_target_modules(model)] == ["head"]
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        find_target_modules(model, ["emb"])
    line = GradientComputer(model, GraSSConfig(proj_dim=16)).coverage().line()
    assert "emb.weight" in line and "scale_grad_by_freq" in line


def test_queries_capture_the_tied_use_as_the_cache_did(tmp_path: Path) -> None:
    """The manifest records the tied use (``"tied"`` in lm_head's entry); queries of a cache without
    it (written before hf_grass captured that use) leave it out, so both sides agree."""
    model = tiny_gpt2(40, tie=True)
    computer = GradientComputer(model, GraSSConfig(proj_dim=16, target_modules=EVERY))
    path = AttributionPass(
        computer,
        ExampleSource(random_token_examples(3, 40)),
        tmp_path / "c",
        Batching(3, disable_progress=True),
    ).run()
    modules = GradientCache(path).modules
    assert next(m for m in modules if m["name"] == "lm_head")["tied"] == "transformer.wte"
    assert next(t for t in cache_targets(model, modules) if t.name == "lm_head").tied is model.transformer.wte
    older = [{k: v for k, v in m.items() if k != "tied"} for m in modules]
    assert next(t for t in cache_targets(model, older) if t.name == "lm_head").tied is None


def test_embeddings_are_opt_in() -> None:
    """By default no embedding use is attributed (they lowered bench-dev's rankings, docs/benchmarks.md):
    a tied output layer keeps its own use only; naming the embeddings attributes them."""
    model = tiny_gpt2(40, tie=True)
    default = find_target_modules(model)
    assert not any(t.kind == "embedding" for t in default)
    assert next(t for t in default if t.name == "lm_head").tied is None
    named = find_target_modules(model, ["c_attn", "wte", "wpe"])
    assert [t.name for t in named] == [
        "transformer.wpe",
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
        "lm_head",
    ]
    assert named[-1].tied is model.transformer.wte  # the tied parameter is named after its output layer
    line = GradientComputer(model, GraSSConfig(proj_dim=16)).coverage().line()
    assert "transformer.wpe.weight" in line and "its use by transformer.wte is left out" in line
