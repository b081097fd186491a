"""`GradientComputer`: batches in, per-example compressed gradients out.

It owns the target modules, their compressors and the hooks. ``session()`` puts the model in
attribution mode for the duration of a pass: eval mode (no dropout), every parameter's
``requires_grad`` switched off (so the backward computes activation gradients only, never weight
gradients) and the hooks attached; all of it is restored afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_grass.capture.hooks import CaptureRequest, GradientCapture
from hf_grass.capture.loss import PerExampleLoss, check_losses, model_logits, per_example_loss
from hf_grass.capture.targets import TargetModule, find_target_modules
from hf_grass.compressors import compressor_class, make_compressor
from hf_grass.compressors.base import Compressor
from hf_grass.config import GraSSConfig


class NonFiniteError(ValueError):
    """A loss or gradient of some examples is NaN/inf; ``rows`` are their positions in the batch."""

    def __init__(self, what: str, rows: list[int]):
        super().__init__(f"non-finite {what} in batch rows {rows}")
        self.what = what
        self.rows = rows


@dataclass
class BatchGradients:
    losses: torch.Tensor  # [B] float32
    rows: torch.Tensor | None = None  # [B, row_dim] float32 (float64 models: float64), modules in order
    factor_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, m_out, m_in]
    # name -> [B, c_out, c_in]: hashed (wide) sides in their own coordinates (modules that hash only)
    curvature_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    cov_in: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [m_in, m_in] float64 sums
    cov_out: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [m_out, m_out] float64 sums
    tokens: dict[str, int] = field(default_factory=dict)
    # name -> per-token factors (x' [B, T, m_in], delta' [B, T, m_out]) when asked (CaptureRequest.token_factors)
    token_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / compile wrappers so module names do not depend on the launcher.

    Module names seed the projections, so they must be the same in every process and launcher.
    """
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        else:
            return model


def is_zero3(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the parameters (then forwards are collective)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def context_length(model: nn.Module) -> int | None:
    """The model's maximum sequence length from its config, if it declares one."""
    base = unwrap_model(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    cfg = getattr(base, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _factor_space_fits(config: GraSSConfig, targets: list[TargetModule]) -> bool:
    widths = getattr(compressor_class(config.compressor), "factor_widths", None)
    if widths is None:
        return False
    total = 0
    for t in targets:
        m_in, m_out = widths(config, t.d_in, t.d_out)
        total += m_in * m_out
    return total <= int(config.total_dim or 0)


def _forward_signature(model: nn.Module) -> inspect.Signature:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward)


def forward_parameters(model: nn.Module) -> set[str] | None:
    """The named arguments of the model's forward (the columns the Trainer keeps), or ``None`` when
    it names none (``forward(**batch)``: every column is kept)."""
    params = _forward_signature(unwrap_model(model)).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named or None


class GradientComputer:
    """Per-example compressed gradients of a model's target modules.

    Args:
        model: the model (wrappers are unwrapped for naming; forward runs on the unwrapped model,
            which under DeepSpeed ZeRO-3 still gathers parameters through its module hooks).
        config: compressor and target configuration (used resolved: ``config.resolved()``).
        targets: explicit targets (default: ``find_target_modules`` from the config).
        device: where compressors live (default: the model's first parameter's device).
        per_example_loss: the loss for models whose output the built-in losses do not cover:
            ``fn(model, batch) -> [B]``, called under the hooks with the collated batch on the
            model's device (``model_inputs(batch)`` plus ``labels``; floating-point columns in the
            model's dtype, ``position_ids`` when the forward takes them). It must run the forward
            itself and return one loss per example that depends on that example only, never on the
            other examples of the batch or on padding (e.g. ``reduction="none"``, never a batch
            mean): each example's gradient is read off the sum of these losses. Default: the
            built-in per-example loss of the logits (``capture.loss.per_example_loss``: causal LM,
            classification, regression, multi-label).
    """

    def __init__(
        self,
        model: nn.Module,
        config: GraSSConfig,
        targets: list[TargetModule] | None = None,
        device: torch.device | str | None = None,
        per_example_loss: PerExampleLoss | None = None,
    ):
        if per_example_loss is not None and not callable(per_example_loss):
            raise TypeError(
                f"per_example_loss must be a function (model, batch) -> [B] losses, got {type(per_example_loss).__name__}"
            )
        self.loss_fn = per_example_loss
        self.model = unwrap_model(model)
        self.config = config = config.resolved()
        self.targets = targets or find_target_modules(
            self.model, config.target_modules, config.exclude_modules
        )
        if device is None:
            param = next(self.model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        # the global layout when every module's factor space fits the budget together: store the
        # factor-space gradients themselves (no projection noise at all; e.g. a small MLP)
        self.embedded = config.total_dim is not None and _factor_space_fits(config, self.targets)
        self.compressors: dict[str, Compressor] = {
            t.name: make_compressor(
                config, t.name, d_in=t.d_in, d_out=t.d_out, bias=t.bias, embed=self.embedded
            ).to(self.device)
            for t in self.targets
        }
        # where each module's compressed gradient goes in a row: its own slice (per-module layout), or
        # the whole row, shared by every module and summed (global layout, config.total_dim)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for t in self.targets:
            if self.layout == "global":
                self.offsets[t.name] = (0, config.total_dim)
                continue
            stop = start + self.compressors[t.name].output_dim
            self.offsets[t.name] = (start, stop)
            start = stop
        # the width of a row, whatever the layout
        self.row_dim: int = config.total_dim if self.layout == "global" else start
        self.capture = GradientCapture(self.targets, self.compressors)
        sig = _forward_signature(self.model)
        self._accepts_position_ids = "position_ids" in sig.parameters
        # floating-point inputs (features, pixel values) go in the model's dtype, as the Trainer
        # casts them under DeepSpeed; token ids and masks are integers and stay as they are
        floating = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        self._input_dtype = floating

    @property
    def layout(self) -> str:
        """How rows are laid out: ``"global"``, every module projected into one shared row, or
        ``"module"``, a block per module (also the embedded factor spaces of a global config)."""
        return "global" if self.config.total_dim is not None and not self.embedded else "module"

    @property
    def module_names(self) -> list[str]:
        return [t.name for t in self.targets]

    @contextlib.contextmanager
    def session(self) -> Iterator[GradientComputer]:
        """Attribution mode: eval, parameters frozen, hooks attached; restored on exit."""
        model = self.model
        was_training = model.training
        flags = [(p, p.requires_grad) for p in model.parameters()]
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            with self.capture:
                yield self
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(was_training)
            self.capture.reset()

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the forward gets: tokens, mask, position ids (so left padding changes nothing), and
        labels only for classification (a causal LM would otherwise compute a batch-mean loss we
        do not use)."""
        inputs = {k: self._to_device(v) for k, v in batch.items() if k not in ("labels", "index")}
        labels = batch.get("labels")
        if labels is not None and labels.dim() == 1:
            inputs["labels"] = self._to_device(labels)
        mask = batch.get("attention_mask")
        if mask is not None and self._accepts_position_ids and "position_ids" not in inputs:
            mask = mask.to(self.device).long()
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return inputs

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and self._input_dtype is not None:
            return t.to(self.device, self._input_dtype)
        return t.to(self.device)

    def losses(self, batch: Mapping[str, torch.Tensor], token_mask: torch.Tensor | None) -> torch.Tensor:
        """``[B]`` per-example losses of the batch (the forward runs here, under the hooks)."""
        inputs = self.model_inputs(batch)
        if self.loss_fn is not None:
            if "labels" in batch:
                inputs["labels"] = self._to_device(batch["labels"])
            size = next(iter(batch.values())).shape[0]
            return check_losses(self.loss_fn(self.model, inputs), size)
        if "labels" not in batch:
            raise ValueError(
                "the batch has no 'labels': give the examples labels, or pass per_example_loss=fn(model, batch) "
                "-> [B] for an objective without them"
            )
        labels = batch["labels"].to(self.device)
        logits = model_logits(self.model(**inputs))
        return per_example_loss(logits, labels, self.config.loss_reduction, token_mask)

    def compute(
        self,
        batch: Mapping[str, torch.Tensor],
        request: CaptureRequest | None = None,
        agree: Callable[[str, list[int]], None] | None = None,
    ) -> BatchGradients:
        """Forward + backward of one batch under ``session()``; returns what ``request`` asks for.

        Non-finite losses (and gradient rows) raise ``NonFiniteError``. With ``agree`` (ranks whose
        forwards and backwards are collective, DeepSpeed ZeRO-3), nothing is raised here: after
        every forward ``agree("loss", bad_rows)`` is called, also with no bad rows, and must raise
        on every rank if any rank failed; the caller checks the rows itself, as every rank must
        reach the same collectives.
        """
        request = request or CaptureRequest()
        if not self.capture._handles:
            raise RuntimeError("GradientComputer.compute must run inside `with computer.session():`")
        capture = self.capture
        capture.reset()
        capture.request = request
        mask = batch.get("attention_mask")
        capture.token_mask = mask.to(self.device).bool() if mask is not None else None
        with torch.enable_grad():
            losses = self.losses(batch, capture.token_mask)
            bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
            if agree is not None:
                agree("loss", bad)
            elif bad:
                raise NonFiniteError("loss", bad)
            if losses.requires_grad:
                losses.sum().backward()
        state = capture.state
        result = BatchGradients(
            losses=losses.detach().float(),
            factor_grads=state.factor_grads,
            curvature_grads=state.curvature_grads,
            cov_in=state.cov_in,
            cov_out=state.cov_out,
            tokens=state.tokens,
            token_factors=state.token_factors,
        )
        batch_size = losses.shape[0]
        if request.rows:
            dtype = (
                torch.float64 if any(r.dtype == torch.float64 for r in state.rows.values()) else torch.float32
            )
            rows = torch.zeros(batch_size, self.row_dim, dtype=dtype, device=self.device)
            for name, (start, stop) in self.offsets.items():
                if name in state.rows:  # a module the forward never reached has zero gradient
                    rows[:, start:stop] += state.rows[name]
            bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
            if bad and agree is None:
                raise NonFiniteError("gradient", bad)
            result.rows = rows
        if request.factor_grads:
            for name in self.module_names:
                if name not in result.factor_grads:
                    comp = self.compressors[name]
                    result.factor_grads[name] = torch.zeros(
                        batch_size,
                        comp.m_out,
                        comp.m_in,
                        device=self.device,  # type: ignore[attr-defined]
                    )
        capture.reset()
        return result
