"""What a run writes about itself: the run record (`hubmerge.json`) and the pinned recipe that reproduces the
output."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import hubmerge
from hubmerge.artifacts import (
    FORMAT,
    FORMAT_VERSION,
    MASK_DIR,
    PACKING,
    RECIPE_FILE,
    VALUE_DIR,
    VECTOR_STEM,
    storage_summary,
)
from hubmerge.integrity import weights_sha256
from hubmerge.record import RunRecord
from hubmerge.writer import DTYPE_NAMES

if TYPE_CHECKING:
    from hubmerge.engine import Engine
    from hubmerge.planning import MergeJob
    from hubmerge.recipe import Recipe
    from hubmerge.search import SearchResult
    from hubmerge.sources import Checkpoint

MERGED_FORMAT = "hubmerge-merged"
COUNTING_RULE = (
    "every floating-point tensor of the base selected by include/exclude (all by default), flattened in sorted "
    "key order; other tensors copied from the base"
)


def pinned_source(ckpt: Checkpoint) -> str:
    """A Hub source pinned to the commit it resolved to; a local source as written."""
    prov = ckpt.provenance
    return f"{prov.location}@{prov.revision}" if prov.revision else prov.source


def pinned_recipe(job: MergeJob) -> str:
    """The recipe that reproduces this output: revisions pinned, every parameter default written out."""
    data = {
        "version": 1,
        "base": pinned_source(job.base),
        "models": [
            {"source": pinned_source(m), "name": n, **({"kind": e.kind} if e.kind else {})}
            for m, n, e in zip(job.models, job.task_names, job.recipe.entries, strict=True)
        ],
        "method": job.recipe.method,
        "parameters": job.parameters,
        "dtype": job.recipe.dtype,
    }
    if job.recipe.tau_dtype is not None:
        data["tau_dtype"] = job.recipe.tau_dtype
    if job.recipe.output_format != "model":
        data["output_format"] = job.recipe.output_format
    if job.recipe.lora_rank is not None:
        data["lora_rank"] = job.recipe.lora_rank
    if job.recipe.include is not None:
        data["include"] = job.recipe.include
    if job.recipe.exclude:
        data["exclude"] = job.recipe.exclude
    if job.recipe.output and not Path(job.recipe.output).is_absolute():  # a path of this machine: not shared
        data["output"] = job.recipe.output
    header = (
        f"# Written by hubmerge {hubmerge.__version__}: the recipe of this output, revisions pinned.\n"
        f"# hubmerge run {RECIPE_FILE} --output <dir>\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _task_records(job: MergeJob, engine: Engine, parts: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    tasks = []
    for i, (name, model) in enumerate(zip(job.task_names, job.models, strict=True)):
        task: dict[str, Any] = {"name": name, **model.provenance.as_dict()}
        if parts is not None:
            task.update(parts[i])
        if job.spec.masks == "tall":
            task["lambda"] = job.spec.lambdas[i]
        if job.spec.masks == "magnitude":
            task["density"] = job.spec.mask_density
        if engine.stats.kept:
            task["mask_kept"] = engine.stats.kept[i]
        tasks.append(task)
    return tasks


def run_record(
    job: MergeJob, engine: Engine, seconds: float, parts: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """What the run did, written as hubmerge.json next to the output; `parts`: each task's own part of a
    compressed artifact (`write_task_parts`)."""
    compressed = job.spec.result == "compressed"
    record: dict[str, Any] = {
        "format": FORMAT if compressed else MERGED_FORMAT,
        "format_version": FORMAT_VERSION,
        "hubmerge_version": hubmerge.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "method": job.recipe.method,
        "result": job.spec.result,
        "parameters": job.parameters,
        "dtype": job.recipe.dtype,
        "base": base_record(job, parts if compressed else None),
        "base_card": job.base.card_metadata,
        "tasks": _task_records(job, engine, parts),
        "parameters_counted": job.d,
        "counted_tensors": len(job.merge_keys),
        "copied_tensors": job.copy_keys,
        "counting_rule": COUNTING_RULE,
        "include": job.recipe.include,
        "exclude": job.recipe.exclude,
        "has_config": job.base.directory is not None and (job.base.directory / "config.json").is_file(),
        "library": "open_clip" if job.base.is_open_clip else "transformers",
        "stats": engine.stats.as_dict(),
        "device": str(engine.device),
        "processes": engine.group.world_size,
        "seconds": round(seconds, 3),
        "bytes_read": engine.bytes_read,
    }
    if job.spec.consensus_k is not None:
        record["stats"]["consensus_kept"] = engine.stats.consensus_kept
    if engine.nonfinite.counts:  # only with allow_nonfinite: otherwise the run stopped at the first one
        record["nonfinite"] = engine.nonfinite.records()
    if compressed:
        tau_dtype = job.recipe.tau_dtype or "float32"
        record["vector"] = None if job.spec.own_values else {"stem": VECTOR_STEM, "dtype": tau_dtype}
        if job.spec.own_values:
            record["values"] = {"dir": VALUE_DIR, "dtype": tau_dtype}
        record["masks"] = {"dir": MASK_DIR, "packing": PACKING}
        record["storage"] = artifact_storage(
            job, engine.stats.kept if job.spec.own_values else None, parts or []
        )
    # checked against the model of a run record; its JSON object is the same, key for key
    return RunRecord.model_validate(record).to_dict()


def artifact_storage(job: MergeJob, kept: list[int] | None, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """`storage_summary` of a compressed output: its vector, masks and each task's own tensors."""
    base = job.base.infos
    shared = {key for part in parts for key in part["from_base"] if base[key].is_float}
    own = [part["private"] for part in parts if part["private"]]
    return storage_summary(
        job.d,
        len(job.models),
        base_bits=8 * sum(base[k].nbytes for k in job.merge_keys) / max(job.d, 1),
        vector_dtype=job.recipe.tau_dtype or "float32",
        kept_values=None if kept is None else sum(kept),
        private_entries=sum(p["entries"] for p in own),
        private_bytes=sum(p["bytes"] for p in own),
        shared_entries=sum(base[k].numel for k in shared),
        finetuned_bytes=sum(model.stored_bytes for model in job.models),
    )


def base_record(job: MergeJob, parts: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The base as the recipe gives it and where it resolved. A compressed artifact also records the dtype and
    shape of every base tensor its tasks use, and for a local base its content hash: rebuilding a task checks
    them against the base it is given."""
    record: dict[str, Any] = job.base.provenance.as_dict()
    if parts is not None:
        used = sorted({*job.merge_keys, *(key for part in parts for key in part["from_base"])})
        infos = job.base.infos
        record["tensors"] = {k: [DTYPE_NAMES[infos[k].dtype], list(infos[k].shape)] for k in used}
        if not record["revision"]:
            record["sha256"] = weights_sha256(job.base.weight_files)
    return record


def search_record(result: SearchResult, recipe: Recipe) -> dict[str, Any]:
    assert recipe.search is not None
    return {
        "split": recipe.search.split,
        "chosen": result.chosen,
        "finetuned": result.finetuned,
        "candidates": result.rows,
    }
