"""Several processes on one merge: each streams its share of the pieces; global statistics are summed.

A run joins a process group when it is started by a launcher that sets the torch.distributed environment
(`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`): `torchrun`, `accelerate launch`, or `hubmerge run
--num-processes N`, which starts `torchrun` itself. Every statistic the engine gathers is an integer count
(radix histograms, sign counts, mask agreement), so summing them across processes gives exactly the
single-process values, and every output byte has a fixed position, so the files are byte-identical.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hubmerge.cli_base import ERRORS_DIRECTORY
from hubmerge.errors import HubmergeError

# A search or an evaluation runs on rank 0 alone while the other ranks wait for its result.
WAIT_TIMEOUT = dt.timedelta(hours=12)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Group:
    """This process's place among the processes of one run; the default is a run on its own."""

    rank: int = 0
    world_size: int = 1
    collective_device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over every process (returned on `tensor`'s device)."""
        if not self.is_distributed:
            return tensor
        # contiguous: a collective reduces numel() entries from the first one, whatever a view's strides
        shared = tensor.to(self.collective_device).contiguous()
        dist.all_reduce(shared, op=dist.ReduceOp.SUM)
        return shared.to(tensor.device)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (picklable), on every process."""
        if not self.is_distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0, device=self.collective_device)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order, on every process."""
        if not self.is_distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def shard(self, sizes: list[int]) -> list[int]:
        """Indices of the items this process handles: greedy balance of `sizes`, the same on every rank."""
        if not self.is_distributed:
            return list(range(len(sizes)))
        loads = [0] * self.world_size
        mine = []
        for index, size in enumerate(sizes):
            owner = loads.index(min(loads))
            loads[owner] += max(size, 1)
            if owner == self.rank:
                mine.append(index)
        return mine


SINGLE = Group()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: torch.device) -> tuple[Group, torch.device]:
    """The process group the launcher set up (or `SINGLE`), and this process's compute device.

    With CUDA each process takes the GPU of its `LOCAL_RANK` and the group uses NCCL; on the CPU, gloo.
    """
    if launched_world_size() <= 1:
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=WAIT_TIMEOUT)
    return Group(dist.get_rank(), dist.get_world_size(), device), device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# torchrun without its agent's report and traceback when a process fails: `launch` reports the failure.
TORCHRUN = """
import logging, sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
try:
    main(sys.argv[1:])
except ChildFailedError as failed:
    code = failed.get_first_failure()[1].exitcode
    sys.exit(code if code > 0 else 128 - code)
"""


def launch(num_processes: int, hubmerge_args: list[str]) -> int:
    """Run `hubmerge <hubmerge_args>` in `num_processes` processes on this machine through torchrun.

    torchrun picks a free rendezvous port (`--standalone`) and stops every process when one fails.
    """
    if launched_world_size() > 1:
        raise HubmergeError("--num-processes: this process was already started by a distributed launcher")
    command = [
        sys.executable,
        "-c",
        TORCHRUN,
        "--standalone",
        f"--nproc-per-node={num_processes}",
        "--module",
        "hubmerge",
        *hubmerge_args,
    ]
    env = dict(os.environ)
    # torchrun would otherwise set 1 thread per process and print a warning about it; say it explicitly.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    env.setdefault("LOGLEVEL", "CRITICAL")
    with tempfile.TemporaryDirectory(prefix="hubmerge-errors-") as errors:
        env[ERRORS_DIRECTORY] = errors
        code = subprocess.run(command, env=env, check=False).returncode
        reports = [json.loads(path.read_text()) for path in sorted(Path(errors).glob("*.json"))]
    if code == 0 or not reports:
        return code
    # a hubmerge error says why the run stopped; the other processes then only saw their peer disappear
    report = min(reports, key=lambda r: r["code"] != 2)
    from hubmerge.display import error_line

    error_line(report["message"])
    return report["code"]
