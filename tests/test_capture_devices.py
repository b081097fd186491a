"""The pass builds no KV cache, and each compressor lives on its module's device (``device_map``)."""

from __future__ import annotations

import pytest
import torch
from test_capture import VOCAB

from hf_grass.capture import GradientComputer
from hf_grass.capture import engine as capture_engine
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.kernels import SJLTMap
from hf_grass.testing import random_token_examples, tiny_llama

CONFIG = GraSSConfig(compressor="factgrass", proj_dim=16)


def test_the_pass_builds_no_kv_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A counting DynamicCache: a plain forward of the model builds one, the pass none."""
    from transformers.models.llama import modeling_llama

    built: list[int] = []

    class CountingCache(modeling_llama.DynamicCache):
        def __init__(self, *args: object, **kwargs: object):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(modeling_llama, "DynamicCache", CountingCache)
    model = tiny_llama(VOCAB).eval()
    batch = collate(random_token_examples(3, VOCAB))
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert len(built) == 1  # the spy sees the cache a forward builds by default
    computer = GradientComputer(model, CONFIG)
    with computer.session():
        computer.compute(batch)
    assert len(built) == 1


def _devices(compressor: object) -> set[str]:
    """The devices of a compressor's tensors and SJLT maps."""
    found = set()
    for value in vars(compressor).values():
        if isinstance(value, torch.Tensor):
            found.add(value.device.type)
        elif isinstance(value, SJLTMap):
            found.update({value.rows.device.type, value.signs.device.type})
    return found


def test_each_compressor_lives_on_its_modules_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model spread over two devices (the second faked: layer 1 reports 'meta', where tensors
    have shapes but no values): every compressor goes where its module is."""
    real = capture_engine.target_device

    def spread(target: object) -> torch.device:
        device = real(target)  # type: ignore[arg-type]
        return torch.device("meta") if ".layers.1." in target.name else device  # type: ignore[attr-defined]

    monkeypatch.setattr(capture_engine, "target_device", spread)
    computer = GradientComputer(tiny_llama(VOCAB), CONFIG)
    for t in computer.targets:
        want = "meta" if ".layers.1." in t.name else "cpu"
        comp = computer.compressors[t.name]
        assert comp.device.type == want and _devices(comp) == {want}, t.name
    assert computer.device == torch.device("cpu")  # inputs and rows: the first parameter's device


def test_a_module_on_the_meta_device_is_refused() -> None:
    """accelerate's CPU/disk offload leaves weights on 'meta' between forwards: refused, named."""
    model = tiny_llama(VOCAB)
    model.model.layers[1].mlp.down_proj.to("meta")
    with pytest.raises(
        ValueError, match=r"'model\.layers\.1\.mlp\.down_proj' has its weight on the meta device"
    ):
        GradientComputer(model, CONFIG)
