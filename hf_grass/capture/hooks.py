"""Hooks that turn one forward/backward into per-example compressed gradients.

A forward hook keeps the module's detached input and registers a hook on the output tensor; when
the output gradient ``delta`` arrives in the backward pass, the per-example compressed gradient is
computed right away and the input reference is dropped, so activations are freed as early as in a
normal backward. Parameter gradients are never touched: nothing is written to ``param.grad`` and
the forward's output is returned unchanged (or, when it does not require grad, as a detached leaf
that does, so that the backward reaches this module even with every parameter frozen).

A module called several times in one forward adds up its contributions, which is exact because the
gradient is a sum over calls and every compressor is linear. The targets that are not a module's
own input and output (embeddings and their tied use, MoE experts and routers) have their hooks in
``capture/embedding.py`` and ``capture/experts.py``, which hand each use's factors to ``contribute``.


Every call is counted (``CallCounts``), so that a forward whose gradient never reached the hooks, or
reached them twice, raises instead of giving a silently wrong row. Activation checkpointing is what
does this: it runs forwards without gradients (reentrant: ``torch.utils.checkpoint(use_reentrant=True)``,
DeepSpeed's) and runs them again during the backward. Both kinds give exact rows here: a forward
recomputed in the backward is captured like any other; under non-reentrant checkpointing only the
original forward's output gradient arrives (the recompute only refills saved tensors).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hf_grass.capture import embedding, experts
from hf_grass.capture.targets import TargetModule
from hf_grass.compressors.base import Compressor, FactorisedCompressor
from hf_grass.kernels.onehot import OneHot, factor_product
from hf_grass.precondition.warmup import WarmupCovariances


def as_3d(t: torch.Tensor) -> torch.Tensor:
    """``[B, ..., d]`` -> ``[B, T, d]`` (a 2-D ``[B, d]`` input is one token per example)."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    return t.reshape(t.shape[0], -1, t.shape[-1])


@dataclass
class CaptureRequest:
    """What the hooks compute for the current batch."""

    rows: bool = True  # compressed per-example gradients [B, k] per module
    factor_grads: bool = False  # factor-space per-example gradients [B, m_out, m_in] (factorised only)
    # per-example gradients with each hashed (wide) side in its own coordinates [B, c_out, c_in], for
    # the modules whose compressor hashes a side (EK-FAC's per-coordinate moments, exact norms, queries)
    curvature_grads: bool = False
    covariances: bool = False  # token sums of x' x'^T and delta' delta'^T in factor space (float64)
    # the warm-up's full-space covariance sums (``precondition.warmup.WarmupCovariances``): the hooks
    # add each batch into them as the backward runs
    full_covariances: WarmupCovariances | None = None
    # with factor_grads too: project the rows from G' (cheaper) rather than compress() them; False
    # keeps the rows exactly what compress() gives (e.g. the fused kernel) when G' is only needed
    # for the rows' norms
    rows_from_factors: bool = True
    # the per-token factors themselves (x'_t, delta'_t) [B, T, m_in], [B, T, m_out] per module, of which
    # factor_grads is the sum over tokens (with curvature_grads, a hashed module's are in curvature
    # coordinates): token-level attribution (``hf_grass.scoring.tokens``), for a few examples at a time
    token_factors: bool = False


@dataclass
class CallCounts:
    """One module's hook calls in one step (forward + backward of a batch)."""

    forward: int = 0  # forwards in the step's forward phase with gradients on (a hook is registered)
    no_grad: int = 0  # forwards in the forward phase with gradients off (reentrant checkpointing)
    recompute: int = 0  # forwards run again during the backward (activation checkpointing)
    backward: int = 0  # output gradients received


class CaptureError(ValueError):
    """A module's hook calls do not add up: its row would be wrong (e.g. activation checkpointing)."""


# what a refusal tells the user to do
_CHECKPOINT_FIX = (
    "Run the pass without activation checkpointing (model.gradient_checkpointing_disable(), or the model "
    "without its checkpoint wrapper), or checkpoint with torch.utils.checkpoint(..., use_reentrant=False)."
)


@dataclass
class CaptureState:
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    factor_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    curvature_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    cov_in: dict[str, torch.Tensor] = field(default_factory=dict)
    cov_out: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    token_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class GradientCapture:
    """Context manager that installs the capture hooks on the target modules.

    Set ``request``, ``token_mask`` (``[B, T]`` bool, the tokens whose inputs count in the
    covariances) and ``batch_size`` (how MoE layers split their flattened tokens into examples)
    before each forward, read ``state`` after the backward, and ``reset()`` in between.
    """

    def __init__(self, targets: list[TargetModule], compressors: dict[str, Compressor]):
        self.targets = targets
        self.compressors = compressors
        self.request = CaptureRequest()
        self.token_mask: torch.Tensor | None = None
        self.batch_size: int | None = None
        self.state = CaptureState()
        self._handles: list[RemovableHandle] = []
        # "forward" / "backward" while GradientComputer.compute runs a step; None otherwise (e.g.
        # generation under the hooks), when nothing is counted
        self.phase: str | None = None
        self.calls: dict[str, CallCounts] = {}

    # ---- lifecycle ------------------------------------------------------------------------------

    def attach(self) -> GradientCapture:
        if self._handles:
            raise RuntimeError("GradientCapture is already attached")
        for target in self.targets:
            if target.kind == "linear":
                hook = functools.partial(self._forward_hook, target)
                self._handles.append(target.module.register_forward_hook(hook))
        self._handles += embedding.install(self, self.targets) + experts.install(self, self.targets)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GradientCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        self.state = CaptureState()
        self.calls = {}

    def check_calls(self) -> None:
        """Raise ``CaptureError`` for a module whose forwards and output gradients do not match.

        A forward whose output the loss does not use legitimately gets no gradient (a zero row), so
        fewer gradients than forwards is only an error where checkpointing was seen: a forward that
        ran without gradients, or a recompute while an original forward's gradient was missing.
        """
        for name, c in self.calls.items():
            ran = c.forward + c.no_grad
            if c.backward > ran:
                raise CaptureError(
                    f"module {name!r} received {c.backward} output gradients for {ran} forward calls in one step: "
                    "a recomputed forward's gradient was captured as well as the original's (an activation "
                    f"checkpointing implementation that back-propagates through its recompute). {_CHECKPOINT_FIX}"
                )
            if c.no_grad and c.backward < ran:
                raise CaptureError(
                    f"module {name!r} ran {c.no_grad} of its {ran} forward calls with gradients disabled and only "
                    f"{c.backward} output gradients reached it, so its row would be wrong (zero). This is "
                    "reentrant activation checkpointing (torch.utils.checkpoint(use_reentrant=True), DeepSpeed's "
                    "checkpointing, checkpoint_wrapper(checkpoint_impl=CheckpointImpl.REENTRANT)) whose inputs "
                    "do not require grad: the backward never reaches the checkpointed block (the pass makes the "
                    "output of model.get_input_embeddings() require grad, which covers blocks fed from the input "
                    f"embeddings). {_CHECKPOINT_FIX} If the module runs under torch.no_grad() on purpose, leave "
                    "it out with GraSSConfig(exclude_modules=[...])."
                )
            if c.recompute and c.backward < c.forward:
                raise CaptureError(
                    f"module {name!r} was recomputed in the backward (activation checkpointing) but only "
                    f"{c.backward} of its {c.forward} forward calls' output gradients reached it, so its row "
                    f"would be wrong. {_CHECKPOINT_FIX}"
                )

    def _count(self, name: str) -> CallCounts:
        counts = self.calls.get(name)
        if counts is None:
            counts = self.calls[name] = CallCounts()
        return counts

    # ---- hooks ----------------------------------------------------------------------------------

    def _forward_hook(
        self, target: TargetModule, module: nn.Module, inputs: tuple, output: torch.Tensor
    ) -> torch.Tensor | None:
        phase = self.phase
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            if phase == "forward":  # gradients switched off inside the model's forward
                self._count(target.name).no_grad += 1
            return None  # e.g. generation under no_grad: nothing to capture
        if phase is not None:
            counts = self._count(target.name)
            if phase == "backward":  # a checkpointed block run again to recompute its activations
                counts.recompute += 1
            else:
                counts.forward += 1
        replaced = None
        if not output.requires_grad:
            # every parameter is frozen during the pass, so the first captured module's output is
            # not part of any graph yet: make it a leaf that requires grad (the backward then stops
            # here, which is exactly the work needed)
            output = replaced = output.detach().requires_grad_(True)
        x = inputs[0].detach()
        output.register_hook(functools.partial(self._backward_hook, target, x))
        return replaced

    def _backward_hook(self, target: TargetModule, x: torch.Tensor, delta: torch.Tensor) -> None:
        if self.phase is not None:
            self._count(target.name).backward += 1
        self.contribute(target, as_3d(x), as_3d(delta), self.token_mask)

    def contribute(
        self,
        target: TargetModule,
        x3: torch.Tensor | OneHot,
        d3: torch.Tensor | OneHot,
        token_mask: torch.Tensor | None,
    ) -> None:
        """Add one use's factors, inputs ``[B, T, d_in(-1)]`` and output gradients ``[B, T, d_out]``
        (either may be one-hot), to what ``request`` asks of ``target``; ``token_mask`` ``[B, T]``
        marks the tokens that count in the covariances."""
        compressor = self.compressors[target.name]
        request, state = self.request, self.state
        if request.full_covariances is not None:
            request.full_covariances.add(target.name, x3, d3, token_mask)
        factor_grad = None
        if request.factor_grads or request.covariances or request.curvature_grads or request.token_factors:
            if not isinstance(compressor, FactorisedCompressor):
                raise TypeError(f"{compressor.name} has no factor space (needed for kfac/ekfac and token scores)")
            # per-token factors are kept in the space of the module's gradient: curvature coordinates
            # where a hashed side's are asked for, else the factor space
            tokens_pending = request.token_factors
            if request.curvature_grads and getattr(compressor, "hashed", False):
                xc, dc = compressor.curvature_factors(x3, d3)  # type: ignore[attr-defined]
                if tokens_pending:  # per-token factors are explicit rows (a one-hot side made dense)
                    _accumulate_tokens(state.token_factors, target.name, _dense(xc), _dense(dc))
                    tokens_pending = False
                curvature = factor_product(xc, dc)
                _accumulate(state.curvature_grads, target.name, curvature)
                if request.factor_grads:  # the factor space from it: no second pass over the tokens
                    factor_grad = compressor.to_factor_space(curvature)  # type: ignore[attr-defined]
                    _accumulate(state.factor_grads, target.name, factor_grad)
            if (request.factor_grads and factor_grad is None) or request.covariances or tokens_pending:
                xs, ds = compressor.factors(x3, d3)
                if tokens_pending:
                    _accumulate_tokens(state.token_factors, target.name, xs, ds)
                if request.covariances:
                    self._add_covariances(target.name, xs, ds, token_mask)
                if request.factor_grads and factor_grad is None:
                    factor_grad = torch.bmm(ds.transpose(1, 2), xs)
                    _accumulate(state.factor_grads, target.name, factor_grad)
        if request.rows:
            if factor_grad is not None and request.rows_from_factors:
                rows = compressor.project_factor(factor_grad)  # reuse G' instead of recomputing it
            else:
                rows = compressor.compress(x3, d3)
            _accumulate(state.rows, target.name, rows)

    @staticmethod
    def _real_tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, T, d]`` -> ``[tokens, d]``: padding positions carry inputs but are not data."""
        if mask is not None and mask.shape == t.shape[:2]:
            return t[mask]
        return t.reshape(-1, t.shape[-1])

    def _add_covariances(
        self, name: str, xs: torch.Tensor, ds: torch.Tensor, mask: torch.Tensor | None
    ) -> None:
        xs, ds = self._real_tokens(xs, mask), self._real_tokens(ds, mask)
        _accumulate(self.state.cov_in, name, (xs.T @ xs).to(torch.float64))
        _accumulate(self.state.cov_out, name, (ds.T @ ds).to(torch.float64))
        self.state.tokens[name] = self.state.tokens.get(name, 0) + xs.shape[0]


def _accumulate_tokens(
    store: dict[str, tuple[torch.Tensor, torch.Tensor]], key: str, xs: torch.Tensor, ds: torch.Tensor
) -> None:
    """A module called several times per forward has one (x', delta') pair per call and token: its
    calls are concatenated along the token axis (the gradient sums over both)."""
    if key in store:
        xs, ds = torch.cat([store[key][0], xs], dim=1), torch.cat([store[key][1], ds], dim=1)
    store[key] = (xs, ds)


def _accumulate(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    if key in store:
        store[key] = store[key] + value
    else:
        store[key] = value


def _dense(t: torch.Tensor | OneHot) -> torch.Tensor:
    return t.dense() if isinstance(t, OneHot) else t
