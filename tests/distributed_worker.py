"""Runs recipes as one process of a torchrun group, for test_distributed.py (not a test module itself).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py JOBS.json

JOBS.json: a list of {"recipe": {...}, "output": DIR, "block_entries": N, "max_shard_size": N}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hubmerge import parse_recipe, run_recipe
from hubmerge.distributed import join, leave


def main(jobs_file: str) -> None:
    group, device = join(torch.device("cpu"))
    try:
        for job in json.loads(Path(jobs_file).read_text()):
            run_recipe(
                parse_recipe(job["recipe"], origin=job["output"]),
                output=job["output"],
                device=device,
                group=group,
                block_entries=job["block_entries"],
                max_shard_size=job["max_shard_size"],
                model_card=False,
            )
    finally:
        leave()


if __name__ == "__main__":
    main(sys.argv[1])
