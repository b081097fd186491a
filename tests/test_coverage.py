"""The coverage line: what fraction of the trainable parameters the targets attribute, and what is
left out and why, counted here by brute force over ``named_parameters`` on GPT-2 (tied embeddings),
Llama, a PEFT LoRA model and an MoE model; logged at build time and recorded in the manifest."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_grass.attribution import AttributionPass, Batching
from hf_grass.cache import GradientCache
from hf_grass.capture import GradientComputer
from hf_grass.capture.coverage import Coverage, human
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource
from hf_grass.testing import random_token_examples, tiny_gpt2, tiny_llama, tiny_moe

VOCAB = 40


def lora_model() -> nn.Module:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(tiny_llama(VOCAB), cfg)


def norm_parameters(model: nn.Module) -> dict[str, int]:
    """The trainable parameters of norm layers (class name ``...Norm``): what nothing captures."""
    out = {}
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    out[f"{name}.{pname}"] = p.numel()
    return out


def left_out_names(cover: Coverage) -> set[str]:
    return {n for group in cover.left_out for n in group.names}


MODELS = {
    "gpt2-tied": lambda: tiny_gpt2(VOCAB, tie=True),
    "llama": lambda: tiny_llama(VOCAB),
    "lora": lora_model,
    "mixtral": lambda: tiny_moe("mixtral", VOCAB),
    "qwen3_moe": lambda: tiny_moe("qwen3_moe", VOCAB),
}


def untied_embeddings(model: nn.Module) -> dict[str, int]:
    """The trainable nn.Embedding weights no Linear shares: opt-in targets."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return {
        f"{name}.weight": m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and m.weight.requires_grad and id(m.weight) not in linear
    }


@pytest.mark.parametrize("targets", ["default", "every"])
@pytest.mark.parametrize("family", list(MODELS))
def test_coverage_lines(family: str, targets: str) -> None:
    """Default targets: everything but the norms and the embeddings (opt-in; a tied output layer's
    parameter counts as attributed, with its embedding's use said to be left out). Every weight
    (``target_modules=r".*"``): everything but the norms."""
    if family == "lora" and targets == "every":
        pytest.skip("a LoRA model's trainable weights are its LoRA layers either way")
    model = MODELS[family]()
    config = GraSSConfig(target_modules=r".*" if targets == "every" else None)
    cover = GradientComputer(model, config).coverage()
    # each parameter once: the tied lm_head / wte weight is one tensor
    trainable = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    left = norm_parameters(model) | (untied_embeddings(model) if targets == "default" else {})
    assert cover.trainable == sum(trainable.values())
    assert cover.attributed == cover.trainable - sum(left.values())
    assert left_out_names(cover) == set(left)
    assert cover.level == logging.INFO
    tied = family == "gpt2-tied" and targets == "default"
    assert cover.partial == (
        ["lm_head.weight: its use by transformer.wte is left out (embeddings are attributed only when "
         "target_modules names them)"] if tied else []
    )  # fmt: skip
    line = cover.line()
    assert line.startswith(
        f"attributing {human(cover.attributed)} of {human(cover.trainable)} trainable parameters"
    )
    if family == "lora":  # the frozen base is not trainable: the LoRA layers are everything
        assert (
            cover.attributed
            == cover.trainable
            == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        )
        assert "nothing left out" in line
    else:
        assert "not a linear map of its input" in line


def test_leaving_targets_out_is_counted() -> None:
    """Excluding weights (some experts, the tied embedding's use) is said, and counted exactly."""
    model = tiny_moe("mixtral", VOCAB)
    cover = GradientComputer(model, GraSSConfig(exclude_modules=r".*experts\.[123]\..*")).coverage()
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    dropped = sum(3 * (m.gate_up_proj[0].numel() + m.down_proj[0].numel()) for m in experts)
    skipped = sum(norm_parameters(model).values()) + sum(untied_embeddings(model).values())
    assert cover.attributed == cover.trainable - skipped - dropped
    full = experts[0].gate_up_proj.numel()
    assert (
        f"model.layers.0.mlp.experts.gate_up_proj ({human(full * 3 // 4)} of {human(full)})"
        in left_out_names(cover)
    )
    assert cover.level == logging.INFO  # a choice of the configuration
    config = GraSSConfig(target_modules=r".*", exclude_modules=["wte"])
    tied = GradientComputer(tiny_gpt2(VOCAB, tie=True), config).coverage()
    assert tied.partial and tied.level == logging.INFO


def test_an_llm_output_layer_is_opt_in() -> None:
    """An output layer over more than WIDE_OUTPUT classes (an LLM's lm_head) is left out of the
    default targets, said as a choice of the configuration, and attributed when named; a small head
    (the other tests' vocabularies) stays a default target."""
    from hf_grass.capture.targets import WIDE_OUTPUT

    model = tiny_llama(WIDE_OUTPUT + 1, hidden=8)
    default = GradientComputer(model, GraSSConfig())
    assert "lm_head" not in default.module_names and default.module_names
    cover = default.coverage()
    head = model.lm_head.weight.numel()
    skipped = sum(norm_parameters(model).values()) + sum(untied_embeddings(model).values())
    assert cover.attributed == cover.trainable - skipped - head
    assert "lm_head.weight" in left_out_names(cover) and cover.level == logging.INFO
    assert f"more than {WIDE_OUTPUT} classes" in cover.line()
    named = GradientComputer(model, GraSSConfig(target_modules=r".*_proj|lm_head"))
    assert "lm_head" in named.module_names
    assert "lm_head" in GradientComputer(tiny_llama(VOCAB), GraSSConfig()).module_names


class WithScale(nn.Module):
    """A model with a parameter of a module hf_grass has no rule for."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, input_ids: torch.Tensor) -> dict:
        return {"logits": self.lin(input_ids) * self.scale}


def test_uncapturable_parameters_are_a_warning() -> None:
    cover = GradientComputer(WithScale(), GraSSConfig(proj_dim=4)).coverage()
    assert (cover.trainable, cover.attributed) == (24, 20)
    assert cover.level == logging.WARNING
    assert (
        "4 numbers in 1 tensors (WithScale: hf_grass has no capture rule for this module type): scale"
        in cover.line()
    )


def test_the_build_logs_and_records_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_gpt2(VOCAB, tie=True)
    computer = GradientComputer(model, GraSSConfig(proj_dim=16))
    expected = computer.coverage()
    with caplog.at_level(logging.INFO, logger="transformers.hf_grass"):
        path = AttributionPass(
            computer,
            ExampleSource(random_token_examples(4, VOCAB)),
            tmp_path / "c",
            Batching(2, disable_progress=True),
        ).run()
    assert expected.line() in caplog.text
    record = GradientCache(path).model_info["coverage"]
    assert record["attributed"] == expected.attributed and record["line"] == expected.line()
    assert all(p.requires_grad for p in model.parameters())  # the pass froze and restored them
