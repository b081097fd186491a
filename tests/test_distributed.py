"""Multi-process caching with torchrun (gloo, CPU), plain and under DeepSpeed ZeRO-2/3."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import N_TRAIN, VOCAB

from hf_grass.attribution import AttributionPass, Batching
from hf_grass.cache import GradientCache
from hf_grass.capture import GradientComputer
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource
from hf_grass.query import Attributor
from hf_grass.testing import random_token_examples, tiny_gpt2

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).with_name("dist_worker.py")
RESUME_WORKER = Path(__file__).with_name("dist_resume_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(WORKER), "--out", str(out), *extra]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # DeepSpeed's CPU shared-memory comm op can abort a worker at interpreter exit ("terminate called
    # without an active exception") after the job has finished; rank 0 writes info.json last, after
    # the last collective both ranks take part in, so the results are whole. Any other failure fails.
    teardown = "terminate called without an active exception" in proc.stderr and (out / "info.json").exists()
    assert proc.returncode == 0 or teardown, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "info.json").read_text())


def launch_failing(out: Path, *extra: str, limit: int = 240, worker: Path = WORKER) -> tuple[int, str]:
    """A run that may fail or hang: (exit status, output). ``limit`` seconds is the hang detector (a
    deadlocked job never ends); a hung job gets SIGTERM, which torchrun passes on to its workers
    (each in its own session), and then SIGKILL, workers included."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(worker), "--out", str(out), *extra]  # fmt: skip
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            status = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            workers = [int(p) for p in children.read_text().split()] if children.exists() else []
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the job hung (no end within {limit}s):\n{log.read_text()[-4000:]}")
    return status, log.read_text()


def single_process(tmp: Path, preconditioner: str) -> tuple[GradientCache, torch.Tensor]:
    model = tiny_gpt2(VOCAB, seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=4, ekfac_sample_size=10,
                         preconditioner=preconditioner, dtype="float32")  # fmt: skip
    computer = GradientComputer(model, config)
    data = random_token_examples(N_TRAIN, VOCAB, seed=0)
    cache = GradientCache(
        AttributionPass(computer, ExampleSource(data), tmp, Batching(3, disable_progress=True)).run()
    )
    scores = Attributor(model, None, cache).attribute(random_token_examples(3, VOCAB, seed=5))
    return cache, scores


def compare(multi_dir: Path, single: GradientCache, single_scores: torch.Tensor) -> None:
    multi = GradientCache(multi_dir / "cache", verify=True)
    assert multi.manifest["world_size"] == 2 and multi.manifest["complete"]
    assert {s["id"] % 2 for s in multi.shards} == {0, 1}  # both ranks wrote shards
    assert multi.indices.tolist() == single.indices.tolist() == list(range(N_TRAIN))
    # Rows: bit-identical. Each shard is computed by one rank, in the same batches as in one process
    # (batches never cross a shard boundary), with the same seeded projections, and the warm-up
    # basis that whitens them is fitted by rank 0 alone from the same batches, so every operation
    # on every row is the same.
    rows_m, rows_s = multi.load(), single.load()
    assert rows_m.dtype == rows_s.dtype and torch.equal(rows_m, rows_s)
    stats_m, stats_s = multi.statistics(), single.statistics()
    assert stats_m.keys() == stats_s.keys()
    for key in stats_s:
        # Statistics: float64 sums of per-example (or per-token) terms, which the ranks add in
        # another order (each its own shards, then an all-reduce). Reordering n terms moves a sum by
        # at most n * eps64 * sum|terms|, and sum|terms| <= max|entry| here (squares on the
        # diagonal, Cauchy-Schwarz off it): with n <= a few hundred tokens that is < 1e-13 of the
        # largest entry. The basis itself is identical, so nothing larger can come in.
        scale = stats_s[key].abs().max().item()
        assert stats_m[key].dtype == stats_s[key].dtype == torch.float64, key
        torch.testing.assert_close(stats_m[key], stats_s[key], rtol=0, atol=1e-12 * scale)
    # Scores: the identical rows times query vectors preconditioned with those statistics. A
    # difference of ~1e-15 in the float64 fit reaches the float32 query vectors as, at most, a
    # different rounding of their last bit, so scores agree to float32 rounding of the score scale
    # (1e-5 of it is ~100 float32 ulps; they are usually bit-identical).
    scores = torch.load(multi_dir / "scores.pt")
    scale = single_scores.abs().max().item()
    torch.testing.assert_close(scores, single_scores, rtol=0, atol=1e-5 * scale)
    # top-k scored across ranks (each rank its shards, lists merged) = the dense argsort
    split = torch.load(multi_dir / "topk.pt")
    assert split["indices"].tolist() == scores.argsort(dim=1, descending=True)[:, :5].tolist()
    # scored during a pass on both ranks (nothing stored), lists merged: the same lists as caching
    # and querying, since each rank computes the very rows the cache holds
    during = torch.load(multi_dir / "during.pt")
    assert during["top"].tolist() == split["indices"].tolist()
    torch.testing.assert_close(during["top_scores"], split["values"], rtol=0, atol=1e-5 * scale)
    assert during["bottom"].tolist() == scores.argsort(dim=1)[:, :5].tolist()
    assert during["selected"][0].tolist() == scores.mean(dim=0).argsort(descending=True)[:4].tolist()


@pytest.mark.parametrize("preconditioner", ["ekfac", "fim"])
def test_torchrun_two_processes_equal_single_process(tmp_path: Path, preconditioner: str) -> None:
    info = launch(tmp_path / "multi", "--preconditioner", preconditioner)
    assert info["world_size"] == 2 and info["rows"] == N_TRAIN
    single, scores = single_process(tmp_path / "single", preconditioner)
    compare(tmp_path / "multi", single, scores)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_equals_plain(tmp_path: Path, stage: int) -> None:
    pytest.importorskip("deepspeed")
    info = launch(tmp_path / "ds", "--zero", str(stage))
    assert info["world_size"] == 2 and info["global_step"] == 1
    assert not info["grads_changed"], "the pass left gradients behind"
    single, scores = single_process(tmp_path / "single", "ekfac")
    compare(tmp_path / "ds", single, scores)


@pytest.mark.parametrize(("at", "what"), [("forward", "loss"), ("backward", "gradient")])
def test_zero3_one_bad_example_stops_every_rank_with_one_message(tmp_path: Path, at: str, what: str) -> None:
    """Example 13 lies in shard 3, which rank 1 computes (3 % 2): its non-finite loss (or gradient)
    must not leave rank 0 waiting in a collective forward; both ranks raise the same error."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "bad"
    status, output = launch_failing(out, "--zero", "3", "--poison", "13", "--poison-at", at)
    assert status != 0, output[-3000:]
    errors = [out / f"error-rank{r}.txt" for r in range(2)]
    assert all(e.exists() for e in errors), output[-4000:]
    first, second = (e.read_text() for e in errors)
    assert first == second
    assert first.startswith(f"rank 1 of 2: non-finite {what} for training example index 13 (all: [13])")
    assert "rank 0 of 2" not in first and "Every process of the ZeRO-3 job stops" in first


def test_plain_ddp_one_bad_example_stops_every_rank(tmp_path: Path) -> None:
    """Without ZeRO-3 each rank runs its own forwards: example 13 (shard 3, rank 1) fails on rank 1
    alone, and rank 0 must learn it at its next shard boundary (it used to finish its shards and
    wait at the final barrier, or end without error). Both ranks raise the same error."""
    out = tmp_path / "bad"
    status, output = launch_failing(out, "--poison", "13", "--poison-at", "forward")
    assert status != 0, output[-3000:]
    errors = [out / f"error-rank{r}.txt" for r in range(2)]
    assert all(e.exists() for e in errors), output[-4000:]
    first, second = (e.read_text() for e in errors)
    assert first == second
    assert first.startswith("rank 1 of 2: non-finite loss for training example index 13 (all: [13])")
    assert "rank 0 of 2" not in first and "Every process of the job stops here" in first


def test_resume_with_ranks_that_disagree_on_the_warm_up(tmp_path: Path) -> None:
    """After a crash between rank 0's and rank 1's record of the eigenbasis, rank 0 finds it and rank
    1 does not: they decide together (both run the warm-up again, which gives the same basis), so
    the resumed job ends, complete, with the rows of the first build."""
    out = tmp_path / "resume"
    out.mkdir()
    status, output = launch_failing(out, worker=RESUME_WORKER)
    assert status == 0, output[-4000:]
    assert json.loads((out / "info.json").read_text()) == {"complete": True, "rows_equal": True}
