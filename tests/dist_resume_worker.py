"""Launched by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

A resume after a crash that left the ranks' files disagreeing: both ranks build an EK-FAC cache,
then rank 1's part of the manifest is put back to what a crash leaves when it strikes after rank 0
recorded the warm-up's eigenbasis and before rank 1 did (no basis, no shards, no statistics). The
pass is run again: rank 0 finds the basis and rank 1 does not, and both must still take the same
branch (each deciding alone, rank 1 waited in the warm-up's collectives while rank 0 went on). Rank
0 writes ``info.json``: whether the resumed cache is complete and its rows equal the first build's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_grass.attribution import AttributionPass, Batching  # noqa: E402
from hf_grass.cache import GradientCache  # noqa: E402
from hf_grass.cache.files import atomic_write_json  # noqa: E402
from hf_grass.cache.manifest import load_json, part_name  # noqa: E402
from hf_grass.capture import GradientComputer  # noqa: E402
from hf_grass.config import GraSSConfig  # noqa: E402
from hf_grass.data import ExampleSource  # noqa: E402
from hf_grass.distributed import current_distributed  # noqa: E402
from hf_grass.testing import random_token_examples, tiny_gpt2  # noqa: E402

VOCAB, N_TRAIN = 40, 23


def build(cache_dir: str) -> None:
    model = tiny_gpt2(VOCAB, seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=4, ekfac_sample_size=10,
                         preconditioner="ekfac", dtype="float32")  # fmt: skip
    source = ExampleSource(random_token_examples(N_TRAIN, VOCAB, seed=0))
    dist = current_distributed()
    AttributionPass(GradientComputer(model, config), source, cache_dir, Batching(3, disable_progress=True), dist).run()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cache_dir = os.path.join(opts.out, "cache")
    build(cache_dir)
    first = GradientCache(cache_dir).load() if rank == 0 else None
    torch.distributed.barrier()
    if rank == 1:  # what a crash between rank 0's and rank 1's record of the basis leaves
        path = os.path.join(cache_dir, part_name(rank, world))
        part = load_json(path)
        part.update(eigenbasis=None, shards=[], stats=[], complete=False)
        atomic_write_json(path, part)
    torch.distributed.barrier()
    build(cache_dir)
    if rank == 0:
        cache = GradientCache(cache_dir, verify=True)
        info = {"complete": cache.manifest["complete"], "rows_equal": bool(torch.equal(cache.load(), first))}
        with open(os.path.join(opts.out, "info.json"), "w") as fh:
            json.dump(info, fh)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
