"""Builds a gradient cache slowly, so tests/test_reliability.py can SIGKILL it at random moments.

No transformers import (a plain torch LM) so that each of the many restarts is quick.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from hf_grass.attribution import AttributionPass
from hf_grass.capture import GradientComputer
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource

VOCAB = 30
N_EXAMPLES = 36


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 24)
        self.head = nn.Linear(24, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        h = torch.tanh(self.hidden(self.embed(input_ids)))
        return {"logits": self.head(h)}


class SlowData:
    """Deterministic examples, each read with a small delay so a run lasts a few seconds."""

    def __init__(self, delay: float):
        gen = torch.Generator().manual_seed(1)
        self.rows = [{"input_ids": torch.randint(0, VOCAB, (int(n),), generator=gen).tolist()}
                     for n in torch.randint(3, 9, (N_EXAMPLES,), generator=gen)]  # fmt: skip
        self.delay = delay

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay)
        return self.rows[i]


def config() -> GraSSConfig:
    return GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=3, ekfac_sample_size=9)


def build(path: str, delay: float = 0.0, verify_existing: bool = False) -> None:
    computer = GradientComputer(TinyLM(), config())
    AttributionPass(computer, ExampleSource(SlowData(delay)), path, batch_size=2, disable_progress=True).run(
        verify_existing=verify_existing
    )


if __name__ == "__main__":
    build(sys.argv[1], float(sys.argv[2]))
