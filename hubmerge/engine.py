"""The streaming engine: passes over the T+1 checkpoints, one piece of one tensor at a time.

Memory holds the T+1 input pieces of one tensor as stored, a few float32 pieces and small global summaries
(two radix histograms per task, a sign count, the agreement histogram), never a flattened model. Large
tensors are cut into row blocks so the bound does not even depend on the largest tensor. On the CPU the
fused kernels (`hubmerge.fused`) compute a whole piece in one loop; otherwise the methods' tensor functions
run over cache-sized spans of a piece (whole pieces on a GPU), each upcast to float32 only there. Every
entry of every floating-point tensor of the base counts in d (sorted key order, as the reference flattens);
non-float tensors are copied.

A reader thread fetches the next piece of all T+1 checkpoints while the current one is computed (into pinned
memory when computing on a GPU), and a writer thread puts finished pieces in place behind the compute. With a
process group (see `distributed.py`) each process takes a balanced share of the pieces of every pass and the
global statistics are summed across processes.

Passes per method: Task Arithmetic, weight averaging, TALL/Consensus with TA: one. Magnitude masking and
pruning: two threshold histograms, then output. TIES: two threshold histograms, the majority sign guessed
from every 16th piece, then output, which counts the true majority; if the guess was wrong, the output pass
runs again with it (bf16 deltas cancel exactly often, so most pieces can depend on it).
TALL/Consensus with TIES (and TIES `max`): two threshold histograms, the majority sign, then output.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hubmerge import fused
from hubmerge.artifacts import OUTPUT_DTYPES, ArtifactWriter, output_dtype
from hubmerge.distributed import SINGLE, Group
from hubmerge.errors import HubmergeError
from hubmerge.hub import HubSource
from hubmerge.lock import Lock
from hubmerge.methods import METHODS, MergeSpec
from hubmerge.methods.tall import agreement_histograms, consensus_mask, mask_count, tall_masks
from hubmerge.methods.task_arithmetic import apply_vector, sum_in_task_order, task_vector, task_vectors
from hubmerge.methods.ties import (
    disjoint_merge,
    elect_sign,
    resolve_zero_signs,
    sign_count,
    trim,
)
from hubmerge.methods.topk import (
    HIGH_BUCKETS,
    LOW_BUCKETS,
    high_codes_,
    high_histogram,
    kth_rank,
    locate,
    low_codes_,
    low_histogram,
    magnitude_bits,
    tensor_threshold,
    threshold_value,
    topk_mask,
)
from hubmerge.nonfinite import NonfiniteCounts
from hubmerge.recipe import Recipe
from hubmerge.sources import (
    Checkpoint,
    SourceError,
    TensorInfo,
    check_compatible,
    locate_source,
    open_source,
    sources_error,
)
from hubmerge.writer import ShardedFiles, Slot

# 8 MiB float32 pieces: on a 1B bf16 model at T = 8, 2^22 entries gave 1.27 GiB peak RSS (glibc keeps freed
# piece buffers), 2^21 0.85 GiB at about the same speed, 2^20 0.60 GiB but 1.6x slower (docs/benchmarks.md).
DEFAULT_BLOCK_ENTRIES = 1 << 21
# A plain TIES merge guesses the majority sign from every 16th piece, then checks it in the output pass.
MAJORITY_SAMPLE_STRIDE = 16
# On the CPU the arithmetic of a piece runs over spans of this many entries, so the float32 temporaries of a
# span (a few per task) stay in the caches; with whole 2^21-entry pieces, Task Arithmetic took 1.7x and TALL
# masks 1.2-1.5x the engine time (2^17-2^19 were within noise of each other; docs/benchmarks.md). A GPU
# computes whole pieces.
CPU_SPAN_ENTRIES = 1 << 18
# Pieces computed but not yet written: the writer thread may lag this far behind before compute waits.
WRITES_IN_FLIGHT = 2
Rows = tuple[int, int] | None
Piece = tuple[str, Rows, torch.Tensor, list[torch.Tensor]]  # key, rows, flat θ0 piece, flat θ_t pieces


@dataclass
class MergeJob:
    """A validated recipe with its sources opened (headers only): everything known before tensors are read."""

    recipe: Recipe
    origin: str
    spec: MergeSpec
    parameters: dict[str, Any]
    base: Checkpoint
    models: list[Checkpoint]

    @property
    def task_names(self) -> list[str]:
        return self.recipe.task_names

    @cached_property
    def merge_keys(self) -> list[str]:
        """Floating-point tensors, sorted: the entries that count in d."""
        return sorted(k for k, info in self.base.infos.items() if info.is_float and self.recipe.selects(k))

    @cached_property
    def copy_keys(self) -> list[str]:
        merged = set(self.merge_keys)
        return sorted(k for k in self.base.infos if k not in merged)

    @cached_property
    def d(self) -> int:
        return sum(self.base.infos[k].numel for k in self.merge_keys)

    @property
    def vector_dtype(self) -> torch.dtype:
        """The dtype of a compressed output's τ_MTL (or kept values)."""
        return OUTPUT_DTYPES[self.recipe.tau_dtype or "float32"]

    def out_dtype(self, key: str) -> torch.dtype:
        info = self.base.infos[key]
        return output_dtype(self.recipe.dtype, info.dtype) if info.is_float else info.dtype

    def close(self) -> None:
        for ckpt in (self.base, *self.models):
            ckpt.close()


def locate_sources(
    recipe: Recipe, *, token: str | None = None, endpoint: str | None = None
) -> dict[str, Path | HubSource]:
    """Every source of the recipe, Hub ids pinned to commits; downloads nothing.

    Raises:
        HubmergeError: naming every source that cannot be located, not only the first.
    """
    located: dict[str, Path | HubSource] = {}
    errors: list[SourceError] = []
    for spec in dict.fromkeys([recipe.base, *recipe.sources]):
        try:
            located[spec] = locate_source(spec, token=token, endpoint=endpoint)
        except SourceError as err:
            errors.append(err)
    if errors:
        raise sources_error(errors)
    return located


def prepare(
    recipe: Recipe,
    origin: str = "<recipe>",
    *,
    token: str | None = None,
    endpoint: str | None = None,
    lock: Lock | None = None,
) -> MergeJob:
    """Resolve every source and check that the models match the base; reads no tensor data.

    All sources are located (and a lock checked) before the first download, so a typo in the last model
    id does not cost the download of the others.
    """
    method = METHODS[recipe.method]
    spec = method.spec(recipe.parameters, recipe.task_names)
    located = locate_sources(recipe, token=token, endpoint=endpoint)
    if lock is not None:
        lock.check({s: where for s, where in located.items() if isinstance(where, HubSource)})
    opened = {s: open_source(s, where, token=token, endpoint=endpoint) for s, where in located.items()}
    base, models = opened[recipe.base], [opened[source] for source in recipe.sources]
    check_compatible(
        base, models, recipe.task_names, recipe.selects, own_tensors=method.result == "compressed"
    )
    return MergeJob(
        recipe=recipe,
        origin=origin,
        spec=spec,
        parameters=method.resolved_parameters(recipe.parameters, recipe.task_names),
        base=base,
        models=models,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HubmergeError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise HubmergeError(f"--device {name}: choose cpu, cuda or auto")
    return torch.device(name)


def row_blocks(info: TensorInfo, block_entries: int) -> list[Rows]:
    """Row ranges of at most ~block_entries entries; each but the last holds a multiple of 8 entries, so
    bit-packed masks of consecutive blocks concatenate into the mask of the whole tensor."""
    if not info.shape or info.numel <= block_entries or info.shape[0] <= 1:
        return [None]
    row = info.numel // info.shape[0]
    align = 8 // math.gcd(row, 8)
    rows = max(align, block_entries // max(row, 1) // align * align)
    return [(start, min(start + rows, info.shape[0])) for start in range(0, info.shape[0], rows)]


def piece_entries(info: TensorInfo, rows: Rows) -> int:
    if rows is None:
        return info.numel
    return (rows[1] - rows[0]) * (info.numel // info.shape[0])


def first_entry(info: TensorInfo, rows: Rows) -> int:
    """Row-major index of the piece's first entry in its tensor."""
    return 0 if rows is None else rows[0] * (info.numel // info.shape[0])


def majority_of(sign_total: int) -> int:
    return (sign_total > 0) - (sign_total < 0)


def pass_names(spec: MergeSpec) -> list[str]:
    names = []
    if spec.global_topk_density is not None:
        names += ["top-k thresholds (high bits)", "top-k thresholds (low bits)"]
    if spec.tensor_topk_density is not None:
        names.append("per-tensor thresholds")
    if spec.majority_sign_pass:
        names.append("TIES majority sign")
    elif spec.needs_majority_sign:
        names.append("TIES majority sign (sample)")
    names.append("merge and write")
    return names


def plan_summary(job: MergeJob, block_entries: int = DEFAULT_BLOCK_ENTRIES) -> dict[str, Any]:
    """What a run will do and cost, for `--dry-run`."""
    passes = pass_names(job.spec)
    sampled = sum(name.endswith("(sample)") for name in passes)
    full_passes = len(passes) - sampled + sampled / MAJORITY_SAMPLE_STRIDE
    float_bytes = sum(ckpt.infos[k].nbytes for ckpt in (job.base, *job.models) for k in job.merge_keys)
    copy_bytes = sum(job.base.infos[k].nbytes for k in job.copy_keys)
    t = len(job.models)
    if job.spec.result == "merged":
        output_bytes = sum(job.base.infos[k].numel * job.out_dtype(k).itemsize for k in job.merge_keys)
        output_bytes += copy_bytes
    else:
        width = job.vector_dtype.itemsize
        vector = (
            width * job.d if job.spec.vector != "none" else width * job.d * (job.spec.mask_density or 0) * t
        )
        output_bytes = int(vector) + t * sum(math.ceil(job.base.infos[k].numel / 8) for k in job.merge_keys)
    piece = max((min(job.base.infos[k].numel, block_entries) for k in job.merge_keys), default=0)
    largest_row = max(
        (job.base.infos[k].numel // max(job.base.infos[k].shape[:1] or [1]) for k in job.merge_keys),
        default=0,
    )
    piece = max(piece, largest_row)
    return {
        "recipe": job.origin,
        "method": job.recipe.method,
        "result": job.spec.result,
        "parameters": job.parameters,
        "sources": [
            {"role": "base", "name": "base", **job.base.provenance.as_dict()},
            *(
                {"role": "task", "name": name, **m.provenance.as_dict()}
                for name, m in zip(job.task_names, job.models, strict=True)
            ),
        ],
        "tensors": {"merged": len(job.merge_keys), "copied": len(job.copy_keys)},
        "parameters_counted": job.d,
        "passes": passes,
        "bytes_to_read": int(float_bytes * full_passes) + copy_bytes,
        "output_bytes": output_bytes,
        "peak_memory_estimate": peak_memory_estimate(job, piece),
    }


def peak_memory_estimate(job: MergeJob, piece: int) -> int:
    """Bytes of tensors alive at once when pieces hold up to `piece` entries (computed on the CPU)."""
    t = len(job.models)
    stored = max((job.base.infos[k].dtype.itemsize for k in job.merge_keys), default=4)
    span = min(piece, CPU_SPAN_ENTRIES)
    # T+1 input pieces as stored, twice (in use and read ahead); three float32 pieces (θ0 and the two code
    # buffers of a threshold pass, or an output piece); a compressed piece's T masks (and T float32 value
    # pieces for magnitude pruning); per span: T+1 inputs, T task vectors and a few work buffers, TIES adding
    # T trimmed and T sign-selected vectors
    per_entry = 2 * (t + 1) * stored + 3 * 4
    if job.spec.result == "compressed":
        per_entry += t * (1 + 4 * job.spec.own_values)
    spans = span * 4 * ((5 if job.spec.vector == "ties" else 3) * t + 6)
    # the fused kernels' per-thread copies of the top-bits histograms
    thresholds = job.spec.global_topk_density is not None or job.spec.tensor_topk_density is not None
    copies = thresholds * torch.get_num_threads() * t * fused.HIGH_HISTOGRAM_COPIES_BYTES
    return piece * per_entry + spans + copies


@dataclass
class RunStats:
    num_tasks: int
    thresholds: list[float | None] | None = None
    sign_total: int | None = None
    kept: list[int] = field(default_factory=list)
    histogram: torch.Tensor | None = None
    histogram_active: torch.Tensor | None = None
    consensus_kept: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.thresholds is not None:
            out["topk_thresholds"] = self.thresholds
        if self.sign_total is not None:
            out["ties_sign_total"] = self.sign_total
        if self.kept:
            out["mask_kept"] = self.kept
        if self.histogram is not None:
            out["agreement_histogram"] = [int(x) for x in self.histogram]
            out["agreement_histogram_active"] = [int(x) for x in self.histogram_active]
        return out


class Engine:
    """Runs the passes of one job on one device, as one process of `group`."""

    def __init__(
        self,
        job: MergeJob,
        device: torch.device,
        block_entries: int = DEFAULT_BLOCK_ENTRIES,
        show_progress: bool = False,
        group: Group = SINGLE,
        prefetch: bool = True,
        span_entries: int | None = None,
        fused_kernels: bool = True,
        allow_nonfinite: bool = False,
    ):
        self.job = job
        self.spec = job.spec
        self.device = device
        self.block_entries = block_entries
        self.show_progress = show_progress and group.is_main
        self.group = group
        self.prefetch = prefetch
        if span_entries is None:
            span_entries = CPU_SPAN_ENTRIES if device.type == "cpu" else 0
        self.span_entries = span_entries  # 0: whole pieces
        # the fused CPU kernels where they compile (`hubmerge.fused`); False: torch operations only
        self.fused_kernels = fused_kernels and device.type == "cpu" and fused.library() is not None
        self._scratch = torch.empty(0, dtype=torch.float32, device=device)
        self.nonfinite = NonfiniteCounts(
            ["base", *job.task_names],
            [ckpt.name for ckpt in (job.base, *job.models)],
            allow=allow_nonfinite,
            use_kernels=self.fused_kernels,
        )
        t = len(job.models)
        self.stats = RunStats(num_tasks=t)
        if self.spec.masks is not None:
            # Zeros, not None: a process may hold no piece at all, and the sums across processes need a value.
            self.stats.histogram = torch.zeros(t + 1, dtype=torch.int64)
            self.stats.histogram_active = torch.zeros(t + 1, dtype=torch.int64)
            self.stats.kept = [0] * t
        self._tensor_thresholds: dict[str, list[float | None]] = {}
        self._majority = 0
        # Whether the output pass counts the TIES signs (its majority is then the sample's guess), and the count
        self._counting_signs = False
        self._sign_count = 0
        self.bytes_read = 0
        # SHA-256 of the output files this process wrote whole, computed while writing them
        self.digests: dict[str, str] = {}
        self._bars: list[Progress] = []

    def _progress(self) -> Progress:
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

    def _blocks(self, keys: list[str], whole: bool = False, stride: int = 1) -> list[tuple[str, Rows]]:
        """This process's share of the pieces of `keys` (all of them when it runs alone), in key order;
        with `stride`, every stride-th piece of that share."""
        infos = self.job.base.infos
        blocks = [
            (k, rows)
            for k in keys
            for rows in ([None] if whole else row_blocks(infos[k], self.block_entries))
        ]
        sizes = [piece_entries(infos[k], rows) for k, rows in blocks]
        return [blocks[i] for i in self.group.shard(sizes)][::stride]

    def _pieces(
        self, description: str, keys: list[str], whole: bool = False, stride: int = 1
    ) -> Iterator[tuple[str, Rows]]:
        blocks = self._blocks(keys, whole, stride)
        with self._progress() as progress:
            task = progress.add_task(description, total=len(blocks))
            for item in blocks:
                yield item
                progress.advance(task)

    def _read(self, key: str, rows: Rows) -> list[torch.Tensor]:
        """The piece of θ0 and of every θ_t, as stored; pinned for a fast copy when the device is a GPU."""
        pin = self.device.type == "cuda"
        return [ckpt.read(key, rows, pin_memory=pin) for ckpt in (self.job.base, *self.job.models)]

    def _on_device(self, pieces: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Flat pieces on the device, as stored: the methods upcast span by span."""
        self.bytes_read += sum(p.numel() * p.element_size() for p in pieces)
        base, *thetas = (p.to(self.device, non_blocking=True).reshape(-1) for p in pieces)
        return base, thetas

    def _spans(
        self, base: torch.Tensor, thetas: list[torch.Tensor]
    ) -> Iterator[tuple[slice, torch.Tensor, list[torch.Tensor]]]:
        """(span, θ0 span, θ_t spans) of one flat piece: spans of `span_entries`, or the whole piece (0)."""
        n = base.numel()
        step = self.span_entries or max(n, 1)  # an empty piece has no span
        for start in range(0, n, step):
            span = slice(start, min(start + step, n))
            yield span, base[span], [theta[span] for theta in thetas]

    def _fusable(self, base: torch.Tensor, thetas: list[torch.Tensor]) -> bool:
        return self.fused_kernels and fused.supports(base, *thetas)

    def _check_finite(
        self, key: str, rows: Rows, base: torch.Tensor, thetas: list[torch.Tensor], computed_fused: bool
    ) -> None:
        """Count the NaN/±Inf entries of a piece's inputs, once per piece: after the fused kernels computed
        it, only if they met one while loading it (they count as they load, so this costs no pass)."""
        flagged = fused.take_nonfinite() > 0 if computed_fused else None
        self.nonfinite.check(key, rows, [base, *thetas], self.job.base.infos[key].shape, flagged)

    def _float32_scratch(self, n: int) -> torch.Tensor:
        """n entries of a float32 buffer reused across pieces (only within one piece's computation)."""
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.float32, device=self.device)
        return self._scratch[:n]

    def _inputs(
        self, description: str, whole: bool = False, stride: int = 1
    ) -> Iterator[tuple[str, Rows, torch.Tensor, list[torch.Tensor]]]:
        """(key, rows, flat θ0 piece, flat θ_t pieces) on the device; the next piece is read in the
        background."""
        yield from self._read_ahead(self._pieces(description, self.job.merge_keys, whole, stride))

    def _read_ahead(
        self, pieces: Iterable[tuple[str, Rows]]
    ) -> Iterator[tuple[str, Rows, torch.Tensor, list[torch.Tensor]]]:
        """(key, rows, flat θ0 piece, flat θ_t pieces) of `pieces` on the device, each read while the one
        before is computed."""
        if not self.prefetch:
            for key, rows in pieces:
                yield key, rows, *self._on_device(self._read(key, rows))
            return
        with ThreadPoolExecutor(1, thread_name_prefix="hubmerge-read") as reader:
            ahead: tuple[str, Rows, Future[list[torch.Tensor]]] | None = None
            for key, rows in pieces:
                fetched = (key, rows, reader.submit(self._read, key, rows))
                if ahead is not None:
                    yield ahead[0], ahead[1], *self._on_device(ahead[2].result())
                ahead = fetched
            if ahead is not None:
                yield ahead[0], ahead[1], *self._on_device(ahead[2].result())

    @contextlib.contextmanager
    def _writer(self) -> Iterator[Callable[..., None]]:
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

    def _check_complete(self, written: int, expected: int, what: str) -> None:
        total = int(self.group.all_sum(torch.tensor([written], dtype=torch.int64)))
        if total != expected:
            raise RuntimeError(f"{what}: {total} of {expected} bytes written")

    # -- global statistics ------------------------------------------------------------------------------

    def _radix_thresholds(
        self,
        rank: int,
        pieces: Callable[[str], Iterator[Piece]],
        shared: bool,
    ) -> list[float | None]:
        """Each task's `rank`-th smallest |τ| over the (θ0, θ_t) pieces that `pieces(description)` yields
        (called twice: high bits, then low bits); `shared`: over the pieces of every process."""
        high = self._magnitude_histograms(pieces("top-k thresholds (high bits)"), None)
        if shared:
            high = self.group.all_sum(high)
        buckets = [locate(h, rank) for h in high]
        low = self._magnitude_histograms(
            pieces("top-k thresholds (low bits)"), [bucket for bucket, _ in buckets]
        )
        if shared:
            low = self.group.all_sum(low)
        return [
            threshold_value(bucket, locate(lo, rank_in_bucket)[0])
            for (bucket, rank_in_bucket), lo in zip(buckets, low, strict=True)
        ]

    def _magnitude_histograms(self, pieces: Iterator[Piece], buckets: list[int] | None) -> torch.Tensor:
        """Per task, the radix histogram over `pieces` of the |τ_t| bit patterns: of their top 16 bits
        (`buckets` None), else of their low 16 bits inside task t's bucket. A [T, bins] int64 tensor.

        The fused kernel reads each piece once for every task. Otherwise codes are formed span by span (in
        the caches) into one of two reused piece buffers, while a counting thread runs the bincount of the
        other: bincount uses one core, the span arithmetic all of them. (One bincount per span into
        span-sized buffers was slower: docs/benchmarks.md.)
        """
        # the fused kernel also counts the low codes below and above the bucket (the first and last bins)
        bins = HIGH_BUCKETS if buckets is None else LOW_BUCKETS + 2
        counts = torch.zeros(len(self.job.models), bins, dtype=torch.int64, device=self.device)
        histograms = counts if buckets is None else counts[:, 1:-1]
        histogram = high_histogram if buckets is None else low_histogram
        buffers = [torch.empty(0, dtype=torch.int32, device=self.device) for _ in range(2)]
        counting: list[Future[None] | None] = [None, None]

        def count(task: int, codes: torch.Tensor) -> None:
            histograms[task] += histogram(codes)

        def counted() -> None:
            for pending in counting:
                if pending is not None:
                    pending.result()

        with ThreadPoolExecutor(1, thread_name_prefix="hubmerge-count") as counter:
            slot = 0
            for key, rows, base, thetas in pieces:
                if self._fusable(base, thetas):
                    counted()  # a bincount of an earlier piece may still be adding to counts
                    fused.magnitude_histograms(base, thetas, buckets, counts)
                    self._check_finite(key, rows, base, thetas, computed_fused=True)
                    continue
                self._check_finite(key, rows, base, thetas, computed_fused=False)
                n, base32 = base.numel(), base.float()
                for i, theta in enumerate(thetas):
                    if counting[slot] is not None:
                        counting[slot].result()
                    if buffers[slot].numel() < n:
                        buffers[slot] = torch.empty(n, dtype=torch.int32, device=self.device)
                    codes = buffers[slot][:n]
                    for span, base_span, (theta_span,) in self._spans(base32, [theta]):
                        tau = task_vector(base_span, theta_span, out=codes[span].view(torch.float32))
                        bits = magnitude_bits(tau, out=tau)
                        high_codes_(bits) if buckets is None else low_codes_(bits, buckets[i])
                    counting[slot] = counter.submit(count, i, codes)
                    slot ^= 1
            counted()
        return histograms

    def _global_thresholds(self, density: float) -> list[float | None]:
        rank = kth_rank(self.job.d, density)
        if rank == 0:
            return [None] * len(self.job.models)

        def pieces(description: str) -> Iterator[Piece]:
            return self._inputs(description)

        return self._radix_thresholds(rank, pieces, shared=True)

    def _per_tensor_thresholds(self, density: float) -> None:
        """`trim: tensor`: each tensor's own k-th |τ|; a tensor of several row blocks by radix selection over
        its blocks, so not even the largest tensor is held whole. Each process takes whole tensors. Their
        reads (a tensor of several blocks twice: high bits, then low bits) form one stream, each read while
        the piece before is computed."""
        infos, t = self.job.base.infos, len(self.job.models)
        plans = {
            key: (row_blocks(infos[key], self.block_entries), kth_rank(infos[key].numel, density))
            for key, _ in self._blocks(self.job.merge_keys, whole=True)
        }
        reads = [
            (key, rows)
            for key, (blocks, rank) in plans.items()
            if rank
            for rows in (blocks if len(blocks) == 1 else blocks * 2)
        ]
        mine: dict[str, list[float | None]] = {}
        with contextlib.closing(self._read_ahead(reads)) as stream, self._progress() as progress:

            def pieces(count: int) -> Iterator[Piece]:
                return itertools.islice(stream, count)

            task = progress.add_task("per-tensor thresholds", total=len(plans))
            for key, (blocks, rank) in plans.items():
                if rank == 0:
                    mine[key] = [None] * t
                elif len(blocks) == 1:
                    _, rows, base, thetas = next(pieces(1))
                    self._check_finite(key, rows, base, thetas, computed_fused=False)
                    taus = task_vectors(base, thetas)
                    mine[key] = [tensor_threshold(tau, density) for tau in taus]
                else:
                    mine[key] = self._radix_thresholds(
                        rank, lambda _, count=len(blocks): pieces(count), shared=False
                    )
                progress.advance(task)
        for share in self.group.gather(mine):
            self._tensor_thresholds.update(share)

    def _thresholds_for(self, key: str) -> list[float | None]:
        if key in self._tensor_thresholds:
            return self._tensor_thresholds[key]
        if self.stats.thresholds is not None:
            return self.stats.thresholds
        return [None] * len(self.job.models)

    def _ties_sign_count(self, description: str, stride: int = 1) -> int:
        """Σ of the elected signs over the pieces of every process (every stride-th piece of each share)."""
        count = 0
        for key, rows, base, thetas in self._inputs(description, stride=stride):
            thresholds = self._thresholds_for(key)
            if self._fusable(base, thetas):
                count += fused.ties(base, thetas, thresholds, majority=0, merge=None)
                self._check_finite(key, rows, base, thetas, computed_fused=True)
                continue
            self._check_finite(key, rows, base, thetas, computed_fused=False)
            for _, base_span, theta_spans in self._spans(base, thetas):
                count += sign_count(elect_sign(trim(task_vectors(base_span, theta_spans), thresholds)))
        return int(self.group.all_sum(torch.tensor([count], dtype=torch.int64)))

    def _set_majority(self, total: int) -> None:
        """The majority sign from the sign total over every piece, recorded with the run."""
        self.stats.sign_total = total
        self._majority = majority_of(total)

    def collect_statistics(self) -> None:
        """Every pass before the output pass."""
        if self.spec.global_topk_density is not None:
            self.stats.thresholds = self._global_thresholds(self.spec.global_topk_density)
        if self.spec.tensor_topk_density is not None:
            self._per_tensor_thresholds(self.spec.tensor_topk_density)
        if self.spec.majority_sign_pass:
            self._set_majority(self._ties_sign_count("TIES majority sign"))
        elif self.spec.needs_majority_sign:
            self._majority = majority_of(
                self._ties_sign_count("TIES majority sign (sample)", MAJORITY_SAMPLE_STRIDE)
            )
            self._counting_signs = True

    # -- the output pass ---------------------------------------------------------------------------------

    def compute(
        self, key: str, base: torch.Tensor, thetas: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """(τ_MTL — consensus-filtered for consensus, task masks, task vectors) of one span, statistics
        recorded."""
        spec = self.spec
        taus = task_vectors(base, thetas)
        tau_mtl = None
        if spec.vector == "sum":
            tau_mtl = sum_in_task_order(taus)
        elif spec.vector == "ties":
            tau_mtl = self._ties_vector(key, taus)
        masks: list[torch.Tensor] = []
        if spec.masks == "tall":
            masks = tall_masks(base, thetas, tau_mtl, spec.lambdas, taus)
        elif spec.masks == "magnitude":
            masks = [topk_mask(tau, thr) for tau, thr in zip(taus, self._thresholds_for(key), strict=True)]
        if masks:
            count = mask_count(masks)
            self._record_masks(masks, count, taus)
            if spec.consensus_k is not None:
                keep = consensus_mask(count, spec.consensus_k)
                self.stats.consensus_kept += int(torch.count_nonzero(keep))
                tau_mtl = tau_mtl * keep
        return tau_mtl, masks, taus

    def _fused_piece(
        self,
        key: str,
        base: torch.Tensor,
        thetas: list[torch.Tensor],
        out: torch.Tensor,
        scaling: float | None,
        masks: torch.Tensor | None,
    ) -> bool:
        """What `compute` gives for a whole piece, by the fused kernels: τ_MTL (θ0 + α·τ_MTL with `scaling`)
        into `out` (float32), the TALL masks into `masks` ([T, n] bool) if given, statistics recorded.
        False, with nothing done, where the kernels do not apply (magnitude masks, unsupported dtypes)."""
        spec = self.spec
        if spec.vector == "none" or spec.masks == "magnitude" or not self._fusable(base, thetas):
            return False
        if spec.masks == "tall" and len(thetas) > fused.MAX_TALL_TASKS:
            return False
        if spec.masks is None and spec.vector == "sum":
            fused.task_arithmetic(base, thetas, out, scaling)
            return True
        tau_mtl = None
        if spec.vector == "ties":
            signs = fused.ties(
                base,
                thetas,
                self._thresholds_for(key),
                self._majority,
                spec.ties.merge,
                out,
                scaling if spec.masks is None else None,
            )
            if self._counting_signs:
                self._sign_count += signs
            tau_mtl = out
        if spec.masks == "tall":
            counts = fused.tall(base, thetas, spec.lambdas, tau_mtl, spec.consensus_k, masks, out, scaling)
            t = len(thetas)
            inactive, active, kept = counts[: t + 1], counts[t + 1 : 2 * t + 2], counts[2 * t + 2 : 3 * t + 2]
            self._add_mask_counts(inactive + active, active, [int(k) for k in kept])
            if spec.consensus_k is not None:
                self.stats.consensus_kept += int(counts[-1])
        return True

    def _ties_vector(self, key: str, taus: list[torch.Tensor]) -> torch.Tensor:
        trimmed = trim(taus, self._thresholds_for(key))
        elected = elect_sign(trimmed)
        if self._counting_signs:
            self._sign_count += sign_count(elected)
        return disjoint_merge(trimmed, resolve_zero_signs(elected, self._majority), self.spec.ties.merge)

    def _guessed_wrong(self) -> bool:
        """After an output pass that counted the TIES signs: whether the sample's guess of the majority was
        wrong where it matters to `mean`/`sum` (> 0 or not); the true majority is set either way."""
        if not self._counting_signs:
            return False
        guess = self._majority
        self._counting_signs = False
        self._set_majority(int(self.group.all_sum(torch.tensor([self._sign_count], dtype=torch.int64))))
        return (guess > 0) != (self._majority > 0)

    def _record_masks(self, masks: list[torch.Tensor], count: torch.Tensor, taus: list[torch.Tensor]) -> None:
        active = taus[0] != 0
        for tau in taus[1:]:
            active |= tau != 0
        hist, hist_active = (h.cpu() for h in agreement_histograms(count, active, len(masks)))
        self._add_mask_counts(hist, hist_active, [int(torch.count_nonzero(m)) for m in masks])

    def _add_mask_counts(
        self, histogram: torch.Tensor, histogram_active: torch.Tensor, kept: list[int]
    ) -> None:
        """Add a piece's agreement histograms (all entries, active ones) and mask sizes to the run's."""
        self.stats.histogram += histogram
        self.stats.histogram_active += histogram_active
        self.stats.kept = [total + k for total, k in zip(self.stats.kept, kept, strict=True)]

    def _sum_statistics(self) -> None:
        """Add up what every process counted in the output pass (a no-op for a single process)."""
        stats = self.stats
        counts = torch.tensor([self.bytes_read, stats.consensus_kept, *stats.kept], dtype=torch.int64)
        self.bytes_read, stats.consensus_kept, *kept = (int(x) for x in self.group.all_sum(counts))
        stats.kept = kept
        shares, self.nonfinite.counts = self.group.gather(self.nonfinite.counts), {}
        for share in shares:
            self.nonfinite.merge(share)
        if stats.histogram is not None:
            both = self.group.all_sum(torch.stack([stats.histogram, stats.histogram_active]))
            stats.histogram, stats.histogram_active = both[0], both[1]

    def write_merged(self, directory: Path, max_shard_size: int | str) -> list[str]:
        job = self.job
        slots = [Slot(k, job.out_dtype(k), job.base.infos[k].shape) for k in sorted(job.base.infos)]
        files = ShardedFiles(
            directory, slots, job.base.output_shard_size(max_shard_size), stem=job.base.weights_stem
        )
        if self.group.is_main:
            files.create()
        self.group.barrier()

        def output_pass(description: str) -> None:
            with self._writer() as submit:
                for key, rows, base, thetas in self._inputs(description):
                    merged = torch.empty(base.shape, dtype=job.out_dtype(key), device=self.device)
                    result = (
                        merged if merged.dtype == torch.float32 else self._float32_scratch(merged.numel())
                    )
                    if self._fused_piece(key, base, thetas, result, self.spec.scaling, None):
                        self._check_finite(key, rows, base, thetas, computed_fused=True)
                        if result is not merged:
                            merged.copy_(result)
                    else:
                        self._check_finite(key, rows, base, thetas, computed_fused=False)
                        for span, base_span, theta_spans in self._spans(base, thetas):
                            tau_mtl, _, _ = self.compute(key, base_span, theta_spans)
                            merged[span] = apply_vector(base_span, tau_mtl, self.spec.scaling)
                    submit(files.write, key, merged, first_entry(job.base.infos[key], rows))

        try:
            for key, _ in self._blocks(job.copy_keys, whole=True):
                copied = job.base.read(key)
                self.nonfinite.check(key, None, [copied], job.base.infos[key].shape)
                files.write(key, copied)
            output_pass("merge and write")
            written = files.written  # a second output pass puts its bytes in the same places again
            if self._guessed_wrong():
                output_pass("merge and write (majority sign corrected)")
        finally:
            files.close()
        self._check_complete(written, files.data_bytes, "merged weights")
        self._sum_statistics()
        self.digests = files.digests()
        return files.files

    def write_artifact(self, directory: Path, max_shard_size: int | str) -> ArtifactWriter:
        job = self.job
        writer = ArtifactWriter(
            directory,
            {k: job.base.infos[k].shape for k in job.merge_keys},
            job.task_names,
            shared_vector=not self.spec.own_values,
            own_values=self.spec.own_values,
            max_shard_size=max_shard_size,
            vector_dtype=job.vector_dtype,
            rank=self.group.rank,
        )
        if self.group.is_main:
            writer.create()
        self.group.barrier()
        try:
            with self._writer() as submit:
                for key, rows, base, thetas in self._inputs("compress and write"):
                    start = first_entry(job.base.infos[key], rows)
                    submit(writer.write, key, start, *self._compressed_piece(key, rows, base, thetas))
        finally:
            writer.close()
        self._check_complete(writer.written, writer.data_bytes, "compressed artifact")
        writer.assemble_values(self.group)
        self._sum_statistics()
        self.digests = writer.digests()
        return writer

    def _compressed_piece(
        self, key: str, rows: Rows, base: torch.Tensor, thetas: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """(τ_MTL, task masks, task vectors) of a whole piece, assembled from its spans; the task vectors
        only where each task keeps its own values."""
        n, t = base.numel(), len(thetas)
        tau_mtl = None
        if self.spec.vector != "none":
            tau_mtl = torch.empty(n, dtype=torch.float32, device=self.device)
        masks = torch.empty(t, n, dtype=torch.bool, device=self.device)
        taus = torch.empty(t if self.spec.own_values else 0, n, dtype=torch.float32, device=self.device)
        if tau_mtl is not None and self._fused_piece(key, base, thetas, tau_mtl, None, masks):
            self._check_finite(key, rows, base, thetas, computed_fused=True)
            return tau_mtl, list(masks), list(taus)
        self._check_finite(key, rows, base, thetas, computed_fused=False)
        for span, base_span, theta_spans in self._spans(base, thetas):
            span_vector, span_masks, span_taus = self.compute(key, base_span, theta_spans)
            if tau_mtl is not None:
                tau_mtl[span] = span_vector
            for mask, span_mask in zip(masks, span_masks, strict=True):
                mask[span] = span_mask
            for tau, span_tau in zip(taus, span_taus, strict=False):
                tau[span] = span_tau
        return tau_mtl, list(masks), list(taus)
