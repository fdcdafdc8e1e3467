"""One run of a recipe: validate, stream the passes, write every output file, then publish the directory."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hf_constants

from hubmerge import hub
from hubmerge.adapters import LoraTask, with_base
from hubmerge.artifacts import (
    RECIPE_FILE,
    RESERVED_NAMES,
)
from hubmerge.card import write_card
from hubmerge.compressed import CompressedMerge
from hubmerge.distributed import SINGLE, Group
from hubmerge.engine import Engine
from hubmerge.errors import HubmergeError, RecipeError
from hubmerge.evaluation import Evaluator, Overlay, mean, normalized
from hubmerge.hub import Published
from hubmerge.ia3 import Ia3Base, write_ia3_config
from hubmerge.integrity import (
    record_hashes,
    verify_files,
    verify_output,
    write_manifest,
)
from hubmerge.lock import Lock
from hubmerge.methods import METHODS
from hubmerge.output import (
    atomic_directory,
    check_output_path,
    make_sibling,
    output_lock,
    read_manifest,
)
from hubmerge.peft_output import adapter_overlay
from hubmerge.planning import DEFAULT_BLOCK_ENTRIES, MergeJob, prepare, resolve_device
from hubmerge.private import task_parts
from hubmerge.recipe import ModelEntry, PushTarget, Recipe, is_hub_id
from hubmerge.run_record import pinned_recipe, pinned_source, run_record, search_record
from hubmerge.search import SearchResult, overlay_of, read_overlay, run_search
from hubmerge.serving import TaskSwitcher
from hubmerge.writer import copy_support_files, parse_shard_size

log = logging.getLogger("hubmerge")


@dataclass
class RunResult:
    output: Path
    record: dict[str, Any]


def write_task_parts(job: MergeJob, engine: Engine, staging: Path) -> list[dict[str, Any]]:
    """Each task's own tensors and files (`hubmerge.private`), their digests added to the engine's."""
    parts = []
    for i, (name, model) in enumerate(zip(job.task_names, job.models, strict=True)):
        part, digest = task_parts(name, i + 1, model, job.base, job.merge_keys, staging, engine.nonfinite)
        if digest is not None:
            engine.digests[part["private"]["file"]] = digest
        parts.append(part)
    return parts


def resolve_output(recipe: Recipe, output: Path | None) -> Path:
    target = output or (Path(recipe.output) if recipe.output else None)
    if target is None:
        raise RecipeError("no output directory: set `output:` in the recipe or pass --output", field="output")
    return target


def run_recipe(
    recipe: Recipe,
    origin: str = "<recipe>",
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    device: str | torch.device = "auto",
    max_shard_size: int | str = "5GB",
    block_entries: int = DEFAULT_BLOCK_ENTRIES,
    span_entries: int | None = None,
    fused_kernels: bool = True,
    show_progress: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    lock: Lock | None = None,
    model_card: bool = True,
    group: Group = SINGLE,
    allow_nonfinite: bool = False,
) -> RunResult:
    """Run a validated recipe end to end; the output directory appears only when everything is written.

    With `search:`, the searched parameters are chosen on validation data first; with `evaluation:`, the
    output is scored (zero-shot, fine-tuned and merged rows) before it appears. With `push.export:
    subfolders`, every task's materialized model is part of that output. As one process of `group`, this
    process streams its share of the pieces; rank 0 alone searches, scores and finishes the directory, and
    only its result holds the record. NaN/Inf weights in an input stop the run unless `allow_nonfinite`.
    """
    recipe = with_base(recipe, token=token, endpoint=endpoint)
    target = resolve_output(recipe, Path(output) if output else None)
    inputs = recipe_inputs(recipe, origin)
    check_output_path(target, overwrite, inputs)
    parse_shard_size(max_shard_size)
    if recipe.push and recipe.push.export == "subfolders":
        check_subfolder_names(recipe.task_names)
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    # rank 0 owns the output for the whole run, downloads included; the other ranks write into its staging
    with output_lock(target) if group.is_main else contextlib.nullcontext():
        # again: taking the lock may have put back a previous output that a killed replace had set aside
        check_output_path(target, overwrite, inputs)
        job = prepare(recipe, origin, token=token, endpoint=endpoint, lock=lock)
        record: dict[str, Any] = {}
        try:
            scoring = (
                Scoring.start(job, torch_device, show_progress)
                if recipe.evaluation and group.is_main
                else None
            )
            search = None
            if recipe.evaluation and recipe.search is not None:
                if scoring is not None:
                    search = scoring.search(job, target, torch_device, token=token, endpoint=endpoint)
                job = with_parameters(job, group.broadcast(search.parameters if search else None))
            engine = Engine(
                job,
                torch_device,
                block_entries=block_entries,
                span_entries=span_entries,
                fused_kernels=fused_kernels,
                show_progress=show_progress,
                group=group,
                allow_nonfinite=allow_nonfinite,
            )
            started = time.perf_counter()
            with contextlib.closing(engine), shared_staging(target, overwrite, inputs, group) as staging:
                engine.collect_statistics()
                adapter = None
                ia3 = isinstance(job.base, Ia3Base)
                if recipe.output_format == "peft" and not ia3:
                    adapter = engine.write_adapter(staging).record()
                elif job.spec.result == "merged":
                    engine.write_merged(staging, max_shard_size)
                    if ia3 and group.is_main:  # without its config PEFT cannot load the merged vectors
                        adapter = write_ia3_config(staging, job.models[0], job.base.provenance)
                else:
                    engine.write_artifact(staging, max_shard_size)
                    if ia3 and group.is_main:  # what each rebuilt task needs to load as an adapter
                        adapter = write_ia3_config(staging, job.models[0], job.base.provenance)
                if group.is_main:
                    parts = (
                        write_task_parts(job, engine, staging) if job.spec.result == "compressed" else None
                    )
                    record = run_record(job, engine, time.perf_counter() - started, parts)
                    if adapter is not None:
                        record["adapter"] = adapter
                    finish_output(
                        job,
                        record,
                        staging,
                        search,
                        scoring,
                        max_shard_size,
                        token,
                        endpoint,
                        model_card,
                        engine.digests,
                    )
        finally:
            job.close()
    return RunResult(output=target, record=record)


def recipe_inputs(recipe: Recipe, origin: str) -> list[tuple[str, Path]]:
    """(what, path) of every local path a run reads, which its output must not be, contain or lie in: the
    recipe, local sources and evaluation files, and the Hub cache that holds the Hub sources."""
    inputs = [("the recipe", Path(origin))] if Path(origin).is_file() else []
    named = [("the base", recipe.base)]
    named += [(f"model {name!r}", spec) for name, spec in zip(recipe.task_names, recipe.sources, strict=True)]
    inputs += [(what, Path(os.path.expanduser(spec))) for what, spec in named if not is_hub_id(spec)]
    if recipe.evaluation is not None:
        for task, spec in recipe.evaluation.tasks.items():
            for split, path in (spec.data_files or {}).items():
                inputs.append((f"the {split} data of task {task!r}", Path(path)))
    inputs.append(("the Hugging Face cache", Path(hf_constants.HF_HUB_CACHE)))
    return inputs


@contextlib.contextmanager
def shared_staging(
    target: Path, overwrite: bool, inputs: list[tuple[str, Path]], group: Group
) -> Iterator[Path]:
    """`atomic_directory` for a process group: rank 0 stages, every rank writes there, rank 0 renames last."""
    if not group.is_distributed:
        with atomic_directory(target, overwrite, inputs) as staging:
            yield staging
        return
    if not group.is_main:
        yield Path(group.broadcast(None))
        group.barrier()
        return
    with atomic_directory(target, overwrite, inputs) as staging:
        group.broadcast(str(staging))
        yield staging
        group.barrier()  # every process has written its pieces


def finish_output(
    job: MergeJob,
    record: dict[str, Any],
    staging: Path,
    search: SearchResult | None,
    scoring: Scoring | None,
    max_shard_size: int | str,
    token: str | None,
    endpoint: str | None,
    model_card: bool,
    digests: dict[str, str],
) -> None:
    """Everything of an output besides the weights: support files, scores, record, recipe, exports, card;
    the files' hashes (`digests`: those taken while the weights were written) go into the record last."""
    recipe = job.recipe
    if job.spec.result == "merged" and recipe.output_format == "model":
        copy_support_files(job.base.directory, staging)
    if search is not None:
        record["search"] = search_record(search, recipe)
    write_manifest(staging, record)
    if scoring is not None:
        record["evaluation"] = scoring.report(job, staging)  # reads a compressed output back by its manifest
        write_manifest(staging, record)
    (staging / RECIPE_FILE).write_text(pinned_recipe(job))
    if recipe.push and recipe.push.export == "subfolders":
        export_subfolders(staging, max_shard_size=max_shard_size, token=token, endpoint=endpoint)
    record_hashes(staging, record, digests)
    if model_card:
        write_card(staging, repo_id=recipe.push.repo_id if recipe.push else None)


def with_parameters(job: MergeJob, parameters: dict[str, Any]) -> MergeJob:
    """The same opened sources with other method parameters (the values a search chose)."""
    recipe = job.recipe.model_copy(update={"parameters": parameters})
    method = METHODS[recipe.method]
    return dataclasses.replace(
        job,
        recipe=recipe,
        spec=method.spec(parameters, recipe.task_names),
        parameters=method.resolved_parameters(parameters, recipe.task_names),
    )


@dataclass
class Scoring:
    """The evaluator of a recipe plus the overlays every report needs: θ0 and each task's θ_t."""

    evaluator: Evaluator
    base: Overlay
    finetuned: dict[str, Overlay]

    @classmethod
    def start(cls, job: MergeJob, device: torch.device, show_progress: bool = False) -> Scoring:
        """Load data, models and heads, and check them, before any merge work."""
        evaluation = job.recipe.evaluation
        assert evaluation is not None
        if isinstance(job.base, Ia3Base):
            raise RecipeError(
                "evaluation: merges of (IA)³ adapters are not scored (their vectors act inside the adapted "
                "model; load the merged adapter with PEFT to evaluate it)",
                field="evaluation",
            )
        adapters = [n for n, m in zip(job.task_names, job.models, strict=True) if isinstance(m, LoraTask)]
        if evaluation.head == "sequence_classification" and adapters:
            raise RecipeError(
                f"evaluation.head: sequence_classification loads each task's own model for its head; "
                f"{', '.join(map(repr, adapters))} {'is an adapter' if len(adapters) == 1 else 'are adapters'} "
                "(score adapters with a zero-shot or causal_lm head)",
                field="evaluation.head",
            )
        if job.base.directory is None or any(m.directory is None for m in job.models):
            raise HubmergeError(
                "evaluation: needs model directories (with config.json), not bare weight files"
            )
        task_dirs = {n: m.directory for n, m in zip(job.task_names, job.models, strict=True)}
        evaluator = Evaluator(evaluation, job.base.directory, task_dirs, device, show_progress)
        splits = [evaluation.split] + ([job.recipe.search.split] if job.recipe.search else [])
        evaluator.prepare(list(dict.fromkeys(splits)))
        keys = job.merge_keys
        return cls(
            evaluator,
            overlay_of(job.base.read, keys),
            {n: overlay_of(m.read, keys) for n, m in zip(job.task_names, job.models, strict=True)},
        )

    def search(
        self, job: MergeJob, target: Path, device: torch.device, *, token: str | None, endpoint: str | None
    ) -> SearchResult:
        """Run the recipe's search; candidate merges go to a hidden sibling of the output `target`, which the
        next run to `target` removes if this one is killed."""
        pinned = job.recipe.model_copy(
            update={
                "base": pinned_source(job.base),
                "models": [
                    ModelEntry(source=pinned_source(m), name=n, kind=e.kind)
                    for m, n, e in zip(job.models, job.task_names, job.recipe.entries, strict=True)
                ],
                "dtype": "float32",
                # candidates are read back as weights: a merged adapter is made only of the chosen values
                "output_format": "model",
                "lora_rank": None,
                "evaluation": None,
                "search": None,
                "push": None,
            }
        )
        tmp = make_sibling(target, "search")
        try:
            counter = iter(range(1 << 30))

            def run_variant(parameters: dict[str, Any]) -> Path:
                variant = pinned.model_copy(update={"parameters": parameters})
                candidate = tmp / f"candidate-{next(counter)}"
                return run_recipe(
                    variant,
                    output=candidate,
                    device=str(device),
                    token=token,
                    endpoint=endpoint,
                    model_card=False,
                ).output

            return run_search(job.recipe, self.base, self.finetuned, self.evaluator, run_variant)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def report(self, job: MergeJob, output: Path) -> dict[str, Any]:
        """Zero-shot, fine-tuned and this output's scores on the evaluation split, absolute and normalized."""
        evaluation = job.recipe.evaluation
        assert evaluation is not None
        split, tasks = evaluation.split, self.evaluator.tasks
        scores = {
            "zero-shot": {t: self.evaluator.score(t, self.base, split) for t in tasks},
            "fine-tuned": {t: self.evaluator.score(t, self.finetuned[t], split) for t in tasks},
        }
        if job.recipe.output_format == "peft":
            weights = adapter_overlay(job, output, self.base)
            scores[job.recipe.method] = {t: self.evaluator.score(t, weights, split) for t in tasks}
        elif job.spec.result == "merged":
            weights = read_overlay(output, list(self.base))
            scores[job.recipe.method] = {t: self.evaluator.score(t, weights, split) for t in tasks}
        else:
            # one resident copy of θ0, τ_MTL and the masks: each task's weights without reading a file
            switcher = TaskSwitcher(
                CompressedMerge.from_pretrained(output), self.evaluator.device, list(self.base), self.base
            )
            scores[job.recipe.method] = {
                t: self.evaluator.score(t, switcher.overlay(t), split) for t in tasks
            }
        rows = {}
        for name, accuracy in scores.items():
            norm = normalized(accuracy, scores["fine-tuned"])
            rows[name] = {
                "accuracy": accuracy,
                "normalized": norm,
                "mean_accuracy": mean(accuracy),
                "mean_normalized": mean(norm),
            }
        return {
            "head": evaluation.head,
            "metric": evaluation.metric,
            "split": split,
            "datasets": {
                t: {
                    "dataset": spec.dataset or "local",
                    "config": spec.config,
                    "split": spec.splits.get(split, split),
                }
                for t, spec in evaluation.tasks.items()
            },
            "rows": rows,
        }


def evaluate_output(
    recipe: Recipe,
    origin: str = "<recipe>",
    *,
    output: str | Path | None = None,
    device: str = "auto",
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Score an existing output of `recipe` and record the result in its hubmerge.json and model card."""
    if recipe.evaluation is None:
        raise RecipeError(f"{origin}: has no `evaluation:` section", field="evaluation")
    target = resolve_output(recipe, Path(output) if output else None)
    with output_lock(target):  # a run replacing the output meanwhile would get this record
        record = read_manifest(target)
        verify_files(target, record)
        job = prepare(recipe, origin, token=token, endpoint=endpoint)
        try:
            job = with_parameters(job, record["parameters"])  # score what was written, not the defaults
            record["evaluation"] = Scoring.start(job, resolve_device(device), show_progress=True).report(
                job, target
            )
        finally:
            job.close()
        write_manifest(target, record)
        write_card(target)
    return record["evaluation"]


def check_subfolder_names(tasks: list[str]) -> None:
    clashing = [t for t in tasks if t in RESERVED_NAMES]
    if clashing:
        raise RecipeError(
            f"task {clashing[0]!r}: its subfolder would clash with the artifact's own {clashing[0]!r}; "
            "rename the task to export subfolders",
            field="models",
        )


def export_subfolders(
    directory: Path,
    *,
    max_shard_size: int | str = "5GB",
    token: str | None = None,
    endpoint: str | None = None,
) -> list[str]:
    """Write each task's materialized model into `<artifact>/<task>/`, loadable with plain transformers."""
    merge = CompressedMerge.from_pretrained(directory, token=token, endpoint=endpoint)
    check_subfolder_names(merge.tasks)
    for task in merge.tasks:
        merge.export_task(task, max_shard_size=max_shard_size)
    return merge.tasks


def publish_output(
    directory: Path, target: PushTarget, *, token: str | None = None, endpoint: str | None = None
) -> Published:
    """Push a finished output directory to a Hub repo, with its card written for that repo.

    Every file is checked against the hashes of the run record first: a damaged output is not published.
    The output is locked meanwhile, so no run replaces it halfway through the upload.
    """
    with output_lock(directory):
        return _publish_locked(directory, target, token=token, endpoint=endpoint)


def _publish_locked(
    directory: Path, target: PushTarget, *, token: str | None, endpoint: str | None
) -> Published:
    record = read_manifest(directory)
    if "files" in record:
        verify_output(directory)
    else:
        log.warning("%s: written by an older hubmerge, its files have no recorded hashes to check", directory)
    if record["result"] == "compressed" and not record["base"].get("revision"):
        log.warning(
            "the base of this artifact is a local path (%s): others cannot rebuild its tasks; "
            "merge from a Hub base to publish an artifact anyone can use",
            record["base"]["source"],
        )
    if target.export == "subfolders":
        if record["result"] != "compressed":
            raise HubmergeError(f"{directory}: --export subfolders applies to compressed artifacts only")
        export_subfolders(directory, token=token, endpoint=endpoint)
        record_hashes(directory, record)  # the exported task folders are part of the output now
    write_card(directory, repo_id=target.repo_id)
    return hub.publish(directory, target, token=token, endpoint=endpoint)
