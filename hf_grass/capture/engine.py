"""`GradientComputer`: batches in, per-example compressed gradients out.

It owns the target modules, their compressors and the hooks. ``session()`` puts the model in
attribution mode for the duration of a pass: eval mode (no dropout), every parameter's
``requires_grad`` switched off (so the backward computes activation gradients only, never weight
gradients), the output of the input embeddings made to require grad (so that reentrant activation
checkpointing, which back-propagates only into inputs that require grad, still reaches every
checkpointed block) and the hooks attached; all of it is restored afterwards.

Each compressor lives on its module's device (a ``device_map`` model spreads them over devices);
``compute`` gathers every module's results on ``device``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_grass import kernels
from hf_grass.capture.coverage import Coverage, coverage
from hf_grass.capture.hooks import CaptureRequest, GradientCapture
from hf_grass.capture.loss import PerExampleLoss, check_losses, model_logits, per_example_loss
from hf_grass.capture.targets import CHECKPOINT_WRAPPED, TargetModule, find_target_modules, input_embeddings
from hf_grass.compressors import compressor_class, make_compressor
from hf_grass.compressors.base import Compressor
from hf_grass.config import GraSSConfig, default_damping
from hf_grass.kernels import SJLTMap


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
        inner = (
            getattr(model, "module", None)
            or getattr(model, "_orig_mod", None)
            or getattr(model, CHECKPOINT_WRAPPED, None)  # a whole model in a CheckpointWrapper
        )
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


def _factor_space_size(config: GraSSConfig, targets: list[TargetModule]) -> int | None:
    """The numbers of every module's factor space together in the global layout (None: the
    compressor has none)."""
    widths = getattr(compressor_class(config.compressor), "factor_widths", None)
    if widths is None:
        return None
    total = 0
    for t in targets:
        m_in, m_out = widths(config, t.d_in, t.d_out)
        total += m_in * m_out
    return total


# ``mask_basis`` left at None in the global layout: the masks keep the top eigen-directions of each
# factor when the modules' factor spaces are more than this many times the row (a real LLM), and a
# random draw of them (unbiased) otherwise. The sketch's error on a score scales with the norms of
# the whitened factor-space gradients against the row's width: a random draw's tail directions carry
# a small model's fact-level signal (bench-dev's GPT-2, 4.6 x its row: random 0.71 / top 0.61 fact
# recall@1, LDS 0.398 / 0.376), but on SmolLM2 (108 x its row) the sketch drowned them (recall@1
# 0.31 random / 0.56 top); docs/benchmarks.md. The ratios in between are not measured.
TOP_MASKS_MIN_RATIO = 16


def _resolve_masks(given: GraSSConfig, config: GraSSConfig, factor_size: int | None) -> GraSSConfig:
    """``config`` (resolved) with the eigen masks' kind chosen from the model's size where the user
    left ``mask_basis`` at None (``TOP_MASKS_MIN_RATIO``), and the damping that goes with it where
    ``damping`` was left at None (``config.default_damping``)."""
    small = factor_size is not None and factor_size <= TOP_MASKS_MIN_RATIO * int(config.total_dim or 0)
    if given.mask_basis is None and config.mask_basis == "top" and small:
        config = config.replace(mask_basis="eigen")
    if given.damping is None:
        config = config.replace(damping=default_damping(config.mask_basis))
    return config


def target_device(target: TargetModule) -> torch.device:
    """The device a target module computes on (its weight's), where its compressor must live."""
    device = target.weight_parameter.device
    if device.type == "meta":
        raise ValueError(
            f"module {target.name!r} has its weight on the meta device (offloaded to the CPU or disk by "
            "accelerate's device_map, or not loaded): the attribution pass needs every target module's weight "
            "on a device. Load the model with a device_map that keeps every layer on a GPU or the CPU (e.g. "
            "max_memory large enough, no offload folder), or leave the offloaded modules out with "
            "GraSSConfig(exclude_modules=[...])."
        )
    return device


def _require_grad(module: nn.Module, inputs: tuple, output: object) -> None:
    # what HF's enable_input_require_grads does: with every parameter frozen the embeddings' output
    # is a constant, and a reentrant checkpoint whose inputs are constants is never back-propagated
    # (its rows would be zero); the extra backward is the input gradient of the first layer only
    constant = isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad
    if constant and torch.is_grad_enabled():
        output.requires_grad_(True)  # type: ignore[union-attr]


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int | None:
    """The number of examples in a batch (its tensors' first dimension)."""
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


@contextlib.contextmanager
def frozen_eval(model: nn.Module, trainable: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Eval mode with every parameter frozen but ``trainable``; the mode and flags restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


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
        config: compressor and target configuration (used resolved: ``config.resolved()``, with the
            masks' kind chosen from the model's size where ``mask_basis`` is None: ``TOP_MASKS_MIN_RATIO``).
        targets: explicit targets (default: ``find_target_modules`` from the config).
        device: where inputs go and rows are gathered (default: the model's first parameter's
            device). Each compressor lives on its own module's device.
        per_example_loss: the loss for models whose output the built-in losses do not cover:
            ``fn(model, batch) -> [B]``, called under the hooks with the collated batch on the
            model's device (``model_inputs(batch)`` plus ``labels``; floating-point columns in the
            model's dtype, ``position_ids`` when the forward takes them). It must run the forward
            itself and return one loss per example that depends on that example only, never on the
            other examples of the batch or on padding (e.g. ``reduction="none"``, never a batch
            mean): each example's gradient is read off the sum of these losses. It should pass
            ``use_cache=False`` to an HF model (the built-in loss does: no KV cache). Default: the
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
        given, config = config, config.resolved()
        self.targets = targets or find_target_modules(
            self.model, config.target_modules, config.exclude_modules
        )
        factor_size = _factor_space_size(config, self.targets)
        self.config = config = _resolve_masks(given, config, factor_size)
        if device is None:
            param = next(self.model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        # the global layout when every module's factor space fits the budget together: store the
        # factor-space gradients themselves (no projection noise at all; e.g. a small MLP)
        self.embedded = config.total_dim is not None and factor_size is not None and factor_size <= config.total_dim
        # each on its module's device: the hooks compress there (a device_map model spans devices)
        self.compressors: dict[str, Compressor] = {
            t.name: make_compressor(
                config, t.name, d_in=t.d_in, d_out=t.d_out, bias=t.bias, embed=self.embedded
            ).to(target_device(t))
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
        # no KV cache during the pass: it is never read, costs memory, and a checkpointed layer
        # recomputed in the backward would append to it a second time
        self._forward_flags = {"use_cache": False} if "use_cache" in sig.parameters else {}
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

    def project_factor(self, name: str, factor_grad: torch.Tensor) -> torch.Tensor:
        """Module ``name``'s final projection of factor-space gradients ``[B, m_out, m_in]``, computed
        on its compressor's device and returned on ``factor_grad``'s."""
        comp = self.compressors[name]
        return comp.project_factor(factor_grad.to(comp.device)).to(factor_grad.device)  # type: ignore[attr-defined]

    def project_rows(
        self, factor_grads: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``[B, row_dim]`` rows in ``dtype`` from every module's factor-space gradients
        ``[B, m_out, m_in]`` (a module missing from ``factor_grads`` has zero gradient): each through
        its final projection into its place in the row, summed. Queries project in float64, so that
        token scores (``scoring.tokens``) sum to exactly their score.

        The modules' SJLTs together are one SJLT of their concatenated factor spaces (each maps its
        own inputs into the row, at its offset), so they run as one: one kernel over all modules
        instead of one per module, which measured a tenth of the pass on a GPU at Llama-8B shape."""
        first = next(iter(factor_grads.values()))
        batch, device = first.shape[0], first.device
        combined = self._combined_sjlt
        if combined is None:  # projections that are not SJLTs (logra), or modules on several devices
            rows = torch.zeros(batch, self.row_dim, dtype=dtype, device=device)
            for name, (start, stop) in self.offsets.items():
                if name in factor_grads:  # never reached by the forward: zero gradient
                    rows[:, start:stop] += self.project_factor(name, factor_grads[name].to(dtype))
            return rows
        parts = []
        for name in self.offsets:
            gp = factor_grads.get(name)
            comp = self.compressors[name]
            width = comp.m_out * comp.m_in  # type: ignore[attr-defined]
            parts.append(gp.reshape(batch, width).to(dtype) if gp is not None else first.new_zeros(batch, width, dtype=dtype))
        flat = torch.cat(parts, dim=1).to(combined.device)
        return kernels.sjlt_project(flat, combined).to(device, dtype)

    @functools.cached_property
    def _combined_sjlt(self) -> SJLTMap | None:
        """The SJLT of every module's factor space into the row, or None where the modules'
        projections are not all SJLTs on one device."""
        maps = [getattr(self.compressors[name], "sjlt", None) for name in self.offsets]
        if not maps or any(not isinstance(m, SJLTMap) for m in maps):
            return None
        if len({m.device for m in maps}) != 1 or len({m.s for m in maps}) != 1:
            return None
        rows = torch.cat([m.rows + start for m, (start, _) in zip(maps, self.offsets.values())], dim=1)
        return SJLTMap(rows, torch.cat([m.signs for m in maps], dim=1), self.row_dim)


    def coverage(self) -> Coverage:
        """What fraction of the model's trainable parameters the targets attribute, and what is left
        out and why (``capture.coverage``; call it outside ``session()``, which freezes them all)."""
        return coverage(self.model, self.targets)

    @contextlib.contextmanager
    def session(self) -> Iterator[GradientComputer]:
        """Attribution mode: eval, parameters frozen, input embeddings' output requiring grad, hooks
        attached; restored on exit."""
        with frozen_eval(self.model):
            embeddings = input_embeddings(self.model)
            handle = embeddings.register_forward_hook(_require_grad) if embeddings is not None else None
            try:
                with self.capture:
                    yield self
            finally:
                if handle is not None:
                    handle.remove()
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
        logits = model_logits(self.model(**inputs, **self._forward_flags))
        return per_example_loss(logits, labels, self.config.loss_reduction, token_mask)

    def compute(
        self,
        batch: Mapping[str, torch.Tensor],
        request: CaptureRequest | None = None,
        agree: Callable[[str, list[int]], None] | None = None,
    ) -> BatchGradients:
        """Forward + backward of one batch under ``session()``; returns what ``request`` asks for.

        Non-finite losses (and gradient rows) raise ``NonFiniteError``; hook calls that do not add up
        (activation checkpointing that would make a row wrong) raise ``CaptureError``. With ``agree`` (ranks whose
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
        capture.batch_size = _batch_size(batch)
        with torch.enable_grad():
            # the phase tells the hooks a forward from a recompute in the backward (checkpointing)
            capture.phase = "forward"
            try:
                losses = self.losses(batch, capture.token_mask)
                bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
                if agree is not None:
                    agree("loss", bad)
                elif bad:
                    raise NonFiniteError("loss", bad)
                if losses.requires_grad:
                    capture.phase = "backward"
                    losses.sum().backward()
            finally:
                capture.phase = None
        capture.check_calls()
        state, here = capture.state, self._gathered
        result = BatchGradients(
            losses=losses.detach().float(),
            factor_grads=here(state.factor_grads),
            curvature_grads=here(state.curvature_grads),
            cov_in=here(state.cov_in),
            cov_out=here(state.cov_out),
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
                    rows[:, start:stop] += state.rows[name].to(rows.device)
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
        if request.curvature_grads:  # likewise for the hashed modules (e.g. MoE experts no token reached)
            for name, comp in self.compressors.items():
                if getattr(comp, "hashed", False) and name not in result.curvature_grads:
                    shape = comp.curvature_shape  # type: ignore[attr-defined]
                    result.curvature_grads[name] = torch.zeros(batch_size, *shape, device=self.device)
        capture.reset()
        return result

    def _gathered(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-module results moved to ``device`` (a no-op where they are already there)."""
        return {name: t.to(self.device) for name, t in tensors.items()}
