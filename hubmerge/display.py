"""What the CLI prints: the tables of a run record, a dry-run plan, the method list and validation results.

Every function takes the console to print on: a report that is the command's result goes to stdout, the
summary of work done as a side effect (after `hubmerge run`) goes to stderr, so stdout stays parseable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from hubmerge.hub import HubSource, Published
    from hubmerge.methods import Method
    from hubmerge.recipe import Recipe
    from hubmerge.record import Evaluation, RunRecord, SearchRecord


def error_line(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def make_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal:
        # Rich falls back to 80 columns for pipes and logs, which folds paths and numbers in the tables.
        console.width = 120
    return console


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def print_plan(console: Console, plan: dict[str, Any]) -> None:
    table = Table(title=f"Plan for {plan['recipe']} (dry run: nothing is written)")
    for column in ("role", "name", "source", "revision"):
        table.add_column(column)
    for s in plan["sources"]:
        table.add_row(s["role"], s["name"], s["location"], s["revision"] or "local")
    console.print(table)
    console.print(f"method        {plan['method']} -> {plan['result']}")
    console.print(f"parameters    {json.dumps(plan['parameters'])}")
    tensors = plan["tensors"]
    console.print(f"tensors       {tensors['merged']} merged, {tensors['copied']} copied from the base")
    console.print(f"d (counted)   {plan['parameters_counted']:,} entries")
    console.print(f"passes        {len(plan['passes'])}: {', '.join(plan['passes'])}")
    console.print(f"bytes to read {human(plan['bytes_to_read'])}")
    console.print(f"output size   {human(plan['output_bytes'])}")
    console.print(f"peak memory   ~{human(plan['peak_memory_estimate'])} for tensors (estimate)")
    if "output" in plan:
        console.print(f"output        {plan['output']}", highlight=False, soft_wrap=True)
    if "push" in plan:
        push = plan["push"]
        console.print(
            f"push to       {push['repo_id']} as {push['user']} (export: {push['export']})", highlight=False
        )


def _histogram_table(record: RunRecord) -> Table | None:
    from hubmerge.card import histogram_rows

    rows = histogram_rows(record)
    if not rows:
        return None
    t = len(record.tasks)
    table = Table(title="Mask agreement: entries contained in exactly c task masks")
    for column in ("c", "entries", "share", "active entries"):
        table.add_column(column, justify="right")
    for c, n, share, active in rows:
        label = (
            f"{c} (catastrophic)"
            if c == 0
            else f"{c} (selfish)"
            if c == 1
            else f"{c} (all)"
            if c == t
            else str(c)
        )
        table.add_row(label, f"{n:,}", share, f"{active:,}")
    return table


def _storage_table(record: RunRecord) -> Table:
    from hubmerge.card import storage_rows

    storage = record.storage
    assert storage is not None
    table = Table(
        title=f"Storage: P′ = {storage.parameters:,} entries, T = {storage.tasks} "
        f"(base stored at {storage.base_bits_per_entry:g} bits/entry)"
    )
    for column, justify in (("what", "left"), ("bits", "right"), ("vs T fp32 copies", "right")):
        table.add_column(column, justify=justify)
    for name, bits, ratio in storage_rows(storage):
        table.add_row(name, f"{bits:,}", ratio)
    return table


def print_record(console: Console, record: RunRecord | dict[str, Any], directory: Path) -> None:
    """The tables of a run record (a `RunRecord`, or its JSON object as `run_recipe` returns it)."""
    from hubmerge.record import RunRecord

    record = RunRecord.model_validate(record)
    table = Table(title=f"{record.method} ({record.result}) in {directory}")
    for column in ("task", "source", "revision", "setting", "mask entries"):
        table.add_column(column)
    d = record.parameters_counted or 0
    for task in record.tasks:
        setting = (
            f"λ = {task.lambda_:g}"
            if task.lambda_ is not None
            else f"density {task.density:g}"
            if task.density is not None
            else ""
        )
        kept = task.mask_kept
        table.add_row(
            task.name,
            task.location,
            task.revision or "local",
            setting,
            f"{kept:,} ({100 * kept / d:.2f} %)" if kept is not None else "",
        )
    console.print(table)
    if record.compressed:
        console.print(_storage_table(record))
    histogram = _histogram_table(record)
    if histogram is not None:
        console.print(histogram)
        hist = record.stats.agreement_histogram or []
        console.print(
            f"catastrophic (in no mask): {100 * hist[0] / d:.2f} %   selfish (in exactly one): {100 * hist[1] / d:.2f} %"
        )
    if record.stats.consensus_kept is not None:
        kept = record.stats.consensus_kept
        console.print(f"consensus keeps {kept:,} of {d:,} entries ({100 * kept / d:.2f} %)")
    if record.search is not None:
        print_search(console, record.search)
    if record.evaluation is not None:
        print_evaluation(console, record.evaluation)


def print_search(console: Console, search: SearchRecord) -> None:
    candidates = search.candidates
    settings = [k for k in candidates[0] if k not in ("accuracy", "normalized", "mean_normalized")]
    tasks = list(candidates[0]["normalized"])
    table = Table(title=f"Search on the {search.split} split (normalized score per task)")
    for column in (*settings, *tasks, "mean"):
        table.add_column(column, justify="right")
    for row in candidates:
        table.add_row(
            *(f"{row[k]:g}" for k in settings),
            *(f"{100 * row['normalized'][t]:.1f}" for t in tasks),
            f"{100 * row['mean_normalized']:.1f}",
        )
    console.print(table)
    console.print("chosen: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in search.chosen.items()))


def print_evaluation(console: Console, evaluation: Evaluation | dict[str, Any]) -> None:
    """The scores of an evaluation (the record's, or the JSON object `evaluate_output` returns)."""
    from hubmerge.evaluation import display_scale, higher_is_better
    from hubmerge.record import Evaluation

    evaluation = Evaluation.model_validate(evaluation)
    tasks = list(evaluation.datasets)
    scale = display_scale(evaluation.metric)
    notes = ["%"] if scale == 100 else []
    if not higher_is_better(evaluation.metric):
        notes.append("lower is better")
    notes.append("normalized = / fine-tuned")
    table = Table(title=f"{evaluation.metric} on the {evaluation.split} split ({'; '.join(notes)})")
    for column in ("model", *tasks, "mean", "mean normalized"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, row in evaluation.rows.items():
        table.add_row(
            name,
            *(f"{scale * row.accuracy[t]:.2f}" for t in tasks),
            f"{scale * row.mean_accuracy:.2f}",
            f"{100 * row.mean_normalized:.1f}",
        )
    console.print(table)


def print_timing(console: Console, record: dict[str, Any], wall_seconds: float) -> None:
    """`run -v`: where each source resolved to, and where the time went."""
    for role, source in (("base", record["base"]), *((t["name"], t) for t in record["tasks"])):
        console.print(
            f"{role}: {source['source']} -> {source['location']} @ {source['revision'] or 'local files'}",
            highlight=False,
            soft_wrap=True,
        )
    merge = record["seconds"]
    console.print(
        f"time: {wall_seconds:.1f} s in all, {merge:.1f} s merging and writing on {record['device']} "
        f"({record['processes']} process(es)), {wall_seconds - merge:.1f} s resolving, opening, searching, "
        f"scoring and finishing",
        highlight=False,
        soft_wrap=True,
    )


def parameter_rows(spec: Method) -> list[tuple[str, str, str]]:
    """(name, default, description) of each recipe parameter of a method, nested options as `ties.density`."""

    def rows(model: Any, prefix: str) -> list[tuple[str, str, str]]:
        found = []
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            nested = _nested_params(field.annotation)
            if nested is not None:
                found.append((key, "—", field.description or ""))
                found += rows(nested, key + ".")
            else:
                found.append((key, json.dumps(field.default), field.description or ""))
        return found

    return rows(spec.params, "")


def _nested_params(annotation: Any) -> Any:
    from typing import get_args

    from pydantic import BaseModel

    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def print_methods(console: Console) -> None:
    from hubmerge.methods import METHODS

    table = Table(title="Merge methods (recipe `method:`) and their `parameters:`", title_justify="left")
    for column in ("method / parameter", "result / default", "what it computes / means"):
        table.add_column(column)
    for spec in METHODS.values():
        table.add_section()
        table.add_row(f"[bold]{spec.name}[/]", spec.result, f"{spec.description}\n[dim]{spec.summary}[/]")
        for name, default, description in parameter_rows(spec):
            table.add_row(f"  {name}", default, description)
    console.print(table)


def print_validation(
    console: Console,
    path: Path,
    recipe: Recipe,
    located: dict[str, Path | HubSource],
    tensors: dict[str, int],
    base_from_adapters: bool = False,
) -> None:
    """`hubmerge validate`: where each source is, and the verdict; `tensors` counts those of local sources."""
    from hubmerge.hub import ADAPTER_CONFIG

    table = Table()
    for column in ("role", "name", "source", "resolved to"):
        table.add_column(column)
    for role, name, spec in (
        ("base", "", recipe.base),
        *(("model", n, s) for n, s in zip(recipe.task_names, recipe.sources, strict=True)),
    ):
        where = located[spec]
        if isinstance(where, Path):
            kind = "directory" if where.is_dir() else "file"
            if (where / ADAPTER_CONFIG).is_file():
                kind = "PEFT adapter"
            table.add_row(role, name, spec, f"local {kind}, {tensors[spec]} tensors")
        else:
            table.add_row(role, name, spec, f"{where.repo_id} @ {where.sha}")
    console.print(table)
    checked = (
        "the local models' tensor names and shapes match the base"
        if recipe.base in tensors
        else "the base is on the Hub: `hubmerge run` checks the shapes once it is downloaded"
    )
    if base_from_adapters:
        checked += f"; the base is the one the adapters' config names, {recipe.base}"
    console.print(
        f"{path}: OK ({recipe.method}, {len(recipe.sources)} models; {checked})",
        highlight=False,
        soft_wrap=True,
    )


def print_lock(console: Console, written: Path, pinned: dict[str, str], sources: int) -> None:
    table = Table(title=f"{written}: {len(pinned)} Hub sources pinned")
    for column in ("source", "commit"):
        table.add_column(column)
    for spec, sha in pinned.items():
        table.add_row(spec, sha)
    console.print(table)
    if sources > len(pinned):
        console.print(
            f"{sources - len(pinned)} local source(s) are not locked (their files are not under version control)."
        )


def print_published(published: Published, console: Console) -> None:
    console.print(f"pushed: {published.commit_url}", highlight=False, soft_wrap=True)
    if published.pr_url:
        console.print(f"pull request: {published.pr_url}", highlight=False, soft_wrap=True)
