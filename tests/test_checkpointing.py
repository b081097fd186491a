"""Activation checkpointing under the capture hooks: every way of checkpointing gives the rows of
per-example autograd with batch size 1 on the plain model, or a clear refusal; never silently wrong
rows (zero rows under reentrant checkpointing, other seeds under a wrapper's module names)."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from test_capture import RTOL, VOCAB, autograd_gradient
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_grass.capture import CaptureError, CaptureRequest, GradientCapture, GradientComputer
from hf_grass.capture.hooks import CallCounts
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.precondition.warmup import WarmupCovariances, module_widths
from hf_grass.testing import random_token_examples, tiny_llama

CONFIG = GraSSConfig(compressor="random", proj_dim=8)


def oracle_rows(plain: nn.Module, computer: GradientComputer, examples: list[dict]) -> torch.Tensor:
    """``[n, dim]``: each example's weight gradients from a batch-of-one backward of the model
    without checkpointing, compressed by the computer's compressors (looked up by name)."""
    plain = copy.deepcopy(plain).eval()
    for p in plain.parameters():
        p.requires_grad_(True)
    found = {t.name: t for t in GradientComputer(plain, CONFIG).targets}
    rows = torch.zeros(len(examples), computer.row_dim, dtype=torch.float64)
    for t in computer.targets:
        start, stop = computer.offsets[t.name]
        for i, ex in enumerate(examples):
            g = autograd_gradient(plain, found[t.name], ex)
            rows[i, start:stop] = computer.compressors[t.name].compress_gradient(g[None])[0]
    return rows


def checkpoint_layers(model: nn.Module, fn: Callable) -> None:
    """Run every decoder layer through ``fn(function, *args)`` (a checkpoint function), the way a
    custom model calls torch.utils.checkpoint in its forward."""
    for layer in model.model.layers:
        forward = layer.forward

        def checkpointed(*args: object, _forward: Callable = forward, **kwargs: object) -> object:
            return fn(functools.partial(_forward, **kwargs), *args)

        layer.forward = checkpointed


def apply(model: nn.Module, mode: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if mode.startswith("hf"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5: activation_checkpointing_enable
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": mode.endswith("_reentrant")}
            )
    elif mode.startswith("torch"):
        checkpoint_layers(model, functools.partial(checkpoint, use_reentrant=mode.endswith("_reentrant")))
    elif mode.startswith("wrapper"):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        impl = CheckpointImpl.REENTRANT if mode.endswith("_reentrant") else CheckpointImpl.NO_REENTRANT
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl),
            check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
        )
    elif mode.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        from deepspeed.runtime.activation_checkpointing import checkpointing as ds

        checkpoint_layers(
            model, ds.checkpoint if mode.endswith("_reentrant") else ds.non_reentrant_checkpoint
        )
    else:
        raise AssertionError(mode)


def recorded_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, CallCounts]]:
    """Every step's hook-call counts (copied where ``compute`` checks them)."""
    seen: list[dict[str, CallCounts]] = []
    check = GradientCapture.check_calls

    def spy(self: GradientCapture) -> None:
        seen.append(copy.deepcopy(self.calls))
        check(self)

    monkeypatch.setattr(GradientCapture, "check_calls", spy)
    return seen


MODES = [
    "hf_reentrant",
    "hf_non_reentrant",
    "torch_reentrant",
    "torch_non_reentrant",
    "wrapper_reentrant",
    "wrapper_non_reentrant",
    "deepspeed_reentrant",
    "deepspeed_non_reentrant",
]


CASES = [(mode, False) for mode in MODES] + [("hf_reentrant", True), ("hf_non_reentrant", True)]


@pytest.mark.parametrize(("mode", "train_mode"), CASES)
def test_checkpointed_rows_equal_autograd(
    mode: str, train_mode: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of a checkpointed tiny Llama (left-padded batch) = batch-of-one autograd on the plain
    model. ``train``: the model is put back in train mode inside the session, so that HF's own
    checkpointing (off in the pass's eval mode) runs too; the counts show the recompute happened."""
    plain = tiny_llama(VOCAB).double()
    model = copy.deepcopy(plain)
    apply(model, mode)
    examples = random_token_examples(3, VOCAB, seed=2)
    calls = recorded_calls(monkeypatch)
    computer = GradientComputer(model, CONFIG)
    assert computer.module_names == GradientComputer(plain, CONFIG).module_names  # wrapper names stripped
    with computer.session():
        if train_mode:
            model.train()  # tiny_llama has no dropout: train mode changes only the checkpointing
        rows = computer.compute(collate(examples, pad_token_id=0, padding_side="left")).rows
    expected = oracle_rows(plain, computer, examples)
    torch.testing.assert_close(rows, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())
    recomputed = sum(c.recompute for c in calls[0].values())
    if mode.startswith("hf") and not train_mode:
        assert recomputed == 0  # HF checkpoints only in train mode: the pass runs without it
    else:
        assert recomputed > 0, "the checkpoint was not exercised"


def test_warm_up_covariances_under_reentrant_checkpointing() -> None:
    """Full-space covariances (shared between modules reading one input) are the plain model's:
    a recomputed input freed in the backward must not be mistaken for a later one at its address."""
    plain = tiny_llama(VOCAB).double()
    model = copy.deepcopy(plain)
    apply(model, "torch_reentrant")
    batch = collate(random_token_examples(3, VOCAB, seed=4), padding_side="left")
    results = []
    for m in (plain, model):
        computer = GradientComputer(m, CONFIG)
        sums = WarmupCovariances(module_widths(computer.compressors))
        with computer.session():
            computer.compute(batch, CaptureRequest(rows=False, full_covariances=sums))
        results.append(sums)
    want, got = results
    assert want.input_of == got.input_of and want.outputs.keys() == got.outputs.keys()
    for name in want.input_of:
        torch.testing.assert_close(got.input_covariance(name), want.input_covariance(name), rtol=1e-10, atol=1e-10,
                                   msg=f"input {name}")  # fmt: skip
        torch.testing.assert_close(got.output_covariance(name), want.output_covariance(name), rtol=1e-10,
                                   atol=1e-10, msg=f"output {name}")  # fmt: skip


class CheckpointedMLP(nn.Module):
    """A classifier MLP on float features (no input embeddings) whose hidden block runs under
    reentrant checkpointing: the block's input is a constant during the pass, so the backward
    never reaches it."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        block = lambda x: torch.tanh(self.hidden(x))  # noqa: E731
        h = checkpoint(block, input_ids, use_reentrant=self.reentrant)
        return {"logits": self.head(h)}


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpoint_without_input_embeddings_is_refused() -> None:
    torch.manual_seed(0)
    batch = {"input_ids": torch.randn(3, 4, dtype=torch.float64), "labels": torch.tensor([0, 2, 1])}
    computer = GradientComputer(CheckpointedMLP(reentrant=True).double(), CONFIG)
    with (
        computer.session(),
        pytest.raises(CaptureError, match=r"module 'hidden'.*reentrant activation checkpointing"),
    ):
        computer.compute(batch)
    # the same block under non-reentrant checkpointing is exact: per-example autograd, batch of one
    model = CheckpointedMLP(reentrant=False).double()
    computer = GradientComputer(model, CONFIG)
    with computer.session():
        rows = computer.compute(batch).rows
    start, stop = computer.offsets["hidden"]
    for i in range(3):
        model.zero_grad()
        logits = model(batch["input_ids"][i : i + 1])["logits"]
        F.cross_entropy(logits, batch["labels"][i : i + 1], reduction="sum").backward()
        g = torch.cat([model.hidden.weight.grad, model.hidden.bias.grad[:, None]], 1)
        want = computer.compressors["hidden"].compress_gradient(g[None])[0]
        torch.testing.assert_close(rows[i, start:stop], want, rtol=RTOL, atol=1e-12)


class UnusedBranch(nn.Module):
    """A classifier with a Linear whose output the loss never reads (its gradient is zero)."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        self.unused(input_ids)
        return {"logits": self.used(input_ids)}


def test_a_forward_the_loss_does_not_read_gives_a_zero_row() -> None:
    torch.manual_seed(0)
    computer = GradientComputer(UnusedBranch().double(), CONFIG)
    batch = {"input_ids": torch.randn(2, 4, dtype=torch.float64), "labels": torch.tensor([0, 2])}
    with computer.session():
        rows = computer.compute(batch).rows
    start, stop = computer.offsets["unused"]
    assert torch.equal(rows[:, start:stop], torch.zeros(2, stop - start, dtype=rows.dtype))
    assert rows[:, slice(*computer.offsets["used"])].abs().sum() > 0


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        (CallCounts(forward=1, recompute=1, backward=2), "2 output gradients for 1 forward calls"),
        (CallCounts(no_grad=1, backward=0), "with gradients disabled"),
        (CallCounts(forward=1, no_grad=1, backward=1), "with gradients disabled"),
        (CallCounts(forward=2, recompute=2, backward=1), "recomputed in the backward"),
    ],
)
def test_call_counts_that_do_not_add_up_raise(counts: CallCounts, match: str) -> None:
    capture = GradientCapture([], {})
    capture.calls = {"layer.q_proj": counts}
    with pytest.raises(CaptureError, match=rf"module 'layer.q_proj'.*{match}"):
        capture.check_calls()


@pytest.mark.parametrize(
    "counts",
    [
        CallCounts(forward=2, backward=2),  # a module called twice (weight sharing)
        CallCounts(forward=1, backward=0),  # an output the loss does not read
        CallCounts(forward=1, recompute=1, backward=1),  # non-reentrant checkpointing
        CallCounts(no_grad=1, recompute=1, backward=1),  # reentrant checkpointing
    ],
)
def test_call_counts_that_add_up_pass(counts: CallCounts) -> None:
    capture = GradientCapture([], {})
    capture.calls = {"layer.q_proj": counts}
    capture.check_calls()
