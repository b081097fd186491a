"""The correctness sections of ``benchmarks.gpu_suite`` on small models: the Triton kernels against
the torch path, and padding invariance under the GPU's attention kernels.

* Kernels: ``benchmarks.gpu_kernels``'s checks at a small size (each output against the scatter
  reference, each variant run several times and compared bit for bit), then a short pass of a tiny
  GPT-2 on CUDA with ``HF_GRASS_KERNELS=triton`` against ``=torch``: rows of ``GradientComputer``
  and the rows of a default ``run_attribution_pass`` cache. The GPT-2 uses eager attention, so a
  difference between two runs comes from the kernels, not from an attention backward's atomics.
* Padding: a padded batch of examples of different lengths against each example alone, per
  attention implementation / SDPA backend and dtype (bergson found that flash / memory-efficient
  SDPA kernels make per-example gradients depend on the padding).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from benchmarks._gpu_common import SectionSkipped, free_memory, kernels_mode, max_rel_diff, same_bits
from benchmarks._gpu_llama import LLAMA_TINY, build_llama
from hf_grass.capture import CaptureRequest, GradientComputer
from hf_grass.config import GraSSConfig
from hf_grass.data import collate

# fp32 accumulation in another order: a few ulps of the output's scale, with margin
KERNEL_REL_TOL = 1e-4
# a small Llama for the padding check on the GPU (head_dim 64, as Llama-8B's)
LLAMA_SMALL = {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1024,
               "rope_theta": 500000.0}  # fmt: skip
# (key, dtype, attn_implementation, forced SDPA backend or None for torch's own choice)
PADDING_VARIANTS: list[tuple[str, str, str, str | None]] = [
    ("bf16_sdpa", "bfloat16", "sdpa", None),
    ("bf16_sdpa_math", "bfloat16", "sdpa", "MATH"),
    ("bf16_sdpa_efficient", "bfloat16", "sdpa", "EFFICIENT_ATTENTION"),
    ("bf16_sdpa_flash", "bfloat16", "sdpa", "FLASH_ATTENTION"),
    ("bf16_sdpa_cudnn", "bfloat16", "sdpa", "CUDNN_ATTENTION"),
    ("bf16_eager", "bfloat16", "eager", None),
    ("fp32_sdpa", "float32", "sdpa", None),
    ("fp32_eager", "float32", "eager", None),
]
DRY_PADDING_VARIANTS = ("bf16_sdpa", "bf16_sdpa_math", "bf16_eager", "fp32_sdpa", "fp32_eager")


def varied_examples(vocab: int, lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (n,), generator=gen).tolist()} for n in lengths]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---- Triton kernels ------------------------------------------------------------------------------


def kernels_section(device: torch.device, results: dict[str, Any], save: Callable[[], None]) -> None:
    """``gpu_kernels``'s checks at B=4, T=256, k=1024, then a short pass with each kernel path."""
    from hf_grass import kernels

    if device.type != "cuda":
        raise SectionSkipped(
            "CUDA is not available: the Triton kernels run on CUDA tensors (tests/ runs them in the "
            "Triton interpreter on the CPU)"
        )
    if not kernels.triton_available():
        raise SectionSkipped("triton does not import on this machine")
    from benchmarks import gpu_kernels

    args = argparse.Namespace(batch=4, seq=256, dtype="bfloat16", warmup=2, reps=5, sjlt_nnz=1)
    cases: list[dict[str, Any]] = results.setdefault("kernel_cases", [])
    for name, d_in, d_out in gpu_kernels.GPT2_MODULES[:2]:
        cases.append(gpu_kernels.bench_factgrass(name, d_in, d_out, 1024, args))
        save()
    cases.append(gpu_kernels.bench_sjlt(1024, args))
    results["kernel_cases_ok"] = all(c["ok"] for c in cases)
    results["kernel_rel_tol"] = gpu_kernels.REL_TOL
    save()
    results["pass_rows"] = kernel_pass_rows(device)
    save()
    results["default_cache"] = kernel_default_cache(device)
    results["ok"] = (
        results["kernel_cases_ok"]
        and all(r.get("ok", False) for r in results["pass_rows"].values())
        and results["default_cache"].get("ok", False)
    )


def tiny_gpt2(device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.to(device=device, dtype=torch.float32).eval()


def _rows_twice(computer: GradientComputer, batch: dict[str, torch.Tensor], mode: str) -> list[torch.Tensor]:
    with kernels_mode(mode), computer.session():
        return [computer.compute(batch, CaptureRequest(rows=True)).rows.cpu() for _ in range(2)]  # type: ignore[union-attr]


def kernel_pass_rows(device: torch.device) -> dict[str, Any]:
    """Rows of a padded batch through each kernel path (fp32 and bf16 model), twice each."""
    base = tiny_gpt2(device)
    batch = to_device(collate(varied_examples(512, [64, 50, 33, 17]), 0, "right"), device)
    configs = {
        "factgrass": GraSSConfig(compressor="factgrass", proj_dim=256, preconditioner="identity"),
        "grass": GraSSConfig(compressor="grass", proj_dim=256, preconditioner="identity"),
    }
    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)
        for name, config in configs.items():
            key = f"{name}_{str(dtype).removeprefix('torch.')}"
            try:
                computer = GradientComputer(model, config)
                torch_rows, triton_rows = (
                    _rows_twice(computer, batch, "torch"),
                    _rows_twice(computer, batch, "triton"),
                )
                err = max_rel_diff(triton_rows[0], torch_rows[0])
                entry = {
                    "triton_vs_torch_rel": err,
                    "triton_repeatable": same_bits(triton_rows[0], triton_rows[1]),
                    "torch_repeatable": same_bits(torch_rows[0], torch_rows[1]),
                }
                entry["ok"] = (
                    err <= KERNEL_REL_TOL and entry["triton_repeatable"] and entry["torch_repeatable"]
                )
                out[key] = entry
            except Exception as err:  # noqa: BLE001 - recorded, the other configurations still run
                out[key] = {"error": repr(err), "ok": False}
    free_memory()
    return out


def kernel_default_cache(device: torch.device) -> dict[str, Any]:
    """A default ``GraSSConfig()`` cache (warm-up, EK-FAC, int8 rows) written with each kernel path;
    the Triton one twice. Rows compared dequantised, and bit for bit."""
    from hf_grass.attribution import run_attribution_pass

    model = tiny_gpt2(device)
    examples = varied_examples(512, [64, 50, 33, 17, 64, 40, 25, 9])
    loaded: dict[str, torch.Tensor] = {}
    for run in ("torch", "triton", "triton_again"):
        folder = tempfile.mkdtemp(prefix="gpu_suite_kernels_")
        try:
            with kernels_mode(run.split("_")[0]):
                cache = run_attribution_pass(model, examples, GraSSConfig(cache_dir=folder), batch_size=4,
                                             disable_progress=True)  # fmt: skip
                loaded[run] = cache.load()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    err = max_rel_diff(loaded["triton"], loaded["torch"])
    out = {
        "rows": int(loaded["torch"].shape[0]),
        "dim": int(loaded["torch"].shape[1]),
        "triton_vs_torch_rel": err,
        "triton_vs_torch_same_bits": same_bits(loaded["triton"], loaded["torch"]),
        "triton_repeatable": same_bits(loaded["triton"], loaded["triton_again"]),
    }
    # int8 rows: one rounding step of the per-row scale is 1/127 of the row's largest entry
    out["ok"] = err <= 1.0 / 127 + KERNEL_REL_TOL and out["triton_repeatable"]
    return out


# ---- padding invariance ----------------------------------------------------------------------------


@contextlib.contextmanager
def sdpa_backend(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, name)):
        yield


def _variant_model(base: nn.Module, dtype: str, attn: str) -> nn.Module:
    model = copy.deepcopy(base).to(getattr(torch, dtype))
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    else:  # older transformers read the config's field
        model.config._attn_implementation = attn
    return model


def _rows(computer: GradientComputer, examples: list[dict], side: str, device: torch.device) -> torch.Tensor:
    batch = to_device(collate(examples, 0, side), device)
    return computer.compute(batch, CaptureRequest(rows=True)).rows.double().cpu()  # type: ignore[union-attr]


def padding_variant(
    base: nn.Module,
    variant: tuple[str, str, str, str | None],
    examples: list[dict],
    k: int,
    device: torch.device,
) -> dict[str, Any]:
    """Rows of the padded batch (right and left padding) against each example's row alone."""
    _, dtype, attn, backend = variant
    model = _variant_model(base, dtype, attn)
    computer = GradientComputer(
        model, GraSSConfig(compressor="factgrass", proj_dim=k, preconditioner="identity")
    )
    out: dict[str, Any] = {"dtype": dtype, "attn_implementation": model.config._attn_implementation,
                           "sdpa_backend": backend or "default"}  # fmt: skip
    with sdpa_backend(backend), computer.session():
        alone = torch.cat([_rows(computer, [ex], "right", device) for ex in examples])
        again = _rows(computer, examples[:1], "right", device)
        out["alone_repeatable"] = bool(torch.equal(again[0], alone[0]))
        for side in ("right", "left"):
            batched = _rows(computer, examples, side, device)
            per_example = [max_rel_diff(batched[i], alone[i]) for i in range(len(examples))]
            out[side] = {"max_rel_per_example": per_example, "max_rel": max(per_example)}
    out["max_rel"] = max(out["right"]["max_rel"], out["left"]["max_rel"])
    out["alone_rows"] = alone
    del computer, model
    free_memory()
    return out


def padding_section(
    device: torch.device, dry_run: bool, results: dict[str, Any], save: Callable[[], None]
) -> None:
    """Max relative difference of each example's row in a padded batch against its row alone, per
    variant; ``precision_rel``: each variant's rows alone against fp32 eager (the dtype's own error,
    for scale)."""
    shape, seq, k = (LLAMA_TINY, 16, 16) if dry_run else (LLAMA_SMALL, 128, 256)
    lengths = [seq, (3 * seq) // 4 + 1, seq // 2 - 3, seq // 4 + 2]
    examples = varied_examples(shape["vocab"], lengths, seed=3)
    results.update(lengths=lengths, proj_dim=k, model=shape, compressor="factgrass (input masks), identity")
    base = build_llama(shape, seq, device, torch.float32)
    variants = results.setdefault("variants", {})
    chosen = [v for v in PADDING_VARIANTS if not dry_run or v[0] in DRY_PADDING_VARIANTS]
    chosen.sort(key=lambda v: v[0] != "fp32_eager")  # the reference first
    reference: torch.Tensor | None = None
    for variant in chosen:
        try:
            entry = padding_variant(base, variant, examples, k, device)
            alone = entry.pop("alone_rows")
            if variant[0] == "fp32_eager":
                reference = alone
            if reference is not None:
                entry["precision_rel"] = max(
                    max_rel_diff(alone[i], reference[i]) for i in range(len(examples))
                )
            variants[variant[0]] = entry
        except Exception as err:  # noqa: BLE001 - e.g. a backend that refuses masks: recorded
            variants[variant[0]] = {"error": repr(err)[:500]}
            free_memory()
        save()
    del base
    free_memory()
