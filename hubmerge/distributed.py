"""Several processes on one merge: each streams its share of the pieces; global statistics are summed.

A run joins a process group when it is started by a launcher that sets the torch.distributed environment
(`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`): `torchrun`, `accelerate launch`, or `hubmerge run
--num-processes N`, which starts `torchrun` itself. Every statistic the engine gathers is an integer count
(radix histograms, sign counts, mask agreement), so summing them across processes gives exactly the
single-process values, and every output byte has a fixed position, so the files are byte-identical.

Accelerate's `PartialState` reads the launcher's environment, picks the local GPU and initialises the process
group; `Group` adds what Accelerate lacks: the collectives the engine needs (exact integer sums, objects) and
the balanced split of the pieces. A run on its own never touches Accelerate.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Collection
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
    return join_launched(device)


def join_launched(device: torch.device) -> tuple[Group, torch.device]:
    """`join` for whatever world size the environment gives (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    `MASTER_ADDR`, `MASTER_PORT`), one process included: through Accelerate's `PartialState`."""
    from accelerate.state import PartialState

    cuda = device.type == "cuda"
    # Accelerate treats a process without LOCAL_RANK as not launched on the GPU; a launcher that sets only
    # the torch.distributed variables means local rank 0, as `torch.distributed` itself assumes.
    os.environ.setdefault("LOCAL_RANK", "0")
    if cuda:
        from accelerate.utils import check_cuda_p2p_ib_support

        if not check_cuda_p2p_ib_support():  # RTX 40xx on old drivers: what `accelerate launch` sets
            os.environ.setdefault("NCCL_P2P_DISABLE", "1")
            os.environ.setdefault("NCCL_IB_DISABLE", "1")
    state = PartialState(cpu=not cuda, backend="nccl" if cuda else "gloo", timeout=WAIT_TIMEOUT)
    if state.num_processes != launched_world_size():
        raise HubmergeError(
            f"WORLD_SIZE is {launched_world_size()} but Accelerate set up {state.num_processes} process(es) "
            f"({state.distributed_type}); was it already initialised differently in this process?"
        )
    if cuda:
        device = state.device  # cuda:LOCAL_RANK (modulo the visible GPUs), already the current device
    return Group(state.process_index, state.num_processes, device), device


def leave() -> None:
    """Leave the process group `join` joined, if any, and reset Accelerate's state, so that a later `join`
    in this process starts afresh."""
    accelerate_state = sys.modules.get("accelerate.state")  # not imported: no PartialState to reset
    if accelerate_state is not None and accelerate_state.PartialState._shared_state:
        accelerate_state.PartialState().destroy_process_group()
        accelerate_state.PartialState._reset_state()
    elif dist.is_initialized():
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


def command_line(ctx: Any, leave_out: Collection[str] = ()) -> list[str]:
    """The arguments that give `ctx`'s command (a click context of the `hubmerge` command line) and the
    commands above it the values they were given, less the parameters named in `leave_out`: what was typed,
    in a normal form, so that `launch` runs the same command, with every option, present or future.

    A parameter left at its default is left out; an explicit value (command line, environment, prompt) is
    written with the parameter's first long option, positional arguments last (after `--` if one starts
    with `-`).
    """
    parents = [*command_line(ctx.parent, leave_out), ctx.info_name] if ctx.parent is not None else []
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.get_params(ctx):
        source = ctx.get_parameter_source(param.name)
        if param.name in leave_out or source is None or source.name == "DEFAULT":
            continue
        value = ctx.params[param.name]
        values = list(value) if param.multiple else [value]
        if param.param_type_name == "argument":
            arguments += [_argument_text(v) for one in values for v in _items(one)]
            continue
        option = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        for one in values:
            if getattr(param, "count", False):
                options += [option] * int(one)
            elif getattr(param, "is_flag", False):
                if param.secondary_opts:
                    options.append(option if one else param.secondary_opts[0])
                elif one:
                    options.append(option)
            else:
                options += [option, *map(_argument_text, _items(one))]
    if any(a.startswith("-") for a in arguments):
        arguments.insert(0, "--")
    return [*parents, *options, *arguments]


def _items(value: Any) -> list[Any]:
    """The values one occurrence of a parameter gave (several where it takes nargs > 1)."""
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _argument_text(value: Any) -> str:
    return str(value.value if isinstance(value, enum.Enum) else value)


def current_command_line(leave_out: Collection[str] = ()) -> list[str]:
    """`command_line` of the command running now (from typer's bundled click, or click)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # typer < 0.29 used click itself
        from click import get_current_context
    return command_line(get_current_context(), leave_out)


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
