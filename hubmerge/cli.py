"""The `hubmerge` command line: run recipes, rebuild task models from artifacts, inspect outputs."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hubmerge.artifacts import MANIFEST, CompressedMerge
from hubmerge.card import histogram_rows, storage_rows
from hubmerge.errors import HubmergeError

app = typer.Typer(
    help=(
        "Merge and compress fine-tuned checkpoints of one base model: TALL masks, Consensus Merging, TIES, "
        "Task Arithmetic (Wang, Dimitriadis et al., ICML 2024). Start with `hubmerge run RECIPE.yaml`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
if not console.is_terminal:
    # Rich falls back to 80 columns for pipes and logs, which folds paths and numbers in the tables.
    console.width = 120
errors = Console(stderr=True)


@app.callback()
def _on_start() -> None:
    # A SIGTERM (a scheduler's timeout, torchrun stopping the other processes of a failed run) then unwinds
    # like Ctrl-C: staging and search directories are removed and the previous output stays as it was.
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def _fail(err: HubmergeError) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _print_plan(plan: dict[str, Any]) -> None:
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
    console.print(f"bytes to read {_human(plan['bytes_to_read'])}")
    console.print(f"output size   {_human(plan['output_bytes'])}")
    console.print(f"peak memory   ~{_human(plan['peak_memory_estimate'])} for tensors (estimate)")


def _histogram_table(record: dict[str, Any]) -> Table | None:
    rows = histogram_rows(record)
    if not rows:
        return None
    t = len(record["tasks"])
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


def _storage_table(record: dict[str, Any]) -> Table:
    storage = record["storage"]
    table = Table(
        title=f"Storage: P′ = {storage['parameters']:,} entries, T = {storage['tasks']} "
        f"(base stored at {storage['base_bits_per_entry']:g} bits/entry)"
    )
    for column, justify in (("what", "left"), ("bits", "right"), ("vs T fp32 copies", "right")):
        table.add_column(column, justify=justify)
    for name, bits, ratio in storage_rows(storage):
        table.add_row(name, f"{bits:,}", ratio)
    return table


def _print_record(record: dict[str, Any], directory: Path) -> None:
    table = Table(title=f"{record['method']} ({record['result']}) in {directory}")
    for column in ("task", "source", "revision", "setting", "mask entries"):
        table.add_column(column)
    d = record["parameters_counted"]
    for task in record["tasks"]:
        setting = (
            f"λ = {task['lambda']:g}"
            if "lambda" in task
            else f"density {task['density']:g}"
            if "density" in task
            else ""
        )
        kept = task.get("mask_kept")
        table.add_row(
            task["name"],
            task["location"],
            task["revision"] or "local",
            setting,
            f"{kept:,} ({100 * kept / d:.2f} %)" if kept is not None else "",
        )
    console.print(table)
    if record["result"] == "compressed":
        console.print(_storage_table(record))
    histogram = _histogram_table(record)
    if histogram is not None:
        console.print(histogram)
        hist = record["stats"]["agreement_histogram"]
        console.print(
            f"catastrophic (in no mask): {100 * hist[0] / d:.2f} %   selfish (in exactly one): {100 * hist[1] / d:.2f} %"
        )
    if "consensus_kept" in record["stats"]:
        kept = record["stats"]["consensus_kept"]
        console.print(f"consensus keeps {kept:,} of {d:,} entries ({100 * kept / d:.2f} %)")
    if "search" in record:
        _print_search(record["search"])
    if "evaluation" in record:
        _print_evaluation(record["evaluation"])


def _print_search(search: dict[str, Any]) -> None:
    candidates = search["candidates"]
    settings = [k for k in candidates[0] if k not in ("accuracy", "normalized", "mean_normalized")]
    tasks = list(candidates[0]["normalized"])
    table = Table(title=f"Search on the {search['split']} split (normalized score per task)")
    for column in (*settings, *tasks, "mean"):
        table.add_column(column, justify="right")
    for row in candidates:
        table.add_row(
            *(f"{row[k]:g}" for k in settings),
            *(f"{100 * row['normalized'][t]:.1f}" for t in tasks),
            f"{100 * row['mean_normalized']:.1f}",
        )
    console.print(table)
    console.print("chosen: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in search["chosen"].items()))


def _print_evaluation(evaluation: dict[str, Any]) -> None:
    tasks = list(evaluation["datasets"])
    table = Table(
        title=f"{evaluation['metric']} on the {evaluation['split']} split (%; normalized = / fine-tuned)"
    )
    for column in ("model", *tasks, "mean", "mean normalized"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, row in evaluation["rows"].items():
        table.add_row(
            name,
            *(f"{100 * row['accuracy'][t]:.2f}" for t in tasks),
            f"{100 * row['mean_accuracy']:.2f}",
            f"{100 * row['mean_normalized']:.1f}",
        )
    console.print(table)


@app.command()
def run(
    recipe: Annotated[
        Path, typer.Argument(help="The YAML recipe (see README: base, models, method, parameters).")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output directory (overrides `output:` in the recipe)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Validate and print the plan (sources, passes, sizes); write nothing."
        ),
    ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto (the GPU when there is one).")] = "auto",
    max_shard_size: Annotated[
        str, typer.Option(help="Largest weights file before sharding, e.g. 5GB or 500MB.")
    ] = "5GB",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary tables.")] = False,
    locked: Annotated[
        bool,
        typer.Option(
            "--locked",
            help="Refuse to run if a Hub source no longer resolves to the commit in RECIPE's .lock.yaml file.",
        ),
    ] = False,
    push: Annotated[
        bool, typer.Option("--push/--no-push", help="Publish to the recipe's `push:` repo when done.")
    ] = True,
    num_processes: Annotated[
        int,
        typer.Option(
            "--num-processes",
            min=1,
            help="Split the work over N processes on this machine (through torchrun; byte-identical "
            "output). Runs started by torchrun or `accelerate launch` join their process group by themselves.",
        ),
    ] = 1,
) -> None:
    """Run a merge recipe: a merged model directory, or a compressed artifact (TALL / magnitude masks).

    The output appears only when complete (written to a hidden sibling directory, then renamed). Hub
    sources are pinned to the commit they resolve to; with a `push:` block the output is then uploaded.
    On the CPU the arithmetic runs in fused C kernels, compiled with the system C compiler on first use
    (same results; HUBMERGE_FUSED=0 uses torch operations instead).
    """
    from hubmerge.distributed import join, launch, leave
    from hubmerge.engine import plan_summary, prepare, resolve_device
    from hubmerge.lock import read_lock
    from hubmerge.recipe import load_recipe
    from hubmerge.run import publish_output, resolve_output, run_recipe
    from hubmerge.writer import check_output_path

    try:
        parsed = load_recipe(recipe)
        lock = read_lock(recipe) if locked else None
        if dry_run:
            check_output_path(resolve_output(parsed, output), overwrite)
            job = prepare(parsed, str(recipe), lock=lock)
            _print_plan(plan_summary(job))
            if parsed.push and push:
                console.print(f"push to      {parsed.push.repo_id} (export: {parsed.push.export})")
            job.close()
            return
        if num_processes > 1:
            relaunched = ["run", str(recipe), "--device", device, "--max-shard-size", max_shard_size]
            relaunched += ["--output", str(output)] if output else []
            relaunched += [
                flag
                for flag, on in (
                    ("--overwrite", overwrite),
                    ("-q", quiet),
                    ("--locked", locked),
                    ("--no-push", not push),
                )
                if on
            ]
            raise typer.Exit(launch(num_processes, relaunched))
        group, torch_device = join(resolve_device(device))
        try:
            result = run_recipe(
                parsed,
                str(recipe),
                output=output,
                overwrite=overwrite,
                device=torch_device,
                max_shard_size=max_shard_size,
                show_progress=not quiet,
                lock=lock,
                group=group,
            )
        finally:
            leave()
    except HubmergeError as err:
        raise _fail(err) from None
    if not group.is_main:
        return
    if not quiet:
        _print_record(result.record, result.output)
    console.print(
        f"wrote {result.output} ({result.record['result']}, {result.record['seconds']:.1f} s, "
        f"read {_human(result.record['bytes_read'])})"
    )
    if parsed.push and push:
        try:
            published = publish_output(result.output, parsed.push)
        except HubmergeError as err:
            raise _fail(err) from None
        _print_published(published)


def _print_published(published: Any) -> None:
    console.print(f"pushed: {published.commit_url}", highlight=False, soft_wrap=True)
    if published.pr_url:
        console.print(f"pull request: {published.pr_url}", highlight=False, soft_wrap=True)


@app.command(name="eval")
def eval_command(
    recipe: Annotated[
        Path, typer.Argument(help="The recipe whose output to score (needs an `evaluation:` section).")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="The output directory (default: the recipe's `output:`)."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto (the GPU when there is one).")] = "auto",
) -> None:
    """Score an existing output: zero-shot, fine-tuned and merged rows, absolute and normalized.

    Writes the results into the output's hubmerge.json and model card (model-index).
    """
    from hubmerge.recipe import load_recipe
    from hubmerge.run import evaluate_output

    try:
        evaluation = evaluate_output(load_recipe(recipe), str(recipe), output=output, device=device)
    except HubmergeError as err:
        raise _fail(err) from None
    _print_evaluation(evaluation)


@app.command()
def lock(
    recipe: Annotated[Path, typer.Argument(help="The YAML recipe whose Hub sources to pin.")],
) -> None:
    """Pin every Hub source of RECIPE to the commit it resolves to now, in RECIPE.lock.yaml.

    `hubmerge run RECIPE --locked` then refuses to run when a source has moved. Downloads no weights.
    """
    from hubmerge.engine import locate_sources
    from hubmerge.hub import HubSource
    from hubmerge.lock import write_lock
    from hubmerge.recipe import load_recipe

    try:
        located = locate_sources(load_recipe(recipe))
        hub_sources = {spec: where for spec, where in located.items() if isinstance(where, HubSource)}
        written = write_lock(recipe, hub_sources)
    except HubmergeError as err:
        raise _fail(err) from None
    table = Table(title=f"{written}: {len(hub_sources)} Hub sources pinned")
    for column in ("source", "commit"):
        table.add_column(column)
    for spec, where in hub_sources.items():
        table.add_row(spec, where.sha)
    console.print(table)
    local = len(located) - len(hub_sources)
    if local:
        console.print(f"{local} local source(s) are not locked (their files are not under version control).")


@app.command(name="push")
def push_command(
    output: Annotated[Path, typer.Argument(help="An output directory of `hubmerge run`.")],
    repo_id: Annotated[
        str, typer.Argument(help="The Hub repo to publish to, `user/name` (created if missing).")
    ],
    private: Annotated[
        bool,
        typer.Option("--private", help="Create the repo as private (an existing repo keeps its visibility)."),
    ] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to commit to (created from main if missing).")
    ] = None,
    create_pr: Annotated[
        bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")
    ] = False,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    export: Annotated[
        str,
        typer.Option(
            help="`subfolders`: also store each task's rebuilt model in <task>/ (compressed artifacts), "
            "so plain transformers loads it with subfolder=<task>."
        ),
    ] = "none",
) -> None:
    """Publish an output directory to the Hub: one commit, files the repo already has are skipped.

    Rewrites the output's README.md (model card) for REPO_ID first. Safe to re-run after a failed upload.
    """
    from pydantic import ValidationError

    from hubmerge.recipe import PushTarget
    from hubmerge.run import publish_output

    try:
        target = PushTarget(
            repo_id=repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            commit_message=message,
            export=export,
        )
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise _fail(
            HubmergeError(f"{'REPO_ID' if field == 'repo_id' else '--' + field}: {first['msg']}")
        ) from None
    try:
        published = publish_output(output, target)
    except HubmergeError as err:
        raise _fail(err) from None
    _print_published(published)


def _open_artifact(artifact: str) -> CompressedMerge:
    from hubmerge.recipe import is_hub_id, split_revision

    if is_hub_id(artifact):
        repo_id, revision = split_revision(artifact)
        return CompressedMerge.from_pretrained(repo_id, revision=revision)
    return CompressedMerge.from_pretrained(artifact)


@app.command()
def materialize(
    artifact: Annotated[
        str, typer.Argument(help="A compressed artifact: a directory, or a Hub repo `user/name[@revision]`.")
    ],
    task: Annotated[str, typer.Option("--task", "-t", help="Which task's model to rebuild.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the rebuilt model.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    dtype: Annotated[
        str | None, typer.Option(help="auto, float32, bfloat16 or float16 (default: the artifact's).")
    ] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest weights file before sharding.")] = "5GB",
) -> None:
    """Rebuild one task's model, θ0 + m_t ⊙ τ_MTL, as a directory that transformers loads."""
    try:
        merge = _open_artifact(artifact)
        written = merge.save_task(
            task, output, overwrite=overwrite, dtype=dtype, max_shard_size=max_shard_size
        )
    except HubmergeError as err:
        raise _fail(err) from None
    console.print(f"wrote {written} (task {task} of {artifact})")


@app.command()
def inspect(
    path: Annotated[
        Path, typer.Argument(help="An output directory of `hubmerge run` (artifact or merged model).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")] = False,
) -> None:
    """Tasks, storage (bits as in the paper vs T fine-tuned copies) and the mask agreement histogram."""
    manifest = path / MANIFEST
    try:
        if not manifest.is_file():
            raise HubmergeError(f"{path}: not a hubmerge output (no {MANIFEST})")
        record = json.loads(manifest.read_text())
        if record.get("result") == "compressed":
            CompressedMerge.from_pretrained(path)  # validates the format version
    except HubmergeError as err:
        raise _fail(err) from None
    if as_json:
        console.print_json(data=record)
    else:
        _print_record(record, path)
