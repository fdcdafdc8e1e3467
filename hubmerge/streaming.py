"""Streaming the pieces of a job: this process's share of the pieces of every pass, read one ahead in the
background (into pinned memory when computing on a GPU), written behind the compute, with progress bars.

Memory holds the T+1 input pieces of one tensor as stored (twice: in use and read ahead), never a flattened
model. Large tensors are cut into row blocks (`planning.row_blocks`) so the bound does not even depend on the
largest tensor. With a process group (see `distributed.py`) each process takes a balanced share of the
pieces of every pass.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hubmerge import fused
from hubmerge.distributed import Group
from hubmerge.methods.registry import PieceVector
from hubmerge.nonfinite import NonfiniteCounts
from hubmerge.planning import MergeJob, Rows, piece_entries, row_blocks

# Pieces computed but not yet written: the writer thread may lag this far behind before compute waits.
WRITES_IN_FLIGHT = 2
Piece = tuple[str, Rows, torch.Tensor, list[torch.Tensor]]  # key, rows, flat θ0 piece, flat θ_t pieces


class Stream:
    """The pieces of one job for one process on one device, and the threads that read and write them."""

    def __init__(
        self,
        job: MergeJob,
        device: torch.device,
        group: Group,
        block_entries: int,
        span_entries: int,
        prefetch: bool,
        show_progress: bool,
        nonfinite: NonfiniteCounts,
    ):
        self.job = job
        self.device = device
        self.group = group
        self.block_entries = block_entries
        self.span_entries = span_entries  # 0: whole pieces
        self.prefetch = prefetch
        self.show_progress = show_progress
        self.nonfinite = nonfinite
        self.bytes_read = 0
        self._bars: list[Progress] = []

    def progress(self) -> Progress:
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not self.show_progress,
            transient=False,
            # stdout carries only the result (the `wrote` line, `--json`), so scripts can read it
            console=Console(stderr=True),
        )
        self._bars.append(progress)
        return progress

    def close(self) -> None:
        """Stop the progress bars of passes that an error left open (their generators are closed only when
        the error's traceback goes), so that the error line comes after them."""
        for progress in self._bars:
            progress.stop()
        self._bars.clear()

    def blocks(self, keys: list[str], whole: bool = False, stride: int = 1) -> list[tuple[str, Rows]]:
        """This process's share of the pieces of `keys` (all of them when it runs alone), in key order;
        with `stride`, every stride-th piece of that share."""
        infos = self.job.base.infos
        blocks = [(k, rows) for k in keys for rows in ([None] if whole else self.piece_rows(k))]
        sizes = [piece_entries(infos[k], rows) for k, rows in blocks]
        return [blocks[i] for i in self.group.shard(sizes)][::stride]

    def piece_rows(self, key: str) -> list[Rows]:
        """The row ranges of tensor `key`'s pieces; a 1-D tensor is one piece where the method needs whole
        rows."""
        vector, info = self.job.spec.vector, self.job.base.infos[key]
        if isinstance(vector, PieceVector) and vector.whole_rows and len(info.shape) == 1:
            return [None]
        return row_blocks(info, self.block_entries)

    def pieces(
        self, description: str, keys: list[str], whole: bool = False, stride: int = 1
    ) -> Iterator[tuple[str, Rows]]:
        blocks = self.blocks(keys, whole, stride)
        with self.progress() as progress:
            task = progress.add_task(description, total=len(blocks))
            for item in blocks:
                yield item
                progress.advance(task)

    def read(self, key: str, rows: Rows) -> list[torch.Tensor]:
        """The piece of θ0 and of every θ_t, as stored; pinned for a fast copy when the device is a GPU."""
        pin = self.device.type == "cuda"
        return [ckpt.read(key, rows, pin_memory=pin) for ckpt in (self.job.base, *self.job.models)]

    def on_device(self, pieces: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Flat pieces on the device, as stored: the methods upcast span by span."""
        self.bytes_read += sum(p.numel() * p.element_size() for p in pieces)
        base, *thetas = (p.to(self.device, non_blocking=True).reshape(-1) for p in pieces)
        return base, thetas

    def spans(
        self, base: torch.Tensor, thetas: list[torch.Tensor], whole: bool = False
    ) -> Iterator[tuple[slice, torch.Tensor, list[torch.Tensor]]]:
        """(span, θ0 span, θ_t spans) of one flat piece: spans of `span_entries`, or the whole piece (0 or
        `whole`)."""
        n = base.numel()
        step = (not whole and self.span_entries) or max(n, 1)  # an empty piece has no span
        for start in range(0, n, step):
            span = slice(start, min(start + step, n))
            yield span, base[span], [theta[span] for theta in thetas]

    def check_finite(
        self, key: str, rows: Rows, base: torch.Tensor, thetas: list[torch.Tensor], computed_fused: bool
    ) -> None:
        """Count the NaN/±Inf entries of a piece's inputs, once per piece: after the fused kernels computed
        it, only if they met one while loading it (they count as they load, so this costs no pass)."""
        flagged = fused.take_nonfinite() > 0 if computed_fused else None
        self.nonfinite.check(key, rows, [base, *thetas], self.job.base.infos[key].shape, flagged)

    def inputs(
        self, description: str, whole: bool = False, stride: int = 1
    ) -> Iterator[tuple[str, Rows, torch.Tensor, list[torch.Tensor]]]:
        """(key, rows, flat θ0 piece, flat θ_t pieces) on the device; the next piece is read in the
        background."""
        yield from self.read_ahead(self.pieces(description, self.job.merge_keys, whole, stride))

    def read_ahead(
        self, pieces: Iterable[tuple[str, Rows]]
    ) -> Iterator[tuple[str, Rows, torch.Tensor, list[torch.Tensor]]]:
        """(key, rows, flat θ0 piece, flat θ_t pieces) of `pieces` on the device, each read while the one
        before is computed."""
        if not self.prefetch:
            for key, rows in pieces:
                yield key, rows, *self.on_device(self.read(key, rows))
            return
        with ThreadPoolExecutor(1, thread_name_prefix="hubmerge-read") as reader:
            ahead: tuple[str, Rows, Future[list[torch.Tensor]]] | None = None
            for key, rows in pieces:
                fetched = (key, rows, reader.submit(self.read, key, rows))
                if ahead is not None:
                    yield ahead[0], ahead[1], *self.on_device(ahead[2].result())
                ahead = fetched
            if ahead is not None:
                yield ahead[0], ahead[1], *self.on_device(ahead[2].result())

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[..., None]]:
        """A `submit(fn, *args)` that runs writes on a background thread, at most WRITES_IN_FLIGHT behind."""
        pending: deque[Future[None]] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="hubmerge-write") as writer:

            def submit(fn: Callable[..., None], *args: Any) -> None:
                pending.append(writer.submit(fn, *args))
                while len(pending) > WRITES_IN_FLIGHT:
                    pending.popleft().result()

            try:
                yield submit
            finally:
                while pending:  # raises the first failed write, after the others ended
                    pending.popleft().result()

    def check_complete(self, written: int, expected: int, what: str) -> None:
        total = int(self.group.all_sum(torch.tensor([written], dtype=torch.int64)))
        if total != expected:
            raise RuntimeError(f"{what}: {total} of {expected} bytes written")

    # -- global statistics ------------------------------------------------------------------------------
