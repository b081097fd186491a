"""The development benchmark (``../shared/bench-dev``, or ``--bench-dir``) and its metrics, and
kronfluence's uncompressed EK-FAC on the same data, for side-by-side ratios.

The benchmark's ``common.py`` is loaded as a module from its folder (no ``sys.path`` edit).
kronfluence is optional (``pip install --no-deps kronfluence einops einconv opt-einsum``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_BENCH_DIR = Path(__file__).resolve().parents[2] / "shared" / "bench-dev"
FACT_CHECKPOINT = 2  # the epoch-30 checkpoint, as the benchmark's README prescribes


def load_common(bench_dir: Path) -> ModuleType:
    path = Path(bench_dir) / "common.py"
    if not path.is_file():
        raise FileNotFoundError(f"no bench-dev common.py at {path}; pass --bench-dir")
    spec = importlib.util.spec_from_file_location("bench_dev_common", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # digits_mlp's loader imports its model class relative to it
    spec.loader.exec_module(module)
    return module


def load_bench(common: ModuleType, name: str) -> SimpleNamespace:
    """A benchmark with the model at the checkpoint its protocol uses."""
    bench = common.load(name)
    if name == "fact_tracing":
        bench.model = common.load_checkpoint(bench, FACT_CHECKPOINT)
    return bench


def metrics(common: ModuleType, bench: SimpleNamespace, scores: torch.Tensor) -> dict[str, float]:
    """``scores``: ``[n_query, n_train]``, higher = more helpful (hf_grass's sign)."""
    s = scores.double().T.numpy()
    if bench.name == "fact_tracing":
        return {
            "recall@1": float(common.recall_at_k(s, bench.source, 1)),
            "recall@10": float(common.recall_at_k(s, bench.source, 10)),
        }
    return {"lds": float(common.lds(s, bench.masks, bench.losses))}


# ---- kronfluence ----------------------------------------------------------------------------------


def _linear_model(model: nn.Module) -> nn.Module:
    """A copy with HF ``Conv1D`` modules replaced by equal ``nn.Linear`` ones (kronfluence tracks
    Linear and Conv2d only); weights are shared in value, not in memory."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D":
            linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], linear)
    return model


@dataclass
class KronfluenceSettings:
    """How to run kronfluence (its defaults: true Fisher, EK-FAC, damping 1e-8, every module).

    ``dampings``: one score pass each (``None``: kronfluence's heuristic, 0.1 x each module's mean
    eigenvalue); ``tracked_modules``: module names (``None``: every Linear/Conv1D);
    ``factor_args``: further ``FactorArguments`` fields; ``output_dir``: keep factors and scores there
    (default: a temporary folder).
    """

    dampings: tuple[float | None, ...] = (1e-8,)
    strategy: str = "ekfac"
    empirical_fisher: bool = False
    tracked_modules: list[str] | None = None
    factor_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16
    query_batch_size: int | None = None
    lm: bool = True
    output_dir: str | None = None


def kronfluence_task(lm: bool, tracked_modules: list[str] | None = None) -> Any:
    """kronfluence's ``Task``: the summed token cross-entropy of a causal LM (labels shifted, -100
    ignored; ``sample``: labels drawn from the model, the true Fisher), or of a classifier."""
    from kronfluence.task import Task

    class _Task(Task):
        def _losses(self, batch: dict[str, torch.Tensor], model: nn.Module, sample: bool) -> torch.Tensor:
            if lm:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
                logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            else:
                logits, labels = model(input=batch["input"])["logits"].float(), batch["labels"]
            flat = logits.reshape(-1, logits.shape[-1])
            if sample:
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(flat.detach(), -1), 1).flatten()
                labels = torch.where(labels.reshape(-1) == -100, labels.reshape(-1), drawn)
            return torch.nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="sum")

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            return self._losses(batch, model, sample)

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            return self._losses(batch, model, False)

        def get_attention_mask(self, batch: Any) -> torch.Tensor | None:
            return batch.get("attention_mask") if lm else None

        def get_influence_tracked_modules(self) -> list[str] | None:
            return tracked_modules

    return _Task()


def kronfluence_run(
    model: nn.Module, train: Any, queries: Any, collate: Any, settings: KronfluenceSettings
) -> dict[float | None, torch.Tensor]:
    """kronfluence's pairwise scores ``[n_query, n_train]`` (positive = helpful, hf_grass's sign),
    one matrix per damping of ``settings``, from one factor fit."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    task = kronfluence_task(settings.lm, settings.tracked_modules)
    prepared = prepare_model(_linear_model(model).eval(), task)
    out: dict[float | None, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        folder = settings.output_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="kronfluence_"))
        analyzer = Analyzer("bench", model=prepared, task=task, cpu=True, disable_tqdm=True, output_dir=folder)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
        factor_args = FactorArguments(
            strategy=settings.strategy, use_empirical_fisher=settings.empirical_fisher, **settings.factor_args
        )
        analyzer.fit_all_factors(
            "factors", dataset=train, per_device_batch_size=settings.batch_size, factor_args=factor_args,
            overwrite_output_dir=True,
        )  # fmt: skip
        for i, damping in enumerate(settings.dampings):
            analyzer.compute_pairwise_scores(
                f"scores_{i}",
                factors_name="factors",
                query_dataset=queries,
                train_dataset=train,
                per_device_query_batch_size=settings.query_batch_size or settings.batch_size,
                per_device_train_batch_size=settings.batch_size,
                score_args=ScoreArguments(damping_factor=damping),
                overwrite_output_dir=True,
            )
            scores = analyzer.load_pairwise_scores(f"scores_{i}")["all_modules"]
            out[damping] = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    return out


def kronfluence_scores(
    bench: SimpleNamespace, damping: float | None = 1e-8, strategy: str = "ekfac", batch_size: int = 16
) -> torch.Tensor:
    """kronfluence's pairwise scores ``[n_query, n_train]`` (its default: true Fisher, EK-FAC,
    damping 1e-8), every Linear/Conv1D module with weights and biases, lm_head included."""
    settings = KronfluenceSettings(
        dampings=(damping,), strategy=strategy, batch_size=batch_size, lm=bench.name != "digits_mlp"
    )
    return kronfluence_run(bench.model, bench.train, bench.test, bench.collate, settings)[damping]
