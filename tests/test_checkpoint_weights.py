"""``checkpoint_weights``: a cache's checkpoint swapped into the model in place and restored bit for
bit, with the current weights waiting on the host (one copy, never a clone on the model's device),
and a clear refusal under ZeRO-3."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_grass.capture import find_target_modules, weights_fingerprint
from hf_grass.checkpoints import HOST, checkpoint_weights, restore, swap_in_checkpoint
from hf_grass.testing import tiny_gpt2

VOCAB = 40


class AllocationSpy(TorchDispatchMode):
    """Records every op that makes a new tensor from another: clones and copies to a device."""

    def __init__(self) -> None:
        super().__init__()
        self.clones: list[int] = []
        self.copies: list[tuple[str, int]] = []  # (device, bytes) of each .to(..., copy=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.clone.default:
            self.clones.append(out.nbytes)
        elif func is torch.ops.aten._to_copy.default:
            self.copies.append((out.device.type, out.nbytes))
        return out


def cache_of(model: torch.nn.Module, checkpoint: Path) -> SimpleNamespace:
    """What ``checkpoint_weights`` reads of a cache built with ``model`` saved at ``checkpoint``."""
    targets = find_target_modules(model)
    return SimpleNamespace(
        path=checkpoint.parent / "cache",
        module_names=[t.name for t in targets],
        model_info={"weights_sha256": weights_fingerprint(model, targets), "checkpoint": str(checkpoint)},
    )


def test_checkpoint_swapped_in_place_and_restored_bit_identically(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB, seed=0, tie=True)  # tied: lm_head shares the embedding's storage
    trained = tiny_gpt2(VOCAB, seed=1, tie=True)
    trained.save_pretrained(tmp_path / "checkpoint-1")  # safetensors, the tied copy left out
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    with checkpoint_weights(model, cache_of(trained, tmp_path / "checkpoint-1")):
        for key, value in trained.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == storage  # copied into place
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == storage


def test_the_swap_keeps_one_host_copy_and_clones_nothing(tmp_path: Path) -> None:
    """The old swap cloned the whole state dict on the model's device; this one copies each replaced
    tensor once, to the host, and restores from there in place."""
    model = tiny_gpt2(VOCAB, seed=0, tie=True)
    trained = tiny_gpt2(VOCAB, seed=1, tie=True)
    trained.save_pretrained(tmp_path / "checkpoint-1")
    replaced = sum(t.nbytes for t in trained.state_dict().values()) - trained.lm_head.weight.nbytes
    with AllocationSpy() as spy:
        saved = swap_in_checkpoint(model, tmp_path / "checkpoint-1")
    assert not spy.clones
    assert {device for device, _ in spy.copies} == {HOST.type}
    assert sum(size for _, size in spy.copies) == replaced
    assert all(t.device == HOST for t in saved.values())
    with AllocationSpy() as spy:
        restore(model, saved)
    assert not spy.clones and not spy.copies


def test_the_same_weights_need_no_checkpoint(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB, seed=0)
    with checkpoint_weights(model, cache_of(model, tmp_path / "nowhere")):  # no directory: not read
        pass


def test_zero3_partitioned_parameters_are_refused(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB, seed=0)
    trained = tiny_gpt2(VOCAB, seed=1)
    trained.save_pretrained(tmp_path / "checkpoint-1")
    cache = cache_of(trained, tmp_path / "checkpoint-1")
    model.transformer.wte.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with (
        pytest.raises(ValueError, match="ZeRO-3 partitions this model's parameters"),
        checkpoint_weights(model, cache),
    ):
        pass
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_checkpoint_that_does_not_fit_changes_nothing(tmp_path: Path) -> None:
    model = tiny_gpt2(VOCAB, seed=0)
    wider = tiny_gpt2(VOCAB, seed=1, n_embd=48)
    wider.save_pretrained(tmp_path / "checkpoint-1")
    cache = cache_of(wider, tmp_path / "checkpoint-1")
    cache.module_names = [t.name for t in find_target_modules(model)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="other shapes than the model's"), checkpoint_weights(model, cache):
        pass
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_peft_adapter_checkpoint_is_swapped_and_restored(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    def lora(seed: int) -> torch.nn.Module:
        base = tiny_gpt2(VOCAB, seed=0)
        torch.manual_seed(seed)  # the adapters' random initialisation
        cfg = peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
        return peft.get_peft_model(base, cfg)

    model, trained = lora(1), lora(2)
    trained.save_pretrained(tmp_path / "checkpoint-1")  # adapter_model.safetensors
    lora_weights = lambda m: {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}  # noqa: E731
    before, wanted = lora_weights(model), lora_weights(trained)
    assert not all(torch.equal(before[n], wanted[n]) for n in before)
    with checkpoint_weights(model, cache_of(trained, tmp_path / "checkpoint-1")):
        inside = lora_weights(model)
        assert all(torch.equal(inside[n], wanted[n]) for n in wanted)
    after = lora_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
