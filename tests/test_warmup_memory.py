"""The warm-up's memory: a wide side's diagonal summed over chunks of tokens (against the brute-force
diagonal of the real tokens' ``x^T x``, bias column included), and the sums freed after the fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hf_grass.attribution.runner as runner_module
import hf_grass.precondition.warmup as warmup_module
from hf_grass.attribution import run_attribution_pass
from hf_grass.capture import CaptureRequest, GradientComputer
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.precondition.warmup import WarmupCovariances, module_widths
from hf_grass.testing import random_token_examples, tiny_gpt2, tiny_llama

VOCAB = 40


def captured(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """Forward hooks that keep the inputs and output gradients of ``names``."""
    xs: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def remember(module: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
            xs[name] = inputs[0].detach()
            output.register_hook(lambda grad: deltas.__setitem__(name, grad.detach()))

        handles.append(module.register_forward_hook(remember))
    return xs, deltas, handles


@pytest.mark.parametrize("make", [lambda: tiny_llama(VOCAB, hidden=16), lambda: tiny_gpt2(VOCAB, 2, 16)])
def test_wide_sides_keep_their_diagonal_summed_in_chunks(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make().double()
    computer = GradientComputer(model, GraSSConfig(proj_dim=16, dtype="float32"))
    # sides wider than 20 keep their diagonal (the MLP's, lm_head's output); chunks of 3 tokens of the
    # widest side, so the chunks cut across examples and padding
    monkeypatch.setattr(warmup_module, "DIAGONAL_CHUNK_BYTES", 4 * 64 * 3)
    sums = WarmupCovariances(module_widths(computer.compressors), max_width=20)
    batch = collate(random_token_examples(3, VOCAB, seed=7), padding_side="left")
    with computer.session():  # hooks after the capture's: they see the output it made require grad
        xs, deltas, handles = captured(model, [t.name for t in computer.targets])
        computer.compute(batch, CaptureRequest(rows=False, full_covariances=sums))
    for h in handles:
        h.remove()
    real = batch["attention_mask"].bool()
    wide = 0
    for target in computer.targets:
        x, delta = xs[target.name][real], deltas[target.name][real]
        if target.bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        for got, t in ((sums.input_covariance(target.name), x), (sums.output_covariance(target.name), delta)):
            want = (t.T @ t) if t.shape[1] <= 20 else t.square().sum(0)
            wide += t.shape[1] > 20
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert sums.tokens[target.name] == int(real.sum())
    assert wide >= 3  # the MLP's wide sides and lm_head's output


def test_the_sums_are_freed_after_the_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[WarmupCovariances] = []
    real_fit = runner_module.fit_eigen_masks

    def fit(compressors: Any, sums: WarmupCovariances, damping: float, top: bool = False) -> Any:
        seen.append(sums)
        assert sums.nbytes() > 0
        return real_fit(compressors, sums, damping, top)

    monkeypatch.setattr(runner_module, "fit_eigen_masks", fit)
    model = tiny_llama(VOCAB, hidden=16)
    run_attribution_pass(model, random_token_examples(6, VOCAB), GraSSConfig(batch_size=3), cache_dir=tmp_path / "c",
                         disable_progress=True)  # fmt: skip
    # the capture's last warm-up request references the sums until the next batch: they are emptied
    assert len(seen) == 1 and seen[0].nbytes() == 0 and not seen[0].inputs
