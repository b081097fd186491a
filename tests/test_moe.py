"""MoE layers of transformers 5: targeting of expert slices and routers, the warm-up sums of an
expert against its routed tokens, and the implementations and settings that are refused.

The rows of experts and routers meet the autograd oracle in ``test_capture.py``, with the Linear
layers, for Mixtral, OLMoE and Qwen3-MoE and the eager, batched_mm and grouped_mm implementations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_grass.attribution import run_attribution_pass, runner
from hf_grass.capture import CaptureRequest, GradientComputer, find_target_modules
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.precondition.warmup import WarmupCovariances, module_widths
from hf_grass.query import Attributor
from hf_grass.testing import random_token_examples, tiny_moe

VOCAB = 40
EXPERTS = "model.layers.0.mlp.experts"


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


def test_warm_up_sums_of_an_expert_equal_its_routed_tokens() -> None:
    """Mixtral expert e (SiLU-gated): over the real tokens routed to it, the up weight's input sum is
    sum x x^T and its output sum that of dh = [da * up * silu'(gate), da * silu(gate)] with
    da = dy W_down[e]; the down weight's input is a = silu(gate) * up and its output gradient
    dy = w * dout (w: the token's routing weight). Written out here, independently of the hooks."""
    model = tiny_moe("mixtral", VOCAB, implementation="eager").double()
    computer = GradientComputer(model, GraSSConfig(proj_dim=16))
    batch = collate(random_token_examples(3, VOCAB, seed=2), padding_side="left")
    block = model.model.layers[1].mlp
    seen: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["x"], seen["index"], seen["weights"] = (a.detach() for a in args[:3])
        output.register_hook(lambda g: seen.__setitem__("dout", g.detach()))

    sums = WarmupCovariances(module_widths(computer.compressors))
    with computer.session():
        handle = block.experts.register_forward_hook(keep)
        computer.compute(batch, CaptureRequest(rows=False, full_covariances=sums))
        handle.remove()
    real = batch["attention_mask"].bool().reshape(-1)
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
        up_name, down_name = (
            f"model.layers.1.mlp.experts.{e}.gate_up_proj",
            f"model.layers.1.mlp.experts.{e}.down_proj",
        )
        for got, want in (
            (sums.input_covariance(up_name), x.T @ x),
            (sums.output_covariance(up_name), dh.T @ dh),
            (sums.input_covariance(down_name), a.T @ a),
            (sums.output_covariance(down_name), dy.T @ dy),
        ):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert sums.tokens[up_name] == tok.numel() > 0


class NarrowWarmup(WarmupCovariances):
    """The warm-up with sides wider than 20 kept as diagonals (hashed), like a real model's widest."""

    def __init__(self, widths: dict, device: torch.device | str = "cpu") -> None:
        super().__init__(widths, device, max_width=20)


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
