"""Mixture-of-experts layers of transformers 5: each expert's weights, and the router's.

In transformers 5 an MoE layer keeps its experts in one module with 3-D parameters (Mixtral, OLMoE,
Qwen3-MoE: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; the class is decorated with
``@use_experts_implementation``), and computes them with the implementation the config names
(``config._experts_implementation``: ``grouped_mm``, the default where torch has it, ``batched_mm``
or ``eager``). Expert ``e`` is two linear maps of the tokens routed to it::

    h = x W_up[e]^T,  a = gate(h),  y = a W_down[e]^T,  out += w_e * y      (w_e: its routing weight)

so its per-example gradients are ``sum_t dh_t x_t^T`` and ``sum_t dy_t a_t^T`` over the example's
tokens routed to ``e``: they factorise like a linear layer's, and each expert matrix is captured as a
target of its own (``<experts>.<e>.gate_up_proj``), without building any per-example gradient.

None of the implementations shows the per-expert tensors, so the hooks see only what the experts
module gets and gives: the tokens, the routing and the output gradient. In the backward, the tokens
routed to each expert are recomputed through that expert alone (``h``, ``gate``, ``y``, the routing
weight; with the module's own ``_apply_gate``, activation and post-expert norm), and a local
autograd call gives ``dh`` and ``dy``. This costs about one more forward and backward of the experts
(activations only: the weights are frozen during the pass), and works whatever implementation runs
the forward. The first batch of every experts module checks that the recomputed experts add up to
the module's output, so a model whose experts compute something else raises instead of giving
wrong gradients.

Routers (``F.linear`` of the flattened tokens, logits first in the output) are captured as linear
maps; their output gradient is the total gradient of the logits (through the softmax and the
routing weights).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from hf_grass.capture.target_module import TargetModule
from hf_grass.precondition.warmup import PooledSides

# the implementations whose math the recomputation follows (transformers.integrations.moe); the others
# (deepgemm, sonicmoe, fp8 kernels, user-registered ones) are refused rather than assumed equal
SUPPORTED_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


class Contributions(Protocol):
    """What the experts' hooks need of the capture (``hooks.GradientCapture``)."""

    token_mask: torch.Tensor | None
    batch_size: int | None

    def contribute(
        self, target: TargetModule, x: torch.Tensor, delta: torch.Tensor, token_mask: torch.Tensor | None
    ) -> None: ...


# ---- which modules ----------------------------------------------------------------------------------


def is_experts(module: nn.Module) -> bool:
    """A transformers-5 experts module (``@use_experts_implementation``: 3-D expert weights).

    Duck-typed so that capture needs no transformers import.
    """
    down = getattr(module, "down_proj", None)
    return (
        all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts"))
        and isinstance(down, nn.Parameter)
        and down.dim() == 3
    )


def up_parameter(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def experts_problem(module: nn.Module) -> str | None:
    """Why the experts of ``module`` cannot be captured (a sentence naming the setting), or None."""
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None) or "eager"
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        return (
            f"experts_implementation={impl!r} is not one hf_grass can capture (it supports "
            f"{', '.join(SUPPORTED_IMPLEMENTATIONS)}); load the model with experts_implementation='grouped_mm' "
            "or call model.set_experts_implementation('grouped_mm')"
        )
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallelism shards the experts across processes; attribute without it"
    if hasattr(module.down_proj, "ds_id"):
        # the backward recomputes the experts, and ZeRO-3 has released their weights by then
        return "DeepSpeed ZeRO-3 partitions the experts' weights, which the capture recomputes in the backward; use ZeRO-2"
    return None


def describe_experts(name: str, module: nn.Module) -> list[TargetModule]:
    """One target per expert and weight: ``<name>.<e>.<gate_up_proj|up_proj|down_proj>``."""
    targets = []
    transposed, bias = bool(module.is_transposed), bool(module.has_bias)
    for e in range(int(module.num_experts)):
        for param in (up_parameter(module), "down_proj"):
            shape = tuple(getattr(getattr(module, param), "ds_shape", getattr(module, param).shape))
            d_out, d_in = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
            targets.append(
                TargetModule(
                    f"{name}.{e}.{param}",
                    module,
                    int(d_in) + int(bias),
                    int(d_out),
                    bias,
                    transposed,
                    kind="expert",
                    parameter=param,
                    index=e,
                )  # fmt: skip
            )
    return targets


def warmup_pools(targets: list[TargetModule]) -> dict[str, PooledSides]:
    """The warm-up sums the experts of one layer share (``precondition.warmup.WarmupCovariances``).

    Every expert's up (or gate_up) weight reads the layer's hidden states, and every expert's down
    weight writes the layer's output, so its output gradient is the layer's (times the token's
    routing weight): those sides are the same space for all experts of a layer. Their sums are
    pooled over the experts' routed tokens, one per layer and side: 64 experts of OLMoE then hold
    one 2048-wide input sum, not 64 (each a float64 2048 x 2048 matrix, 34 MB). The pooled sum is
    also the better estimate: with ``warmup_tokens`` = 8192 and 8 of 64 experts per token, an
    expert sees about 1024 tokens, fewer than its 2048 input coordinates, while the pool sees all
    8192 tokens (8 times each, through their 8 experts). Each expert keeps its own token count (the
    fit scales its factors with it) and its own mask of the pooled eigenbasis, so its gradient stays
    an unbiased subsample. The other sides (the up weight's output, the down weight's input) are the
    expert's own intermediate space and keep their own sums.
    """
    pools = {}
    for t in targets:
        if t.kind != "expert":
            continue
        layer = t.name.rsplit(".", 2)[0]
        shared = f"{layer}.*.{t.parameter}"  # "*": no module is named so, so the key names no module
        down = t.parameter == "down_proj"
        family = f"experts' {t.parameter}"
        pools[t.name] = PooledSides(None if down else shared, shared if down else None, family)
    return pools


def is_router(module: nn.Module) -> bool:
    """An MoE router: not an ``nn.Linear``, a 2-D ``weight`` of one row per expert, ``top_k``."""
    weight = getattr(module, "weight", None)
    experts = getattr(module, "num_experts", None) or getattr(module, "n_routed_experts", None)
    return (
        not isinstance(module, nn.Linear)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and hasattr(module, "top_k")
        and isinstance(experts, int)
        and weight.shape[0] == experts
    )


def describe_router(name: str, module: nn.Module) -> TargetModule:
    bias = isinstance(getattr(module, "bias", None), nn.Parameter)
    d_out, d_in = module.weight.shape
    return TargetModule(name, module, int(d_in) + int(bias), int(d_out), bias, False, kind="router")


# ---- the hooks ----------------------------------------------------------------------------------------


def install(capture: Contributions, targets: list[TargetModule]) -> list[RemovableHandle]:
    """Hooks on every experts module and router that ``targets`` names."""
    handles: list[RemovableHandle] = []
    by_module: dict[int, list[TargetModule]] = {}
    for t in targets:
        if t.kind == "expert":
            by_module.setdefault(id(t.module), []).append(t)
        elif t.kind == "router":
            hooks = RouterHooks(capture, t)
            handles.append(t.module.register_forward_pre_hook(hooks.pre_forward, with_kwargs=True))
            handles.append(t.module.register_forward_hook(hooks.forward, with_kwargs=True))
    for group in by_module.values():
        hooks = ExpertsHooks(capture, group)
        handles.append(group[0].module.register_forward_pre_hook(hooks.pre_forward))
        handles.append(group[0].module.register_forward_hook(hooks.forward, with_kwargs=True))
    return handles


def batch_shape(capture: Contributions, tokens: int, mask: torch.Tensor | None) -> tuple[int, int]:
    """``(B, T)`` of the ``B * T`` flattened tokens an MoE layer sees (rows in example order)."""
    if mask is not None and mask.numel() == tokens:
        return int(mask.shape[0]), int(mask.shape[1])
    size = capture.batch_size
    if size and tokens % size == 0:
        return size, tokens // size
    raise ValueError(
        f"an MoE layer saw {tokens} flattened tokens, which do not split into the batch's examples "
        f"(batch size {size}); attribute MoE layers through GradientComputer.compute"
    )


def _relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((ref - got).norm() / ref.norm().clamp(min=1e-30))


def _tolerance(dtype: torch.dtype) -> float:
    """How far a recomputation may differ from the module's own result and still be the same function
    (summation order only; a different function differs by O(1))."""
    return {torch.float64: 1e-9, torch.float32: 1e-3}.get(dtype, 5e-2)


def _check_same(ref: torch.Tensor, got: torch.Tensor, what: str, fix: str) -> None:
    err = _relative_error(ref, got)
    if not err <= _tolerance(got.dtype):
        raise ValueError(
            f"{what}: hf_grass's recomputation differs from the module's own output (relative error "
            f"{err:.2e}), so its gradients would be wrong. {fix}"
        )


class RouterHooks:
    """A router: the input tokens, and the gradient of the logits (the output's first tensor)."""

    def __init__(self, capture: Contributions, target: TargetModule):
        self.capture, self.target = capture, target
        self.checked = False

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not torch.is_grad_enabled():
            return None
        hidden = _first_tensor(args, kwargs, "hidden_states")
        if hidden.requires_grad:
            return None
        # the logits feed the routing weights inside the forward: the graph must start before them,
        # so the input (not the output) becomes a leaf that requires grad
        return _replace_first(args, kwargs, "hidden_states", hidden.detach().requires_grad_(True))

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        hidden = _first_tensor(args, kwargs, "hidden_states").detach()
        logits = output if isinstance(output, torch.Tensor) else output[0]
        if not self.checked and not hasattr(module.weight, "ds_id"):  # (a ZeRO-3 weight is released here)
            weight = module.weight.detach().to(logits.dtype)
            bias = module.bias.detach().to(logits.dtype) if self.target.bias else None
            ref = F.linear(hidden.reshape(-1, hidden.shape[-1]).to(logits.dtype), weight, bias)
            _check_same(ref, logits.detach().reshape(ref.shape), f"router {self.target.name}",
                        f"Exclude it: exclude_modules=[{self.target.name!r}].")  # fmt: skip
            self.checked = True
        mask = self.capture.token_mask
        logits.register_hook(functools.partial(self.backward, hidden, mask))

    def backward(self, hidden: torch.Tensor, mask: torch.Tensor | None, grad: torch.Tensor) -> None:
        x = hidden.reshape(-1, hidden.shape[-1])
        b, t = batch_shape(self.capture, x.shape[0], mask)
        delta = grad.reshape(b, t, -1)
        self.capture.contribute(self.target, x.reshape(b, t, -1), delta, mask)


class ExpertsHooks:
    """The experts of one MoE layer (see the module docstring)."""

    def __init__(self, capture: Contributions, targets: list[TargetModule]):
        self.capture = capture
        self.module = module = targets[0].module
        self.up, self.down = up_parameter(module), "down_proj"
        self.targets: dict[tuple[int, str], TargetModule] = {(t.index, t.parameter): t for t in targets}  # type: ignore[misc]
        self.name = targets[0].name.rsplit(".", 2)[0]
        self.checked = False

    def pre_forward(self, module: nn.Module, args: tuple) -> None:
        problem = experts_problem(module)  # the implementation can be switched after targeting
        if problem is not None and torch.is_grad_enabled():
            raise ValueError(f"{self.name}: {problem}")

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        hidden = _first_tensor(args, kwargs, "hidden_states")
        index = _argument(args, kwargs, 1, "top_k_index")
        weights = _argument(args, kwargs, 2, "top_k_weights")
        replaced = None
        if not output.requires_grad:  # nothing before this layer is captured: start the graph here
            output = replaced = output.detach().requires_grad_(True)
        # [tokens, ...] whatever shape the block passes (transformers flattens the batch already)
        k = index.shape[-1]
        saved = (hidden.detach().reshape(-1, hidden.shape[-1]), index.detach().reshape(-1, k),
                 weights.detach().reshape(-1, k), self.capture.token_mask)  # fmt: skip
        check = None if self.checked else output.detach().reshape(-1, output.shape[-1])
        self.checked = True
        output.register_hook(functools.partial(self.backward, saved, check))
        return replaced

    def backward(self, saved: tuple, check: torch.Tensor | None, grad: torch.Tensor) -> None:
        hidden, index, weights, mask = saved
        grad = grad.reshape(-1, grad.shape[-1])
        n, k = index.shape
        b, t = batch_shape(self.capture, n, mask)
        real = mask.reshape(-1) if mask is not None and mask.numel() == n else None
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens in order
        counts = torch.bincount(flat, minlength=int(self.module.num_experts)).tolist()
        total = torch.zeros_like(grad) if check is not None else None
        start = 0
        for e, count in enumerate(counts):
            pairs, start = order[start : start + count], start + count
            wanted = (e, self.up) in self.targets or (e, self.down) in self.targets
            if count == 0 or not (wanted or total is not None):
                continue
            tok, slot = pairs // k, pairs % k
            if real is not None:  # padding tokens: their output gradient is zero, and they are not data
                keep = real[tok]
                tok, slot = tok[keep], slot[keep]
            if tok.numel() == 0:
                continue
            x, dh, a, dy, out = self.recompute(e, hidden[tok], weights[tok, slot], grad[tok])
            if total is not None:
                total.index_add_(0, tok, out.to(total.dtype))
            if wanted:
                (xs, dhs, as_, dys), valid = pack(tok, b, t, [x, dh, a, dy])
                if (e, self.up) in self.targets:
                    self.capture.contribute(self.targets[(e, self.up)], xs, dhs, valid)
                if (e, self.down) in self.targets:
                    self.capture.contribute(self.targets[(e, self.down)], as_, dys, valid)
        if check is not None and total is not None:
            rows = real if real is not None else slice(None)
            _check_same(check[rows], total[rows], f"experts {self.name}",
                        "Load the model with experts_implementation='grouped_mm', or exclude the experts: "
                        f"exclude_modules=[{self.name!r}].")  # fmt: skip

    def recompute(
        self, e: int, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert ``e`` on its tokens ``x``: ``(x, dh, a, dy, out)`` (inputs and output gradients of
        its two weights, and its weighted output), as the transformers implementations compute it."""
        m = self.module
        up_w, down_w = getattr(m, self.up)[e].detach(), m.down_proj[e].detach()
        up_b = getattr(m, f"{self.up}_bias")[e].detach() if m.has_bias else None
        down_b = m.down_proj_bias[e].detach() if m.has_bias else None
        with torch.enable_grad():
            h = _linear(x, up_w, up_b, m.is_transposed).detach().requires_grad_(True)
            a = m._apply_gate(h) if m.has_gate else m.act_fn(h)
            y = _linear(a, down_w, down_b, m.is_transposed)
            out = m.post_expert_norm(y) if getattr(m, "has_post_expert_norm", False) else y
            out = (out * w.unsqueeze(-1)).to(g.dtype)
            dh, dy = torch.autograd.grad(out, (h, y), g)
        return x, dh, a.detach(), dy, out.detach()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ w if transposed else F.linear(x, w)
    return out if b is None else out + b


def pack(
    tok: torch.Tensor, batch: int, tokens: int, rows: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rows of flattened tokens ``tok`` (ascending) -> ``[B, C, d]`` per example, zero-padded to the
    largest count ``C``, and the ``[B, C]`` mask of the slots that hold a token."""
    example = tok // tokens
    counts = torch.bincount(example, minlength=batch)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(tok.numel(), device=tok.device) - first[example]
    width = int(counts.max())
    out = []
    for r in rows:
        packed = torch.zeros(batch, width, r.shape[-1], dtype=r.dtype, device=r.device)
        packed[example, slot] = r
        out.append(packed)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=tok.device)
    valid[example, slot] = True
    return out, valid


# ---- the arguments of a forward ------------------------------------------------------------------------


def _argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    raise ValueError(f"an MoE module was called without its {name!r} argument")


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    value = _argument(args, kwargs, 0, name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"an MoE module's {name!r} is a {type(value).__name__}, not a tensor")
    return value


def _replace_first(args: tuple, kwargs: dict, name: str, value: torch.Tensor) -> tuple[tuple, dict]:
    if name in kwargs:
        return args, {**kwargs, name: value}
    return (value, *args[1:]), kwargs
