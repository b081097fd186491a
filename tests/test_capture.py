"""Capture oracle: batched, padded hooks vs per-example autograd with batch size 1.

Every kind of target meets the same oracle: Linear and Conv1D, LoRA A/B, nn.Embedding (one-hot
inputs), the output layer of tied embeddings (both uses of the one parameter), and the experts and
routers of transformers-5 MoE layers (each expert's slice of the 3-D weights).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_grass.capture import CaptureRequest, GradientComputer, find_target_modules, per_example_loss
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.precondition.warmup import WarmupCovariances, module_widths
from hf_grass.testing import MOE_FAMILIES, random_token_examples, tiny_gpt2, tiny_llama, tiny_moe

RTOL = 1e-4
VOCAB = 40
EVERY = r".*"  # every weight hf_grass can capture: embeddings (opt-in) too


def autograd_gradient(model: nn.Module, target, example: dict, reduction: str = "sum") -> torch.Tensor:
    """The per-example gradient ``[d_out, d_in]`` of one module from a batch of one, no padding."""
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([example["input_ids"]])
    logits = model(input_ids=ids).logits
    loss = per_example_loss(logits, ids, reduction).sum()
    loss.backward()
    weight = target.weight_parameter
    # an expert that no token of the example reached gets no gradient at all
    g = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    g = g if target.index is None else g[target.index]  # an expert: its slice of the 3-D weight
    g = g.T if target.transposed else g
    if target.bias:
        bias = target.bias_parameter
        b = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        g = torch.cat([g, (b if target.index is None else b[target.index])[:, None]], dim=1)
    return g


def check_against_autograd(
    model: nn.Module, config: GraSSConfig, examples: list[dict], side: str
) -> GradientComputer:
    computer = GradientComputer(model, config)
    batch = collate(examples, pad_token_id=0, padding_side=side)
    with computer.session():
        rows = computer.compute(batch).rows
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    for t in computer.targets:
        start, stop = computer.offsets[t.name]
        comp = computer.compressors[t.name]
        for i, ex in enumerate(examples):
            expected = comp.compress_gradient(autograd_gradient(model, t, ex, config.loss_reduction)[None])[0]
            torch.testing.assert_close(
                rows[i, start:stop], expected, rtol=RTOL, atol=RTOL * expected.abs().max().item()
            )
    return computer


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("compressor", ["random", "factgrass", "logra"])
def test_gpt2_conv1d_matches_autograd(side: str, compressor: str) -> None:
    model = tiny_gpt2(VOCAB).double()
    config = GraSSConfig(compressor=compressor, proj_dim=16, target_modules=EVERY)
    check_against_autograd(model, config, random_token_examples(4, VOCAB, seed=1), side)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("compressor", ["sjlt", "grass", "factgrass"])
def test_llama_linear_matches_autograd(side: str, compressor: str) -> None:
    model = tiny_llama(VOCAB).double()
    config = GraSSConfig(compressor=compressor, proj_dim=16, target_modules=EVERY)
    computer = check_against_autograd(model, config, random_token_examples(4, VOCAB, seed=2), side)
    kinds = {t.name: t.kind for t in computer.targets}
    assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "linear"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("compressor", ["random", "factgrass", "logra"])
def test_tied_embeddings_match_autograd(side: str, compressor: str) -> None:
    """GPT-2 with tied input/output embeddings: the one parameter's gradient has both uses."""
    model = tiny_gpt2(VOCAB, tie=True).double()
    config = GraSSConfig(compressor=compressor, proj_dim=16, target_modules=EVERY)
    computer = check_against_autograd(model, config, random_token_examples(4, VOCAB, seed=6), side)
    head = next(t for t in computer.targets if t.name == "lm_head")
    assert head.tied is model.transformer.wte and "transformer.wte" not in computer.module_names
    assert "transformer.wpe" in computer.module_names  # the position embedding is a target of its own


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_experts_match_autograd(family: str, side: str) -> None:
    """Each expert's slice of the 3-D weights, and the router, of Mixtral / OLMoE / Qwen3-MoE
    (float64 needs the eager experts: torch's grouped_mm has no float64 CPU kernel)."""
    model = tiny_moe(family, VOCAB, implementation="eager").double()
    config = GraSSConfig(compressor="factgrass", proj_dim=16, target_modules=EVERY)
    computer = check_against_autograd(model, config, random_token_examples(4, VOCAB, seed=7), side)
    kinds = [t.kind for t in computer.targets]
    assert kinds.count("expert") == 2 * 2 * 4 and kinds.count("router") == 2  # layers x (up, down) x experts


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_moe_implementations_match_autograd(implementation: str) -> None:
    """The implementation transformers picks on a CPU (grouped_mm, float32 only) and batched_mm."""
    model = tiny_moe("mixtral", VOCAB, implementation=implementation)
    model = model if implementation == "grouped_mm" else model.double()
    check_against_autograd(
        model, GraSSConfig(compressor="factgrass", proj_dim=16), random_token_examples(3, VOCAB, seed=8), "left"
    )
    assert tiny_moe("mixtral", VOCAB).config._experts_implementation == "grouped_mm"  # the CPU default


@pytest.mark.parametrize("compressor", ["random", "logra", "grass"])
def test_moe_other_compressors_match_autograd(compressor: str) -> None:
    model = tiny_moe("qwen3_moe", VOCAB, implementation="eager").double()
    config = GraSSConfig(compressor=compressor, proj_dim=16)
    check_against_autograd(model, config, random_token_examples(3, VOCAB, seed=9), "right")


def test_mean_reduction_matches_autograd() -> None:
    model = tiny_llama(VOCAB).double()
    config = GraSSConfig(compressor="mask", proj_dim=16, loss_reduction="mean")
    check_against_autograd(model, config, random_token_examples(3, VOCAB, seed=3), "right")


def test_fjlt_matches_autograd() -> None:
    model = tiny_gpt2(VOCAB).double()
    check_against_autograd(
        model, GraSSConfig(compressor="fjlt", proj_dim=16), random_token_examples(2, VOCAB), "right"
    )


def lora_model(seed: int = 0) -> nn.Module:
    peft = pytest.importorskip("peft")
    base = tiny_llama(VOCAB, seed=seed).double()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(base, cfg)


@pytest.mark.parametrize("side", ["right", "left"])
def test_peft_lora_matches_autograd(side: str) -> None:
    model = lora_model()
    targets = find_target_modules(model)
    assert targets and all(".lora_A." in t.name or ".lora_B." in t.name for t in targets)
    assert len(targets) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    check_against_autograd(
        model, GraSSConfig(compressor="factgrass", proj_dim=16), random_token_examples(3, VOCAB), side
    )


def test_padding_and_batch_composition_do_not_matter() -> None:
    """The same example gives the same row alone, in a batch, right- or left-padded."""
    model = tiny_llama(VOCAB).double()
    computer = GradientComputer(model, GraSSConfig(compressor="factgrass", proj_dim=16))
    examples = random_token_examples(5, VOCAB, seed=4)
    with computer.session():
        alone = computer.compute(collate(examples[:1])).rows[0]
        for side in ("right", "left"):
            batched = computer.compute(collate(examples, padding_side=side)).rows[0]
            torch.testing.assert_close(batched, alone, rtol=1e-9, atol=1e-12)


class TwiceMLP(nn.Module):
    """A classifier that calls the same Linear twice per forward (weight sharing)."""

    def __init__(self, width: int = 6, classes: int = 3):
        super().__init__()
        self.shared = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = self.shared(torch.tanh(self.shared(input_ids)))
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def test_module_called_twice_adds_up() -> None:
    torch.manual_seed(0)
    model = TwiceMLP().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    computer = GradientComputer(model, GraSSConfig(compressor="random", proj_dim=8))
    with computer.session():
        rows = computer.compute({"input_ids": x, "labels": y}).rows
    start, stop = computer.offsets["shared"]
    comp = computer.compressors["shared"]
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1])["logits"], y[i : i + 1], reduction="sum").backward()
        g = torch.cat([model.shared.weight.grad, model.shared.bias.grad[:, None]], 1)
        torch.testing.assert_close(
            rows[i, start:stop], comp.compress_gradient(g[None])[0], rtol=RTOL, atol=1e-10
        )


def test_pass_leaves_training_untouched() -> None:
    """No .grad written, flags and mode restored, and the model trains exactly like a pristine copy."""
    model = tiny_gpt2(VOCAB)
    pristine = copy.deepcopy(model)
    model.train()
    model.transformer.wte.weight.requires_grad_(False)  # a user's frozen parameter stays frozen
    pristine.transformer.wte.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    computer = GradientComputer(model, GraSSConfig(compressor="factgrass", proj_dim=16))
    batch = collate(random_token_examples(3, VOCAB))
    with computer.session():
        computer.compute(batch, CaptureRequest(rows=True, factor_grads=True, covariances=True))
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())
    torch.manual_seed(5)
    model(**batch).loss.backward()
    torch.manual_seed(5)
    pristine(**batch).loss.backward()
    for (name, p), q in zip(model.named_parameters(), pristine.parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_targeting_rules() -> None:
    model = tiny_gpt2(VOCAB)
    names = [t.name for t in find_target_modules(model)]
    assert "lm_head" in names and "transformer.h.0.attn.c_attn" in names
    only = find_target_modules(model, ["c_attn"])
    assert [t.name for t in only] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    regex = find_target_modules(model, r"transformer\.h\.1\..*")
    assert all(t.name.startswith("transformer.h.1.") for t in regex) and len(regex) == 4
    excluded = find_target_modules(model, exclude_modules=["lm_head"])
    assert "lm_head" not in [t.name for t in excluded]
    conv = find_target_modules(model, ["c_fc"])[0]
    assert conv.transposed and conv.bias and (conv.d_out, conv.d_in) == (128, 33)
    with pytest.raises(ValueError, match="Candidates: .*c_attn"):
        find_target_modules(model, ["q_proj"])
    with pytest.raises(ValueError, match="unsupported modules"):
        find_target_modules(model, ["ln_f"])
    with pytest.raises(ValueError, match="no module left"):
        find_target_modules(model, ["lm_head"], exclude_modules=["lm_head"])


@pytest.mark.parametrize("width", [7, 255, 256, 257, 1000, 1537])
def test_gram_equals_the_full_product(width: int) -> None:
    from hf_grass.precondition.warmup import gram

    t = torch.randn(300, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    torch.testing.assert_close(gram(t), t.T @ t, rtol=1e-12, atol=1e-10)


def test_warm_up_covariances_equal_brute_force() -> None:
    """The warm-up's full-space sums ``x x^T`` (bias column included) and ``delta delta^T`` over the
    real tokens of a padded batch, for widths that take the blocked ``gram`` (>= 256)."""
    model = tiny_llama(VOCAB, hidden=264).double()
    config = GraSSConfig(proj_dim=16, dtype="float32")
    computer = GradientComputer(model, config)
    examples = random_token_examples(3, VOCAB, seed=4)
    batch = collate(examples, padding_side="left")
    seen: dict[str, list[torch.Tensor]] = {"x": [], "delta": []}
    target = next(t for t in computer.targets if t.name.endswith("layers.1.self_attn.q_proj"))

    def remember(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["x"].append(inputs[0].detach())
        output.register_hook(lambda grad: seen["delta"].append(grad.detach()))

    handle = target.module.register_forward_hook(remember)
    sums = WarmupCovariances(module_widths(computer.compressors))
    with computer.session():
        computer.compute(batch, CaptureRequest(rows=False, full_covariances=sums))
    handle.remove()
    real = batch["attention_mask"].bool()
    x, delta = seen["x"][0][real], seen["delta"][0][real]
    if target.bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    assert x.shape[1] >= 256 and delta.shape[1] >= 256
    torch.testing.assert_close(sums.input_covariance(target.name), x.T @ x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sums.output_covariance(target.name), delta.T @ delta, rtol=1e-10, atol=1e-10)
    assert sums.tokens[target.name] == int(real.sum())
    # modules that read one input keep ONE sum of it (issue 18 item 1): q, k and v share theirs, and
    # the sums hold one input covariance per distinct input, not per module
    layer = target.name.rpartition(".")[0]
    for other in ("k_proj", "v_proj"):
        assert sums.input_covariance(f"{layer}.{other}") is sums.input_covariance(target.name)
    assert len(sums.inputs) < len(sums.outputs) == len(computer.targets)
