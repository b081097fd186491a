"""The memory model of docs/howto/memory.md as code: bytes of the warm-up, the main pass and the
lookups of the default configuration, as a function of a model's linear layers.

Every term follows a tensor the library allocates (the comment names where); ``benchmarks.warmup_memory``
checks the warm-up's terms against the peak RSS of a real run on a wide CPU Llama, and prints the
tables of the docs (``--model-only``). Sizes are in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hf_grass.capture.targets import WIDE_OUTPUT
from hf_grass.config import DEFAULT_TOTAL_DIM, GraSSConfig
from hf_grass.precondition.warmup import DIAGONAL_CHUNK_BYTES, FULL_COVARIANCE_MAX_WIDTH, WARMUP_MAX_BYTES

FACTOR_DIM = GraSSConfig().factor_dim  # coordinates kept per side in the global layout (128)


@dataclass(frozen=True)
class LlamaShape:
    """What the memory depends on in a Llama-architecture model."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding's weight (still a captured module)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def params(self) -> int:
        """Parameters (the norms' weights left out: negligible)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
        return self.layers * per_layer + (1 if self.tied else 2) * self.vocab * h


LLAMA_8B = LlamaShape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256)
SMOLLM2 = LlamaShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied=True)
# the benchmark's CPU model: the shape of a Llama block at 1/2 the width of Llama-8B, with an MLP
# wider than FULL_COVARIANCE_MAX_WIDTH (hashed sides) and a 32k vocabulary
WIDE_CPU = LlamaShape("wide CPU Llama (benchmark)", 2048, 8704, 4, 16, 4, 32000)


@dataclass(frozen=True)
class MoEShape:
    """What the memory depends on in a transformers-5 MoE model (Llama-style attention; every layer's
    MLP ``experts`` experts of ``expert_intermediate``, ``top_k`` per token, and a router)."""

    name: str
    hidden: int
    expert_intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int

    @property
    def params(self) -> int:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.expert_intermediate
        per_layer = 2 * h * q + 2 * h * kv + h * self.experts + self.experts * 3 * h * i
        return self.layers * per_layer + 2 * self.vocab * h


OLMOE_1B_7B = MoEShape("OLMoE-1B-7B", 2048, 1024, 16, 16, 16, 128, 50304, 64, 8)
MIXTRAL_8X7B = MoEShape("Mixtral-8x7B", 4096, 14336, 32, 32, 8, 128, 32000, 8, 2)
QWEN3_30B_A3B = MoEShape("Qwen3-30B-A3B", 2048, 768, 48, 32, 4, 128, 151936, 128, 8)


@dataclass(frozen=True)
class Linear:
    """A captured linear layer: widths and the key of the input it reads (modules that read the
    same tensor share one warm-up covariance, ``WarmupCovariances``).

    An expert also names the pooled output sum it writes to (``writes``; None: its own) and its
    ``family`` (``PooledSides``); its input is its own where ``reads`` is its name. ``hashed_in`` /
    ``hashed_out``: a side the byte budget keeps as a diagonal (``apply_budget``).
    """

    name: str
    d_in: int
    d_out: int
    reads: str
    writes: str | None = None
    family: str | None = None
    hashed_in: bool = False
    hashed_out: bool = False


def attention_linears(p: str, h: int, q: int, kv: int) -> list[Linear]:
    """Layer ``p``'s attention projections (q, k, v read one input; o its own), ``q`` wide."""
    return [
        Linear(f"{p}.self_attn.q_proj", h, q, f"{p}.attn_in"),
        Linear(f"{p}.self_attn.k_proj", h, kv, f"{p}.attn_in"),
        Linear(f"{p}.self_attn.v_proj", h, kv, f"{p}.attn_in"),
        Linear(f"{p}.self_attn.o_proj", q, h, f"{p}.o_in"),
    ]


def output_linears(h: int, vocab: int) -> list[Linear]:
    """``lm_head`` where the library's default targets keep it (vocabulary at most ``WIDE_OUTPUT``)."""
    return [Linear("lm_head", h, vocab, "final_norm")] if vocab <= WIDE_OUTPUT else []


def llama_linears(shape: LlamaShape) -> list[Linear]:
    """The default targets of a Llama (every Linear, no biases; ``lm_head`` only where its vocabulary
    is at most ``capture.targets.WIDE_OUTPUT``, as the library's default targets)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_width
    out = []
    for layer in range(shape.layers):
        p = f"model.layers.{layer}"
        out += attention_linears(p, h, h, kv) + [
            Linear(f"{p}.mlp.gate_proj", h, i, f"{p}.mlp_in"),
            Linear(f"{p}.mlp.up_proj", h, i, f"{p}.mlp_in"),
            Linear(f"{p}.mlp.down_proj", i, h, f"{p}.down_in"),
        ]
    return out + output_linears(h, shape.vocab)


def moe_linears(shape: MoEShape, pooled: bool = True) -> list[Linear]:
    """The default targets of an MoE model: attention, the router, one target per expert and
    weight (``capture/experts.py``), ``lm_head`` where the library's default keeps it. ``pooled``: the
    experts' up inputs and down outputs add to one sum per layer (``warmup_pools``); else each expert keeps its own, as before."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.expert_intermediate
    out = []
    for layer in range(shape.layers):
        p = f"model.layers.{layer}"
        out += attention_linears(p, h, q, kv) + [
            Linear(f"{p}.mlp.gate", h, shape.experts, f"{p}.mlp_in"),  # the router
        ]
        for e in range(shape.experts):
            up, down = f"{p}.mlp.experts.{e}.gate_up_proj", f"{p}.mlp.experts.{e}.down_proj"
            if pooled:
                out += [
                    Linear(up, h, 2 * i, f"{p}.mlp.experts.*.gate_up_proj", family="experts' gate_up_proj"),
                    Linear(down, i, h, down, writes=f"{p}.mlp.experts.*.down_proj", family="experts' down_proj"),
                ]
            else:
                out += [Linear(up, h, 2 * i, up), Linear(down, i, h, down)]
    return out + output_linears(h, shape.vocab)


def full(d: int) -> bool:
    """Whether a side keeps a full covariance (else its diagonal, and it is hashed)."""
    return d <= FULL_COVARIANCE_MAX_WIDTH


def side(lin: Linear, which: str) -> tuple[int, bool]:
    """``(width, keeps a full covariance)`` of a layer's input (``"in"``) or output side."""
    d, hashed = (lin.d_in, lin.hashed_in) if which == "in" else (lin.d_out, lin.hashed_out)
    return d, full(d) and not hashed


def apply_budget(linears: list[Linear], max_bytes: int = WARMUP_MAX_BYTES) -> list[Linear]:
    """The layers with the experts' own sides that the byte budget keeps as diagonals
    (``WARMUP_MAX_BYTES``): the sums counted before the warm-up (each non-expert layer's own input,
    its output, one sum per pool, the experts' own sides); while over ``max_bytes``, the family of
    own sides (one weight's side in every expert) of most bytes falls back, largest first."""
    total, pools = 0, {}
    families: dict[tuple[str, str], list[Linear]] = {}
    for lin in linears:
        own_in = lin.family is None or lin.reads == lin.name
        own_out = lin.family is None or lin.writes is None
        for which, d, own, key in (("in", lin.d_in, own_in, lin.reads), ("out", lin.d_out, own_out, lin.writes)):
            if not own:
                pools[(which, key)] = covariance(d)
                continue
            total += covariance(d)
            if lin.family is not None and full(d):
                families.setdefault((lin.family, which), []).append(lin)
    total += sum(pools.values())
    hashed: set[tuple[str, str]] = set()
    by_size = sorted(families.items(), key=lambda kv: (-sum(8 * side(x, kv[0][1])[0] ** 2 for x in kv[1]), kv[0]))
    for (_, which), members in by_size:
        if total <= max_bytes:
            break
        widths = [side(x, which)[0] for x in members]
        total -= sum(8 * d * d - 8 * d for d in widths)
        hashed |= {(x.name, which) for x in members}
    return [replace(lin, hashed_in=(lin.name, "in") in hashed, hashed_out=(lin.name, "out") in hashed) for lin in linears]


def covariance(d: int) -> int:
    """A float64 warm-up sum: ``d x d``, or the diagonal of a wide side."""
    return 8 * d * d if full(d) else 8 * d


def kept(d: int) -> int:
    """Factor coordinates ``m`` of a side in the global layout."""
    return min(d, FACTOR_DIM)


def curvature(d: int, is_full: bool | None = None) -> int:
    """Curvature coordinates ``c`` of a side: the kept eigen-directions, or every coordinate of a hashed side."""
    return kept(d) if (full(d) if is_full is None else is_full) else d


def distinct_inputs(linears: list[Linear]) -> dict[str, int]:
    return {lin.reads: lin.d_in for lin in linears}


def distinct_sums(linears: list[Linear]) -> list[tuple[int, bool]]:
    """``(width, full)`` of each warm-up sum: one per distinct input, one per distinct output (a
    layer's own, or its experts' pooled one)."""
    inputs = {lin.reads: side(lin, "in") for lin in linears}
    outputs = {lin.writes or lin.name: side(lin, "out") for lin in linears}
    return list(inputs.values()) + list(outputs.values())


# ---- the warm-up ------------------------------------------------------------------------------------


def warmup_bytes(linears: list[Linear], batch_tokens: int, act_bytes: int = 4) -> dict[str, int]:
    """The warm-up's terms (``precondition/warmup.py``, ``AttributionPass.warmup``).

    - ``sums``: one float64 sum per distinct input and one per module output (``WarmupCovariances``),
      on the model's device, for the whole warm-up;
    - ``hook_transient``: the largest a backward hook allocates beside them (one module at a time):
      a full side's real-token copy in float32 (``4 N d``), its float32 Gram matrix and, on the first
      batch, its float64 copy (``12 d^2``); a diagonal side, a chunk of tokens of at most
      ``DIAGONAL_CHUNK_BYTES`` in float32 and its square;
    - ``fit_transient``: the eigendecomposition of the widest full side on the sums' device: its
      float32 copy, the symmetrised matrix, the vectors, the float64 vectors the solver's caller
      gets (``eigh_psd``) and their float32 copy, and the solver's workspace: ``24 d^2`` counted
      with LAPACK's workspace, 38.8 ``d^2`` measured with cuSOLVER's (0.65 GB at d = 4096 on an
      H200, docs/howto/memory.md), so ``40 d^2``;
    - ``basis``: the eigenbasis file (host RAM): per side an ``EigenMap`` ``[d, m]`` float32 or a
      ``HashMap`` (int64 bucket, float32 sign and weight per coordinate), per module the whitening
      ``[m_out, m_in]`` and the eigenvalues ``[c_in] + [c_out]`` in float64.
    """
    sides = distinct_sums(linears)
    sums = sum(8 * d * d if f else 8 * d for d, f in sides)
    widest_full = max((d for d, f in sides if f), default=0)
    widest_diag = max((d for d, f in sides if not f), default=0)
    hook_full = 12 * widest_full**2 + 4 * batch_tokens * widest_full + act_bytes * batch_tokens * widest_full
    # a chunk of real tokens copied out (model dtype), in float32, squared
    chunk = min(DIAGONAL_CHUNK_BYTES, 4 * batch_tokens * widest_diag)
    hook_diag = 2 * chunk + chunk * act_bytes // 4 + 8 * widest_diag if widest_diag else 0
    basis = 0
    for lin in linears:
        for d, f in (side(lin, "in"), side(lin, "out")):
            basis += 4 * d * kept(d) if f else 16 * d
            basis += 8 * curvature(d, f)
        basis += 8 * kept(lin.d_in) * kept(lin.d_out)
    return {
        "sums": sums,
        "hook_transient": max(hook_full, hook_diag),
        "fit_transient": 40 * widest_full**2,
        "basis": basis,
    }


# ---- the main pass ----------------------------------------------------------------------------------


def main_pass_bytes(linears: list[Linear], batch: int, seq: int, row_dim: int = DEFAULT_TOTAL_DIM) -> dict[str, int]:
    """The main pass's terms with the default EK-FAC (``StatsAccumulator``, ``BatchRunner.encoded``).

    - ``ekfac``: the float64 second moments ``[c_out, c_in]`` per module (a hashed side per
      coordinate), on the model's device for the whole pass, and copied to the host with each shard;
    - ``factor_grads``: per batch, ``[B, m_out, m_in]`` float32 per module and their float64 copy in
      the eigenbasis (``rotate``);
    - ``curvature_grads``: per batch, ``[B, c_out, c_in]`` float32 per module with a hashed side
      (the per-coordinate moments need them), held until the batch's statistics are added;
    - ``hashed_transient``: the largest per-module temporaries of a hashed module: its output
      gradient in float32 (``[B, T, d_out]``) in the hook, the float64 square in the update;
    - ``rows``: the batch's float32 rows;
    - ``checkpoint``: the moments serialised with each shard (host memory, while it is written).
    """
    def curv(lin: Linear) -> int:  # c_out * c_in
        return curvature(*side(lin, "out")) * curvature(*side(lin, "in"))

    ekfac = sum(8 * curv(lin) for lin in linears)
    factor = sum(12 * kept(lin.d_out) * kept(lin.d_in) for lin in linears) * batch
    hashed = [lin for lin in linears if not (side(lin, "in")[1] and side(lin, "out")[1])]
    curv_grads = sum(4 * curv(lin) for lin in hashed) * batch
    transient = max(
        (max(4 * batch * seq * (lin.d_out if not side(lin, "out")[1] else lin.d_in), 16 * batch * curv(lin))
         for lin in hashed),
        default=0,
    )  # fmt: skip
    return {
        "ekfac": ekfac,
        "factor_grads": factor,
        "curvature_grads": curv_grads,
        "hashed_transient": transient,
        "rows": 4 * batch * row_dim,
        "checkpoint": ekfac,
    }


def hook_inputs_per_token(linears: list[Linear], act_bytes: int) -> int:
    """Bytes per token of the inputs the capture hooks keep for the backward: one tensor per distinct
    input (modules that read the same input hold the same tensor)."""
    return act_bytes * sum(distinct_inputs(linears).values())


def fmt(n: float) -> str:
    """Bytes in GB (10^9) or MB, two significant decimals."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
