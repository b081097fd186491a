"""``nn.Embedding``, and input embeddings tied to the output layer.

An embedding is the linear map ``y_t = W^T e_{id_t}`` of a one-hot input (``W [vocab, hidden]``), so
its per-example gradient in the ``[d_out, d_in]`` convention is ``sum_t delta_t e_{id_t}^T``
(``d_in`` = vocab): a target like any Linear, whose input side is a ``kernels.onehot.OneHot`` of the
token ids. Compressors gather from it (mask columns, eigenvector rows, hash buckets); no
``[tokens, vocab]`` one-hot is ever built.

**Tied embeddings** (``tie_word_embeddings=True``: GPT-2, SmolLM2, ...): the output layer
``lm_head`` (``Linear(hidden -> vocab)``, weight ``[vocab, hidden]``) and the input embedding share one
parameter, so that parameter's per-example gradient is the sum of both uses::

    G = sum_t dlogits_t h_t^T  +  sum_s e_{id_s} dE_s^T          ([vocab, hidden])

The second term is an outer-product sum too, with the one-hot on the *output* (vocab) side and the
embedding's output gradient ``dE_s`` on the input (hidden) side. Both uses are captured into the one
target named after the output layer: the embedding's hook adds ``(x = dE, delta = OneHot(ids))`` to
it, so its factor space holds the parameter's whole gradient, cross terms included. (Two targets,
one per use, would drop the cross terms of the parameter's inner products.)

Embeddings are opt-in targets (``targets.default_targets``: they lowered bench-dev's rankings under
the default EK-FAC); naming the input embedding in ``target_modules`` selects the tied pair.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hf_grass.capture.target_module import TargetModule
from hf_grass.kernels.onehot import OneHot


class Contributions(Protocol):
    """What the embedding hooks need of the capture (``hooks.GradientCapture``)."""

    token_mask: torch.Tensor | None
    batch_size: int | None

    def contribute(self, target: TargetModule, x: torch.Tensor | OneHot, delta: torch.Tensor | OneHot,
                   token_mask: torch.Tensor | None) -> None: ...  # fmt: skip


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def embedding_problem(module: nn.Embedding) -> str | None:
    """Why an embedding's gradient is not ``sum_t delta_t e_{id_t}^T`` of its output gradient, or None."""
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq=True scales its gradient by the batch's token counts"
    if module.max_norm is not None:
        return "max_norm renormalises the rows it reads during the forward"
    if type(module).forward is not nn.Embedding.forward:
        return f"{type(module).__name__} computes its own forward (e.g. a scaled embedding)"
    return None


def describe_embedding(name: str, module: nn.Embedding) -> TargetModule:
    """``d_in`` = vocabulary (one-hot inputs), ``d_out`` = embedding width; stored transposed."""
    return TargetModule(name, module, int(module.num_embeddings), int(module.embedding_dim), False, True,
                        kind="embedding")  # fmt: skip


def tie_problem(output_layer: TargetModule) -> str | None:
    """Why an embedding's use cannot be added to the output layer it is tied to, or None."""
    if output_layer.kind != "linear" or output_layer.transposed:
        return f"its tied output layer {output_layer.name} is not an nn.Linear"
    if output_layer.bias:
        return f"its tied output layer {output_layer.name} has a bias, which the embedding does not share"
    return None


def install(capture: Contributions, targets: list[TargetModule]) -> list[RemovableHandle]:
    """Hooks on every embedding ``targets`` names, and on the input embedding of a tied output layer."""
    handles = []
    for t in targets:
        if t.kind == "embedding":
            hooks = EmbeddingHooks(capture, t, tied=False)
            handles.append(t.module.register_forward_hook(hooks.forward))
        elif t.tied is not None:
            hooks = EmbeddingHooks(capture, t, tied=True)
            handles.append(t.tied.register_forward_hook(hooks.forward))
    return handles


class EmbeddingHooks:
    """One embedding's use of a target's weight: its own (``tied=False``), or the output layer's."""

    def __init__(self, capture: Contributions, target: TargetModule, tied: bool):
        self.capture, self.target, self.tied = capture, target, tied

    def forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        onehot = self.one_hot(module, inputs[0])
        replaced = None
        if not output.requires_grad:  # the start of the graph (every parameter is frozen)
            output = replaced = output.detach().requires_grad_(True)
        output.register_hook(functools.partial(self.backward, onehot, self.capture.token_mask))
        return replaced

    def one_hot(self, module: nn.Module, ids: torch.Tensor) -> OneHot:
        size = self.capture.batch_size
        if ids.dim() == 1:  # one id per example
            ids = ids.unsqueeze(1)
        if size is not None and ids.shape[0] != size:
            raise ValueError(
                f"{module.__class__.__name__} {self.target.name!r} read ids of shape {tuple(ids.shape)} for a batch "
                f"of {size} examples (e.g. position ids shared by the batch), so its gradient cannot be split per "
                f"example; pass position_ids per example or leave it out: exclude_modules=[{self.target.name!r}]"
            )
        ids = ids.reshape(ids.shape[0], -1).long()
        padding = getattr(module, "padding_idx", None)
        if padding is not None:  # the padding row gets no gradient
            ids = ids.masked_fill(ids == padding, -1)
        return OneHot(ids, int(module.num_embeddings), module.weight.dtype)

    def backward(self, onehot: OneHot, mask: torch.Tensor | None, grad: torch.Tensor) -> None:
        delta = grad.reshape(*onehot.ids.shape, grad.shape[-1])
        if self.tied:  # the output layer's [vocab, hidden] weight: one-hot on its output side
            self.capture.contribute(self.target, delta, onehot, mask)
        else:
            self.capture.contribute(self.target, onehot, delta, mask)
