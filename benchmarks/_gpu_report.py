"""The headline numbers of a ``benchmarks.gpu_suite`` report, and its markdown table."""

from __future__ import annotations

from typing import Any


def _results(report: dict[str, Any], name: str) -> dict[str, Any]:
    return report.get("sections", {}).get(name, {}).get("results", {})


def _default_pass(report: dict[str, Any]) -> dict[str, Any]:
    """The default pass at the deepest depth that finished (else the probe, else what ran)."""
    section = _results(report, "llama_default_pass")
    final, probe = section.get("final", {}), section.get("probe", {})
    if "steady_tokens_per_s" in final or not probe:
        return final
    return probe


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the targets are judged on, read from the sections' results (missing ones are absent)."""
    out: dict[str, Any] = {}
    plain = _results(report, "llama_plain")
    if "tokens_per_s" in plain:
        out["plain_tokens_per_s"] = plain["tokens_per_s"]
    dp = _default_pass(report)
    if "steady_tokens_per_s" in dp:
        base = dp.get("plain", {}).get("tokens_per_s")
        out["default_pass_tokens_per_s"] = dp["steady_tokens_per_s"]
        out["default_pass_layers"] = dp.get("pass_layers")
        if base:
            out["default_pass_time_over_plain"] = base / dp["steady_tokens_per_s"]
    if "warmup_s" in dp:
        out["warmup_s"] = dp["warmup_s"]
    final = _results(report, "llama_default_pass").get("final", {})
    if final and "steady_tokens_per_s" not in final:  # cut short: how far the deeper pass got
        out["default_pass_incomplete"] = {
            "layers": final.get("pass_layers"),
            "elapsed_s": final.get("elapsed_s"),
            "warmup_s_so_far": final.get("timings", {}).get("warmup", {}).get("seconds"),
        }
    comp = _results(report, "llama_compression")
    for k, ratio in comp.get("ratio_factgrass_over_logra", {}).items():
        out[f"factgrass_over_logra_k{k}"] = ratio
    for k, ratio in comp.get("compress_only_ratio", {}).items():
        out[f"compress_only_factgrass_over_logra_k{k}"] = ratio
    kern = _results(report, "kernels")
    if "ok" in kern:
        out["kernels_ok"] = kern["ok"]
    pg = _results(report, "process_group").get("backends", {})
    for backend, res in pg.items():
        out[f"{backend}_ok"] = res.get("ok", False)
    pad = _results(report, "padding").get("variants", {})
    for key, res in pad.items():
        if "max_rel" in res:
            out[f"padding_max_rel_{key}"] = res["max_rel"]
    out["statuses"] = {name: s.get("status") for name, s in report.get("sections", {}).items()}
    return out


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e6):
            return f"{value:.2e}"
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _llama_lines(report: dict[str, Any]) -> list[str]:
    settings = report.get("settings", {}).get("llama", {})
    shape = settings.get("shape", {})
    plain = _results(report, "llama_plain")
    comp = _results(report, "llama_compression")
    dp = _default_pass(report)
    choice = _results(report, "llama_default_pass").get("depth_choice", {})
    lines = [
        f"### Llama-3.1-8B shape: {shape.get('layers')} layers, hidden {shape.get('hidden')}, "
        f"{settings.get('batch')} x {settings.get('seq')} tokens per step, {settings.get('dtype')}",
        "",
        "| measurement | tokens/s | median s | peak GiB | note |",
        "|---|---:|---:|---:|---|",
        f"| plain forward + backward | {_f(plain.get('tokens_per_s'))} | {_f(plain.get('median_s'))} "
        f"| {_f(plain.get('peak_gib'))} | every parameter requires grad |",
    ]
    for key, res in comp.get("runs", {}).items():
        note = res.get("error", "")[:80] if "error" in res else ""
        if "compress_only_tokens_per_s" in res:
            note = f"compression alone {_f(res['compress_only_tokens_per_s'])} tokens/s"
        lines.append(
            f"| {key} | {_f(res.get('tokens_per_s'))} | {_f(res.get('median_s'))} | {_f(res.get('peak_gib'))} | {note} |"
        )
    for k, ratio in comp.get("ratio_factgrass_over_logra", {}).items():
        alone = comp.get("compress_only_ratio", {}).get(k)
        lines.append(
            f"| FactGraSS / LoGra, k={k} | {_f(ratio)}x | | | target >= 2.6x; compression alone {_f(alone)}x |"
        )
    base = dp.get("plain", {})
    if base:
        lines.append(f"| plain forward + backward at {dp.get('pass_layers')} layers | {_f(base.get('tokens_per_s'))} "
                     f"| {_f(base.get('median_s'))} | {_f(base.get('peak_gib'))} | baseline of the default pass |")  # fmt: skip
    steady = dp.get("steady_tokens_per_s")
    ratio = base.get("tokens_per_s") / steady if steady and base.get("tokens_per_s") else None
    lines.append(f"| default pass (GraSSConfig()), steady state | {_f(steady)} | | {_f(dp.get('peak_gib_main'))} "
                 f"| time {_f(ratio)}x plain (target <= 1.3x); {dp.get('steady_steps', 0)} steps |")  # fmt: skip
    warm = dp.get("timings", {}).get("warmup", {})
    fit = dp.get("timings", {}).get("warmup_fit_eigen_masks", {}) or dp.get("timings", {}).get(
        "warmup_fit_masked_basis", {}
    )
    lines.append(f"| default pass warm-up | {_f(warm.get('seconds'))} s | | {_f(warm.get('peak_gib'))} "
                 f"| of which the eigendecompositions {_f(fit.get('seconds'))} s; {dp.get('pass_layers')} layers |")  # fmt: skip
    if choice:
        lines.append(f"| default pass depth | {choice.get('chosen_layers')} layers | | | probe at {choice.get('probe_layers')} "
                     f"layers: {_f(choice.get('seconds_per_layer'))} s per layer, all {shape.get('layers')} layers "
                     f"~{_f(choice.get('estimated_full_depth_s'))} s, {_f(choice.get('seconds_left'))} s left |")  # fmt: skip
    return lines


def _check_lines(report: dict[str, Any]) -> list[str]:
    lines = ["### Checks", "", "| check | result | detail |", "|---|---|---|"]
    kern = _results(report, "kernels")
    for case in kern.get("kernel_cases", []):
        lines.append(f"| kernel {case['kernel']} {case['module']} k={case['k']} | ok={_f(case.get('ok'))} "
                     f"| triton rel err {_f(case.get('triton_rel_err'))}, repeatable {_f(case.get('triton_repeatable'))}, "
                     f"torch {_f(case.get('torch_ms'))} ms, triton {_f(case.get('triton_ms'))} ms |")  # fmt: skip
    for key, res in kern.get("pass_rows", {}).items():
        lines.append(f"| pass rows {key}, triton vs torch | ok={_f(res.get('ok'))} | rel {_f(res.get('triton_vs_torch_rel'))}, "
                     f"triton repeatable {_f(res.get('triton_repeatable'))}, torch repeatable {_f(res.get('torch_repeatable'))} "
                     f"{res.get('error', '')[:80]} |")  # fmt: skip
    cache = kern.get("default_cache", {})
    if cache:
        lines.append(f"| default cache (int8), triton vs torch | ok={_f(cache.get('ok'))} | rel {_f(cache.get('triton_vs_torch_rel'))}, "
                     f"same bits {_f(cache.get('triton_vs_torch_same_bits'))}, triton repeatable {_f(cache.get('triton_repeatable'))} |")  # fmt: skip
    for backend, res in _results(report, "process_group").get("backends", {}).items():
        forced = res.get("forced", {})
        coll = res.get("collectives", {})
        lines.append(f"| {backend} group (world 1) build + exact query | ok={_f(res.get('ok'))} | collectives ok "
                     f"{_f(coll.get('ok'))} on {coll.get('backend_device')}; rows same bits {_f(forced.get('rows_same_bits'))}, "
                     f"scores rel {_f(forced.get('scores_max_rel'))}, top-5 equal {_f(forced.get('top5_equal'))} "
                     f"{res.get('error', '')[:80]} |")  # fmt: skip
    lines += ["", "Padding invariance: max over examples of max|row in padded batch - row alone| / max|row alone|; "
              "precision: rows alone against fp32 eager (the dtype's own error, for scale).", "",
              "| variant | right padding | left padding | precision | alone repeatable | error |",
              "|---|---:|---:|---:|---|---|"]  # fmt: skip
    for key, res in _results(report, "padding").get("variants", {}).items():
        lines.append(f"| {key} | {_f(res.get('right', {}).get('max_rel'))} | {_f(res.get('left', {}).get('max_rel'))} "
                     f"| {_f(res.get('precision_rel'))} | {_f(res.get('alone_repeatable'))} | {res.get('error', '')[:100]} |")  # fmt: skip
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = _results(report, "environment")
    lines = [
        "## hf_grass GPU suite",
        "",
        f"{env.get('gpu', env.get('device'))}, {_f(env.get('gpu_memory_gib'))} GiB; torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}), triton {env.get('triton')}, transformers {env.get('transformers')}; "
        f"commit {env.get('commit')}, source {env.get('source_sha256')}; {env.get('date')}; "
        f"total {_f(report.get('elapsed_s'))} s",
        "",
        "| section | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name, sec in report.get("sections", {}).items():
        note = sec.get("reason") or sec.get("error") or ""
        lines.append(f"| {name} | {sec.get('status')} | {_f(sec.get('seconds'))} | {str(note)[:120]} |")
    lines += [""] + _llama_lines(report) + [""] + _check_lines(report) + [""]
    return "\n".join(lines)
