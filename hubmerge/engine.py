"""The engine: schedules the passes of one job over the T+1 checkpoints, one piece of one tensor at a time.

Planning (`planning.py`) says which passes a method needs; `streaming.py` reads the pieces of each pass (one
ahead, in the background) and writes behind the compute; a backend (`backends.py`: the fused CPU kernels, or
the methods' torch functions) computes each piece; a sink (`sinks.py`: merged model or compressed artifact)
puts the output pass's pieces in place. Memory holds the T+1 input pieces of one tensor as stored, a few
float32 pieces and small global summaries (two radix histograms per task, a sign count, the agreement
histogram, per-tensor sums), never a flattened model.

Passes per method: Task Arithmetic, weight averaging, TALL/Consensus with TA: one. Magnitude masking and
pruning: two threshold histograms, then output. TIES: two threshold histograms, the majority sign guessed
from every 16th piece, then output, which counts the true majority; if the guess was wrong, the output pass
runs again with it (bf16 deltas cancel exactly often, so most pieces can depend on it).
TALL/Consensus with TIES (and TIES `max`): two threshold histograms, the majority sign, then output.
Methods with their own piece functions: a threshold pass per per-tensor density and a per-tensor statistics
pass where they declare them, then output. With a process group each process takes a balanced share of the
pieces of every pass (whole tensors for per-tensor passes) and the global statistics are summed.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from hubmerge import fused
from hubmerge.artifacts import ArtifactWriter
from hubmerge.backends import FusedBackend, TorchBackend
from hubmerge.distributed import SINGLE, Group
from hubmerge.methods.task_arithmetic import apply_vector, task_vector, task_vectors
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
    threshold_at_rank,
    threshold_value,
)
from hubmerge.nonfinite import NonfiniteCounts
from hubmerge.peft_output import PeftSink
from hubmerge.planning import (
    CPU_SPAN_ENTRIES,
    DEFAULT_BLOCK_ENTRIES,
    MAJORITY_SAMPLE_STRIDE,
    MergeJob,
    Rows,
    first_entry,
    prepare,
    row_blocks,
    tensor_threshold_passes,
)
from hubmerge.sinks import ArtifactSink, MergedSink
from hubmerge.statistics import RunStats, Tally, majority_of
from hubmerge.streaming import Piece, Stream

__all__ = ["DEFAULT_BLOCK_ENTRIES", "Engine", "first_entry", "prepare", "row_blocks"]


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
        self.group = group
        if span_entries is None:
            span_entries = CPU_SPAN_ENTRIES if device.type == "cpu" else 0
        # the fused CPU kernels where they compile (`hubmerge.fused`); False: torch operations only
        use_kernels = fused_kernels and device.type == "cpu" and fused.library() is not None
        self.nonfinite = NonfiniteCounts(
            ["base", *job.task_names],
            [ckpt.name for ckpt in (job.base, *job.models)],
            allow=allow_nonfinite,
            use_kernels=use_kernels,
        )
        self.stream = Stream(
            job,
            device,
            group,
            block_entries,
            span_entries,
            prefetch,
            show_progress and group.is_main,
            self.nonfinite,
        )
        self.tally = Tally(job.spec, len(job.models))
        self.torch = TorchBackend(job, self.tally, self.stream)
        self.fused = FusedBackend(job.spec, self.tally) if use_kernels else None
        self._scratch = torch.empty(0, dtype=torch.float32, device=device)
        # SHA-256 of the output files this process wrote whole, computed while writing them
        self.digests: dict[str, str] = {}

    @property
    def stats(self) -> RunStats:
        return self.tally.stats

    @property
    def bytes_read(self) -> int:
        return self.stream.bytes_read

    def close(self) -> None:
        """Stop the progress bars of passes that an error left open (their generators are closed only when
        the error's traceback goes), so that the error line comes after them."""
        self.stream.close()

    def _fused_reads(self, base: torch.Tensor, thetas: list[torch.Tensor]) -> bool:
        return self.fused is not None and self.fused.reads(base, thetas)

    def _fused_computes(self, base: torch.Tensor, thetas: list[torch.Tensor]) -> bool:
        return self.fused is not None and self.fused.computes(base, thetas)

    def _float32_scratch(self, n: int) -> torch.Tensor:
        """n entries of a float32 buffer reused across pieces (only within one piece's computation)."""
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.float32, device=self.device)
        return self._scratch[:n]

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
                if self._fused_reads(base, thetas):
                    counted()  # a bincount of an earlier piece may still be adding to counts
                    fused.magnitude_histograms(base, thetas, buckets, counts)
                    self.stream.check_finite(key, rows, base, thetas, computed_fused=True)
                    continue
                self.stream.check_finite(key, rows, base, thetas, computed_fused=False)
                n, base32 = base.numel(), base.float()
                for i, theta in enumerate(thetas):
                    if counting[slot] is not None:
                        counting[slot].result()
                    if buffers[slot].numel() < n:
                        buffers[slot] = torch.empty(n, dtype=torch.int32, device=self.device)
                    codes = buffers[slot][:n]
                    for span, base_span, (theta_span,) in self.stream.spans(base32, [theta]):
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
            return self.stream.inputs(description)

        return self._radix_thresholds(rank, pieces, shared=True)

    def _per_tensor_thresholds(
        self, rank_of: Callable[[int], int], description: str
    ) -> dict[str, list[float | None]]:
        """Each tensor's own k-th |τ| per task (`trim: tensor`, a method's per-tensor selections); a tensor of
        several row blocks by radix selection over its blocks, so not even the largest tensor is held whole.
        Each process takes whole tensors. Their reads (a tensor of several blocks twice: high bits, then low
        bits) form one stream, each read while the piece before is computed."""
        infos, t, block_entries = self.job.base.infos, len(self.job.models), self.stream.block_entries
        plans = {
            key: (row_blocks(infos[key], block_entries), rank_of(infos[key].numel))
            for key, _ in self.stream.blocks(self.job.merge_keys, whole=True)
        }
        reads = [
            (key, rows)
            for key, (blocks, rank) in plans.items()
            if rank
            for rows in (blocks if len(blocks) == 1 else blocks * 2)
        ]
        mine: dict[str, list[float | None]] = {}
        with contextlib.closing(self.stream.read_ahead(reads)) as stream, self.stream.progress() as progress:

            def pieces(count: int) -> Iterator[Piece]:
                return itertools.islice(stream, count)

            task = progress.add_task(description, total=len(plans))
            for key, (blocks, rank) in plans.items():
                if rank == 0:
                    mine[key] = [None] * t
                elif len(blocks) == 1:
                    _, rows, base, thetas = next(pieces(1))
                    self.stream.check_finite(key, rows, base, thetas, computed_fused=False)
                    taus = task_vectors(base, thetas)
                    mine[key] = [threshold_at_rank(tau, rank) for tau in taus]
                else:
                    mine[key] = self._radix_thresholds(
                        rank, lambda _, count=len(blocks): pieces(count), shared=False
                    )
                progress.advance(task)
        return {key: value for share in self.group.gather(mine) for key, value in share.items()}

    def _tensor_statistics(self) -> dict[str, torch.Tensor]:
        """The method's per-tensor sums; each process takes whole tensors and adds their pieces in order, so
        the sums do not depend on the number of processes."""
        infos = self.job.base.infos
        reads = [
            (key, rows)
            for key, _ in self.stream.blocks(self.job.merge_keys, whole=True)
            for rows in self.stream.piece_rows(key)
        ]
        mine: dict[str, torch.Tensor] = {}
        with self.stream.progress() as progress:
            task = progress.add_task("per-tensor statistics", total=len(reads))
            for key, rows, base, thetas in self.stream.read_ahead(reads):
                self.stream.check_finite(key, rows, base, thetas, computed_fused=False)
                sums = self.torch.tensor_sums(key, first_entry(infos[key], rows), base, thetas).cpu()
                mine[key] = sums if key not in mine else mine[key] + sums
                progress.advance(task)
        return {key: value for share in self.group.gather(mine) for key, value in share.items()}

    def _ties_sign_count(self, description: str, stride: int = 1) -> int:
        """Σ of the elected signs over the pieces of every process (every stride-th piece of each share)."""
        count = 0
        for key, rows, base, thetas in self.stream.inputs(description, stride=stride):
            fused_piece = self._fused_reads(base, thetas)
            backend = self.fused if fused_piece else self.torch
            count += backend.sign_count(key, base, thetas)
            self.stream.check_finite(key, rows, base, thetas, computed_fused=fused_piece)
        return int(self.group.all_sum(torch.tensor([count], dtype=torch.int64)))

    def collect_statistics(self) -> None:
        """Every pass before the output pass."""
        spec, tally = self.spec, self.tally
        if spec.global_topk_density is not None:
            self.stats.thresholds = self._global_thresholds(spec.global_topk_density)
        tally.tensor_thresholds = [
            self._per_tensor_thresholds(rank_of, description)
            for rank_of, description in zip(spec.tensor_ranks, tensor_threshold_passes(spec), strict=True)
        ]
        if spec.tensor_statistics is not None:
            tally.tensor_sums = self._tensor_statistics()
        if spec.majority_sign_pass:
            tally.set_majority(self._ties_sign_count("TIES majority sign"))
        elif spec.needs_majority_sign:
            tally.majority = majority_of(
                self._ties_sign_count("TIES majority sign (sample)", MAJORITY_SAMPLE_STRIDE)
            )
            tally.counting_signs = True

    # -- the output pass ---------------------------------------------------------------------------------

    def _merged_piece(
        self, key: str, rows: Rows, base: torch.Tensor, thetas: list[torch.Tensor]
    ) -> torch.Tensor:
        """θ0 + α·τ_MTL of a whole piece, in the output dtype."""
        job = self.job
        merged = torch.empty(base.shape, dtype=job.out_dtype(key), device=self.device)
        result = merged if merged.dtype == torch.float32 else self._float32_scratch(merged.numel())
        if self._fused_computes(base, thetas):
            self.fused.output_piece(key, base, thetas, result, self.spec.scaling, None)
            self.stream.check_finite(key, rows, base, thetas, computed_fused=True)
            if result is not merged:
                merged.copy_(result)
            return merged
        self.stream.check_finite(key, rows, base, thetas, computed_fused=False)
        start = first_entry(job.base.infos[key], rows)
        for span, base_span, theta_spans in self.torch.spans(base, thetas):
            tau_mtl, _, _ = self.torch.compute(key, start + span.start, base_span, theta_spans)
            merged[span] = apply_vector(base_span, tau_mtl, self.spec.scaling)
        return merged

    def vector_piece(
        self, key: str, rows: Rows, base: torch.Tensor, thetas: list[torch.Tensor]
    ) -> torch.Tensor:
        """α·τ_MTL of a whole piece in float32: what the merge adds to θ0 (a merged adapter's update)."""
        self.stream.check_finite(key, rows, base, thetas, computed_fused=False)
        update = torch.empty(base.numel(), dtype=torch.float32, device=self.device)
        start = first_entry(self.job.base.infos[key], rows)
        for span, base_span, theta_spans in self.torch.spans(base, thetas):
            tau_mtl, _, _ = self.torch.compute(key, start + span.start, base_span, theta_spans)
            assert tau_mtl is not None  # a merge always has a vector
            update[span] = torch.mul(tau_mtl, self.spec.scaling)
        return update

    def _compressed_piece(
        self, key: str, rows: Rows, base: torch.Tensor, thetas: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """(τ_MTL, task masks, task vectors) of a whole piece, assembled from its spans; the task vectors
        only where each task keeps its own values."""
        n, t = base.numel(), len(thetas)
        own_values = self.spec.own_values
        tau_mtl = None if own_values else torch.empty(n, dtype=torch.float32, device=self.device)
        masks = torch.empty(t, n, dtype=torch.bool, device=self.device)
        taus = torch.empty(t if own_values else 0, n, dtype=torch.float32, device=self.device)
        if self._fused_computes(base, thetas):
            self.fused.output_piece(key, base, thetas, tau_mtl, None, masks)
            self.stream.check_finite(key, rows, base, thetas, computed_fused=True)
            return tau_mtl, list(masks), list(taus)
        self.stream.check_finite(key, rows, base, thetas, computed_fused=False)
        start = first_entry(self.job.base.infos[key], rows)
        for span, base_span, theta_spans in self.torch.spans(base, thetas):
            span_vector, span_masks, span_taus = self.torch.compute(
                key, start + span.start, base_span, theta_spans
            )
            if tau_mtl is not None:
                tau_mtl[span] = span_vector
            for mask, span_mask in zip(masks, span_masks, strict=True):
                mask[span] = span_mask
            for tau, span_tau in zip(taus, span_taus, strict=False):
                tau[span] = span_tau
        return tau_mtl, list(masks), list(taus)

    def guessed_wrong(self) -> bool:
        """After an output pass that counted the TIES signs: whether the sample's guess of the majority was
        wrong where it matters to `mean`/`sum` (> 0 or not); the true majority is set either way."""
        tally = self.tally
        if not tally.counting_signs:
            return False
        guess = tally.majority
        tally.counting_signs = False
        tally.set_majority(int(self.group.all_sum(torch.tensor([tally.sign_count], dtype=torch.int64))))
        return (guess > 0) != (tally.majority > 0)

    def sum_statistics(self) -> None:
        """Add up what every process counted in the output pass (a no-op for a single process)."""
        stats = self.stats
        counts = torch.tensor([self.stream.bytes_read, stats.consensus_kept, *stats.kept], dtype=torch.int64)
        self.stream.bytes_read, stats.consensus_kept, *kept = (int(x) for x in self.group.all_sum(counts))
        stats.kept = kept
        shares, self.nonfinite.counts = self.group.gather(self.nonfinite.counts), {}
        for share in shares:
            self.nonfinite.merge(share)
        if stats.histogram is not None:
            both = self.group.all_sum(torch.stack([stats.histogram, stats.histogram_active]))
            stats.histogram, stats.histogram_active = both[0], both[1]

    def write_merged(self, directory: Path, max_shard_size: int | str) -> list[str]:
        """The output pass of a merge: the merged model's weight files in `directory`."""
        return MergedSink(self).write(directory, max_shard_size)

    def write_adapter(self, directory: Path) -> PeftSink:
        """The merged LoRA adapter (`output_format: peft`)."""
        sink = PeftSink(self)
        sink.write(directory)
        return sink

    def write_artifact(self, directory: Path, max_shard_size: int | str) -> ArtifactWriter:
        """The output pass of a compression: the artifact's vector, masks (and values) in `directory`."""
        return ArtifactSink(self).write(directory, max_shard_size)
