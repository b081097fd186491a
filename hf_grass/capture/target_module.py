"""`TargetModule`: one weight matrix whose per-example gradient is captured.

Every target is a linear map of some input, so its per-example gradient is ``sum_t delta_t x_t^T``
(DESIGN.md §2). ``kind`` says where the hooks find the two factors:

- ``"linear"``: ``nn.Linear``, HF ``Conv1D`` (``transposed``) and PEFT LoRA A/B: the module's input
  and its output's gradient. With ``tied`` (an ``nn.Embedding`` that shares this Linear's weight,
  e.g. GPT-2's and SmolLM2's ``lm_head``), the embedding's use adds its own outer products to the same
  gradient (``capture/embedding.py``).
- ``"embedding"``: ``nn.Embedding``, the linear map ``y = W^T e_id`` of a one-hot input; ``d_in`` is
  the vocabulary and the weight is stored transposed (``[vocab, hidden]``).
- ``"expert"``: expert ``index`` of a transformers-5 MoE experts module, whose weights are 3-D
  parameters (``parameter`` names one: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``); the
  inputs and output gradients are those of the tokens routed to that expert (``capture/experts.py``).
- ``"router"``: an MoE router (``F.linear`` of the flattened tokens, logits first in its output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("linear", "embedding", "expert", "router")


@dataclass(frozen=True)
class TargetModule:
    """A weight whose per-example gradient is captured.

    ``d_in`` counts the bias column (the input gets a trailing 1 when ``bias``). ``transposed`` marks
    a weight stored ``[d_in, d_out]`` (HF ``Conv1D``, ``nn.Embedding``, transposed experts); captured
    gradients always follow the ``[d_out, d_in]`` convention of ``nn.Linear``.
    """

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    bias: bool
    transposed: bool
    kind: str = "linear"
    parameter: str = "weight"  # the weight's attribute on ``module`` ("gate_up_proj" of experts)
    index: int | None = None  # the expert: the slice of a 3-D ``parameter``
    tied: nn.Module | None = None  # an nn.Embedding sharing this Linear's weight (both uses captured)
    tied_name: str | None = None  # that embedding's name

    @property
    def weight_parameter(self) -> nn.Parameter:
        """The parameter that holds the weight (all experts' weights for an expert)."""
        return getattr(self.module, self.parameter)

    @property
    def bias_parameter(self) -> nn.Parameter | None:
        if not self.bias:
            return None
        return getattr(self.module, "bias" if self.parameter == "weight" else f"{self.parameter}_bias")

    def weight_of(self, full: torch.Tensor) -> torch.Tensor:
        """This target's slice of a tensor shaped like ``weight_parameter`` (the weight itself, or
        its ``.grad``)."""
        return full if self.index is None else full[self.index]

    def covered(self) -> list[tuple[nn.Parameter, int]]:
        """``(parameter, numbers of it)`` that this target's gradient holds: the weight (its expert's
        slice for an expert) and the bias."""
        out = []
        for p in (self.weight_parameter, self.bias_parameter):
            if p is not None:
                shape = tuple(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition: the full shape
                out.append((p, math.prod(shape if self.index is None else shape[1:])))
        return out
