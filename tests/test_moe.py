"""MoE layers of transformers 5: targeting of expert slices and routers, the warm-up sums of an
expert against its routed tokens, and the implementations and settings that are refused.

The rows of experts and routers meet the autograd oracle in ``test_capture.py``, with the Linear
layers, for Mixtral, OLMoE and Qwen3-MoE and the eager, batched_mm and grouped_mm implementations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._memory_model import MoEShape, apply_budget, moe_linears, warmup_bytes
from hf_grass.attribution import run_attribution_pass, runner
from hf_grass.capture import CaptureRequest, GradientComputer, find_target_modules
from hf_grass.capture.experts import warmup_pools
from hf_grass.compressors.factor_maps import EigenMap, HashMap
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.precondition import warmup
from hf_grass.precondition.warmup import WarmupCovariances, fit_eigen_masks, module_widths
from hf_grass.query import Attributor
from hf_grass.testing import random_token_examples, tiny_moe

VOCAB = 40
EXPERTS = "model.layers.0.mlp.experts"
LAYER_1 = "model.layers.1.mlp.experts"


def names(targets: list) -> list[str]:
    return [t.name for t in targets]


def test_expert_targets_and_their_names() -> None:
    model = tiny_moe("mixtral", VOCAB)
    every = names(find_target_modules(model))
    assert f"{EXPERTS}.3.gate_up_proj" in every and f"{EXPERTS}.0.down_proj" in every
    assert "model.layers.0.mlp.gate" in every  # the router
    # an experts module's name selects all its experts; a weight's name selects that weight in each
    assert len(find_target_modules(model, ["experts"])) == 2 * 4 * 2
    assert names(find_target_modules(model, [EXPERTS])) == [
        f"{EXPERTS}.{e}.{p}" for e in range(4) for p in ("gate_up_proj", "down_proj")
    ]
    assert len(find_target_modules(model, ["down_proj"])) == 2 * 4
    assert names(find_target_modules(model, r".*layers\.1\.mlp\.experts\.2\..*")) == [
        "model.layers.1.mlp.experts.2.gate_up_proj", "model.layers.1.mlp.experts.2.down_proj"
    ]  # fmt: skip
    kept = names(find_target_modules(model, exclude_modules=["experts", "gate"]))
    assert not any(".experts." in n or n.endswith(".gate") for n in kept) and "lm_head" in kept
    expert = find_target_modules(model, [f"{EXPERTS}.1.down_proj"])[0]
    assert (expert.kind, expert.index, expert.parameter, expert.d_out, expert.d_in) == (
        "expert",
        1,
        "down_proj",
        16,
        24,
    )


def test_unsupported_implementations_and_settings_are_refused() -> None:
    model = tiny_moe("qwen3_moe", VOCAB)
    model.config._experts_implementation = "sonicmoe"
    with pytest.raises(ValueError, match="experts_implementation='sonicmoe'.*exclude_modules"):
        find_target_modules(model)
    assert not any(".experts." in n for n in names(find_target_modules(model, exclude_modules=["experts"])))
    model.config._experts_implementation = "grouped_mm"
    model.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(ValueError, match="expert parallelism"):
        find_target_modules(model)
    model.model.layers[1].mlp.experts._is_expert_parallel = False
    model.model.layers[0].mlp.experts.down_proj.ds_id = 7  # what a DeepSpeed ZeRO-3 partition carries
    with pytest.raises(ValueError, match="ZeRO-3"):
        find_target_modules(model)


def test_switching_the_implementation_after_targeting_is_refused() -> None:
    model = tiny_moe("mixtral", VOCAB, implementation="eager")
    computer = GradientComputer(model, GraSSConfig(proj_dim=16))
    model.config._experts_implementation = "deepgemm"
    with computer.session(), pytest.raises(ValueError, match="experts_implementation='deepgemm'"):
        computer.compute(collate(random_token_examples(2, VOCAB)))


def test_experts_computing_something_else_are_caught() -> None:
    """Fault injection: experts whose forward is not the transformers math (here, scaled), and a
    router whose output is not its linear map, raise instead of giving wrong gradients."""
    batch = collate(random_token_examples(2, VOCAB))
    model = tiny_moe("olmoe", VOCAB, implementation="eager")
    experts = model.model.layers[1].mlp.experts
    experts.forward = lambda *a, _f=experts.forward, **k: 1.5 * _f(*a, **k)  # type: ignore[method-assign]
    computer = GradientComputer(model, GraSSConfig(proj_dim=16))
    with (
        computer.session(),
        pytest.raises(ValueError, match="experts model.layers.1.mlp.experts.*recomputation differs"),
    ):
        computer.compute(batch)
    model = tiny_moe("olmoe", VOCAB, implementation="eager")
    router = model.model.layers[0].mlp.gate
    original = router.forward
    router.forward = lambda h: (2 * original(h)[0], *original(h)[1:])  # type: ignore[method-assign]
    computer = GradientComputer(model, GraSSConfig(proj_dim=16))
    with computer.session(), pytest.raises(ValueError, match="router model.layers.0.mlp.gate"):
        computer.compute(batch)


def test_warm_up_sums_of_the_experts_equal_their_routed_tokens() -> None:
    """Mixtral expert e (SiLU-gated): over the real tokens routed to it, the up weight's input is x and
    its output gradient dh = [da * up * silu'(gate), da * silu(gate)] with da = dy W_down[e]; the down
    weight's input is a = silu(gate) * up and its output gradient dy = w * dout (w: the token's
    routing weight). Written out here, independently of the hooks. The layer's experts pool x and dy
    (one sum each, over every expert's routed tokens); dh and a are each expert's own. The fit
    decomposes each pool once: an expert's input eigenvalues are the pool's per routed token, its
    output eigenvalues the pool's per routed token times its own tokens per example."""
    model = tiny_moe("mixtral", VOCAB, implementation="eager").double()
    computer = GradientComputer(model, GraSSConfig(proj_dim=16))
    batch = collate(random_token_examples(3, VOCAB, seed=2), padding_side="left")
    block = model.model.layers[1].mlp
    seen: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["x"], seen["index"], seen["weights"] = (a.detach() for a in args[:3])
        output.register_hook(lambda g: seen.__setitem__("dout", g.detach()))

    sums = WarmupCovariances(module_widths(computer.compressors), pools=warmup_pools(computer.targets))
    with computer.session():
        handle = block.experts.register_forward_hook(keep)
        computer.compute(batch, CaptureRequest(rows=False, full_covariances=sums))
        handle.remove()
    sums.new_batch(3)
    basis = fit_eigen_masks(computer.compressors, sums, damping=0.1)
    real = batch["attention_mask"].bool().reshape(-1)
    pooled_x, pooled_dy, routed = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 16, dtype=torch.float64), 0
    counts = []
    for e in range(4):
        tok, slot = torch.where(seen["index"] == e)
        tok, slot = tok[real[tok]], slot[real[tok]]
        x, dout, w = seen["x"][tok], seen["dout"][tok], seen["weights"][tok, slot, None]
        h = x @ block.experts.gate_up_proj[e].detach().T
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
        dy = w * dout
        da = dy @ block.experts.down_proj[e].detach()
        sig = torch.sigmoid(gate)
        dh = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * F.silu(gate)], dim=-1)
        up_name, down_name = f"{LAYER_1}.{e}.gate_up_proj", f"{LAYER_1}.{e}.down_proj"
        for got, want in ((sums.output_covariance(up_name), dh.T @ dh), (sums.input_covariance(down_name), a.T @ a)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert sums.tokens[up_name] == sums.tokens[down_name] == tok.numel() > 0
        pooled_x += x.T @ x
        pooled_dy += dy.T @ dy
        routed += tok.numel()
        counts.append(tok.numel())
    assert routed == 2 * int(real.sum())  # every real token goes to 2 experts
    for e in range(4):  # one sum per layer and side, the same tensor for every expert
        assert sums.input_covariance(f"{LAYER_1}.{e}.gate_up_proj") is sums.inputs[f"{LAYER_1}.*.gate_up_proj"]
        assert sums.output_covariance(f"{LAYER_1}.{e}.down_proj") is sums.outputs[f"{LAYER_1}.*.down_proj"]
    torch.testing.assert_close(sums.inputs[f"{LAYER_1}.*.gate_up_proj"], pooled_x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sums.outputs[f"{LAYER_1}.*.down_proj"], pooled_dy, rtol=1e-9, atol=1e-12)
    # per layer: inputs q/k/v (one), o, the router, the pooled up input, 4 down inputs; outputs q, k, v, o,
    # the router, 4 up outputs, the pooled down output; and lm_head
    assert (len(sums.inputs), len(sums.outputs)) == (2 * (3 + 1 + 4) + 1, 2 * (5 + 4 + 1) + 1)
    # the fit: each kept direction is an eigenvector of the pool, its eigenvalue the pool's, counted as above
    for e in range(4):
        for name, side, pool, count in (
            (f"{LAYER_1}.{e}.gate_up_proj", "in", pooled_x, routed),
            (f"{LAYER_1}.{e}.down_proj", "out", pooled_dy, 3 * routed / counts[e]),
        ):
            mod = basis.modules[name]
            vectors, eig = (mod.map_in, mod.eig_in) if side == "in" else (mod.map_out, mod.eig_out)
            v = vectors.vectors.double()
            lam = (v * (pool @ v)).sum(0)
            torch.testing.assert_close(pool @ v, v * lam, rtol=0, atol=1e-5 * float(pool.norm()))
            torch.testing.assert_close(eig, lam / count, rtol=0, atol=1e-5 * float(lam.abs().max()) / count)


# the tiny OLMoE of the tests with 16 experts, in the memory model's terms (benchmarks/_memory_model.py)
TINY_OLMOE = MoEShape("tiny OLMoE", hidden=16, expert_intermediate=24, layers=2, heads=2, kv_heads=1, head_dim=8,
                      vocab=VOCAB, experts=16, top_k=2)  # fmt: skip
BUDGET = 300_000  # bytes: below this model's sums with every expert side full, above them without the up outputs


def test_warm_up_sums_of_many_experts_stay_within_the_byte_budget() -> None:
    """OLMoE with 16 experts per layer and a byte budget lowered to its scale: the experts' up inputs
    and down outputs pool into one sum per layer, and the largest family of their own sides (the up
    weights' 48-wide outputs) keeps diagonals. The memory model (formulas, no library code) counts
    the bytes the sums take before (every expert its own sums) and after, and ``nbytes`` measures
    exactly what it predicts, within the budget."""
    model = tiny_moe("olmoe", VOCAB, experts=16)
    computer = GradientComputer(model, GraSSConfig(proj_dim=16))
    sums = WarmupCovariances(module_widths(computer.compressors), pools=warmup_pools(computer.targets),
                             max_bytes=BUDGET)  # fmt: skip
    with computer.session():
        computer.compute(collate(random_token_examples(6, VOCAB, lo=10, hi=12, seed=3)),
                         CaptureRequest(rows=False, full_covariances=sums))  # fmt: skip
    assert len(sums.output_of) == len(computer.targets)  # every expert was reached: every sum is there
    before = warmup_bytes(moe_linears(TINY_OLMOE, pooled=False), 1)["sums"]
    planned = apply_budget(moe_linears(TINY_OLMOE), BUDGET)
    assert {(lin.family, lin.hashed_in, lin.hashed_out) for lin in planned if lin.hashed_in or lin.hashed_out} == {
        ("experts' gate_up_proj", False, True)
    }
    assert sums.nbytes() == warmup_bytes(planned, 1)["sums"] <= BUDGET < before
    up, down = f"{EXPERTS}.3.gate_up_proj", f"{EXPERTS}.3.down_proj"
    assert sums.output_covariance(up).shape == (48,) and sums.input_covariance(down).shape == (24, 24)
    line = sums.fallback_line()
    assert line is not None and "experts' gate_up_proj output gradients of 32 experts" in line
    assert "down_proj" not in line
    # the default budget leaves this model alone: nothing falls back
    default = WarmupCovariances(module_widths(computer.compressors), pools=warmup_pools(computer.targets))
    assert default.fallbacks == [] and default.fallback_line() is None


def test_a_pass_under_the_budget_hashes_those_sides_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The default pass with the budget lowered: a WARNING names the experts' sides kept as
    diagonals, those sides are hashed in the cache's basis, the others keep eigen masks, and a
    document scored against itself stays the largest of its row."""
    monkeypatch.setattr(warmup, "WARMUP_MAX_BYTES", BUDGET)
    model = tiny_moe("olmoe", VOCAB, experts=16)
    docs = random_token_examples(6, VOCAB, lo=10, hi=12, seed=3)
    with caplog.at_level(logging.WARNING, logger="transformers.hf_grass"):
        cache = run_attribution_pass(model, docs, GraSSConfig(factor_dim=8), cache_dir=tmp_path / "c",
                                     disable_progress=True)  # fmt: skip
    assert any("experts' gate_up_proj output gradients of 32 experts" in r.getMessage() for r in caplog.records)
    attributor = Attributor(model, None, cache)
    assert attributor.basis is not None
    mod = attributor.basis.modules
    assert isinstance(mod[f"{EXPERTS}.5.gate_up_proj"].map_out, HashMap)
    assert isinstance(mod[f"{EXPERTS}.5.gate_up_proj"].map_in, EigenMap)
    assert isinstance(mod[f"{EXPERTS}.5.down_proj"].map_in, EigenMap)
    scores = attributor.attribute(docs)
    assert torch.isfinite(scores).all()
    assert (scores.argmax(dim=1) == torch.arange(len(docs))).float().mean() >= 0.5


class NarrowWarmup(WarmupCovariances):
    """The warm-up with sides wider than 20 kept as diagonals (hashed), like a real model's widest."""

    def __init__(self, widths: dict, device: torch.device | str = "cpu", **kwargs: Any) -> None:
        super().__init__(widths, device, max_width=20, **kwargs)


def test_default_pass_and_queries_on_an_moe_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default configuration end to end on Mixtral with 8 experts: warm-up (the expert sides
    wider than 20 hashed, as a 14k-wide expert of a real Mixtral is), EK-FAC, int8 rows, then a
    one-token-pair query that leaves most experts unreached. Every score is finite, and a document
    scored against itself is the largest of its row (the estimator sees the experts)."""
    monkeypatch.setattr(runner, "WarmupCovariances", NarrowWarmup)
    model = tiny_moe("mixtral", VOCAB, experts=8)
    docs = random_token_examples(6, VOCAB, seed=4)
    # factor_dim 8 < the hashed widths, as on a real model (a zero gradient then has the curvature's shape)
    config = GraSSConfig(factor_dim=8)
    cache = run_attribution_pass(model, docs, config, cache_dir=tmp_path / "c", disable_progress=True)
    assert any(".experts." in n for n in cache.module_names)
    attributor = Attributor(model, None, cache)
    short = attributor.query_vectors([collate([{"input_ids": [5, 6]}])])
    assert torch.isfinite(short.rows).all()
    scores = attributor.attribute(docs)
    assert torch.isfinite(scores).all()
    assert (scores.argmax(dim=1) == torch.arange(len(docs))).float().mean() >= 0.5
