"""Planning a merge: the job (a validated recipe with its sources opened, headers only), how tensors are cut
into pieces, which passes a method needs, and what a run will read, write and hold (`--dry-run`).

Every entry of every floating-point tensor of the base counts in d (sorted key order, as the reference
flattens); non-float tensors are copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from hubmerge import fused
from hubmerge.adapters import task_models, with_base
from hubmerge.artifacts import OUTPUT_DTYPES, output_dtype
from hubmerge.errors import HubmergeError, RecipeError
from hubmerge.hub import HubSource
from hubmerge.ia3 import Ia3Base, ia3_base, ia3_configs
from hubmerge.lock import Lock
from hubmerge.methods import METHODS, MergeSpec
from hubmerge.methods.registry import PieceVector, TiesVector
from hubmerge.peft_output import lora_tasks
from hubmerge.recipe import Recipe
from hubmerge.sources import (
    Checkpoint,
    Rows,
    SourceError,
    TensorInfo,
    check_compatible,
    locate_source,
    open_source,
    provenance,
    sources_error,
)

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
    recipe = with_base(recipe, token=token, endpoint=endpoint)
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
    recipe = with_base(recipe, token=token, endpoint=endpoint)
    assert recipe.base is not None
    method = METHODS[recipe.method]
    spec = method.spec(recipe.parameters, recipe.task_names)
    located = locate_sources(recipe, token=token, endpoint=endpoint)
    if lock is not None:
        lock.check({s: where for s, where in located.items() if isinstance(where, HubSource)})
    # the models first: (IA)³ adapters are merged in their own space, without the base's weights
    opened: dict[str, Checkpoint] = {}
    try:
        for source in dict.fromkeys(recipe.sources):
            opened[source] = open_source(source, located[source], token=token, endpoint=endpoint)
        sources = [opened[s] for s in recipe.sources]
        if ia3_configs(recipe.task_names, sources, [e.kind for e in recipe.entries]) is None:
            if recipe.base not in opened:
                opened[recipe.base] = open_source(
                    recipe.base, located[recipe.base], token=token, endpoint=endpoint
                )
            base = opened[recipe.base]
            models = list(task_models(recipe, opened, base).values())
        else:
            base, models = ia3_base(provenance(recipe.base, located[recipe.base]), sources[0]), sources
        check_compatible(
            base, models, recipe.task_names, recipe.selects, own_tensors=method.result == "compressed"
        )
        job = MergeJob(
            recipe=recipe,
            origin=origin,
            spec=spec,
            parameters=method.resolved_parameters(recipe.parameters, recipe.task_names),
            base=base,
            models=models,
        )
        if isinstance(base, Ia3Base):
            if recipe.lora_rank is not None:
                raise RecipeError(
                    "lora_rank: applies to LoRA adapters; these are (IA)³ adapters", field="lora_rank"
                )
        elif recipe.output_format == "peft":
            lora_tasks(job)  # every model a LoRA adapter that one merged adapter can stand for
    except BaseException:
        for ckpt in opened.values():
            ckpt.close()
        raise
    return job


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


def tensor_threshold_passes(spec: MergeSpec) -> list[str]:
    count = len(spec.tensor_ranks)
    return [
        "per-tensor thresholds" if count == 1 else f"per-tensor thresholds ({i} of {count})"
        for i in range(1, count + 1)
    ]


def pass_names(spec: MergeSpec) -> list[str]:
    names = []
    if spec.global_topk_density is not None:
        names += ["top-k thresholds (high bits)", "top-k thresholds (low bits)"]
    names += tensor_threshold_passes(spec)
    if spec.tensor_statistics is not None:
        names.append("per-tensor statistics")
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
            width * job.d if not job.spec.own_values else width * job.d * (job.spec.mask_density or 0) * t
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
    # a method's own tensor functions take whole pieces
    span = piece if isinstance(job.spec.vector, PieceVector) else min(piece, CPU_SPAN_ENTRIES)
    # T+1 input pieces as stored, twice (in use and read ahead); three float32 pieces (θ0 and the two code
    # buffers of a threshold pass, or an output piece); a compressed piece's T masks (and T float32 value
    # pieces for magnitude pruning); per span: T+1 inputs, T task vectors and a few work buffers, TIES adding
    # T trimmed and T sign-selected vectors
    per_entry = 2 * (t + 1) * stored + 3 * 4
    if job.spec.result == "compressed":
        per_entry += t * (1 + 4 * job.spec.own_values)
    spans = span * 4 * ((5 if isinstance(job.spec.vector, TiesVector | PieceVector) else 3) * t + 6)
    # the fused kernels' per-thread copies of the top-bits histograms
    thresholds = job.spec.global_topk_density is not None or bool(job.spec.tensor_ranks)
    copies = thresholds * torch.get_num_threads() * t * fused.HIGH_HISTOGRAM_COPIES_BYTES
    return piece * per_entry + spans + copies
