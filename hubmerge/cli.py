"""The `hubmerge` command line: run recipes, rebuild task models from artifacts, inspect outputs.

Only typer is imported up front, so `hubmerge --help` and `--version` answer at once; each command imports
what it needs (torch, the Hub client) when it runs. Results go to stdout, progress bars, summaries and
errors to stderr.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

import hubmerge
from hubmerge.cli_base import Command, Group
from hubmerge.errors import HubmergeError, OutputError, RecipeError

if TYPE_CHECKING:
    from rich.console import Console

    from hubmerge.sources import Checkpoint

app = typer.Typer(
    name="hubmerge",
    cls=Group,
    help=(
        "Merge and compress fine-tuned checkpoints of one base model: TALL masks, Consensus Merging, TIES, "
        "Task Arithmetic (Wang, Dimitriadis et al., ICML 2024). Start with `hubmerge run RECIPE`; "
        "`hubmerge methods` lists the methods and their parameters."
    ),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)


def command(name: str | None = None) -> Any:
    return app.command(name=name, cls=Command)


def _remember_verbose(ctx: typer.Context, value: bool) -> bool:
    if value:
        ctx.ensure_object(dict)["verbose"] = True
    return value


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"hubmerge {hubmerge.__version__}")
        raise typer.Exit()


Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        callback=_remember_verbose,
        help="More detail: resolved sources and timing; on an error, its traceback and cause.",
    ),
]


DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")

DeviceOption = Annotated[
    str,
    typer.Option(
        metavar="|".join(DEVICES),
        autocompletion=lambda: list(DEVICES),
        help="cpu, cuda, or auto (the GPU when there is one).",
    ),
]
ShardSize = Annotated[
    str, typer.Option(metavar="SIZE", help="Largest weights file before sharding, e.g. 5GB or 500MB.")
]


@app.callback()
def _on_start(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    verbose: Verbose = False,
) -> None:
    ctx.ensure_object(dict)["verbose"] = verbose
    # A SIGTERM (a scheduler's timeout, torchrun stopping the other processes of a failed run) then unwinds
    # like Ctrl-C: staging and search directories are removed and the previous output stays as it was.
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _console(stderr: bool = False) -> Console:
    from hubmerge.display import make_console

    return make_console(stderr)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


@command()
def run(
    recipe: Annotated[
        Path,
        typer.Argument(
            metavar="RECIPE", help="The YAML recipe (see README: base, models, method, parameters)."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output directory (overrides `output:` in the recipe)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Validate and print the plan (sources, passes, sizes); write nothing."
        ),
    ] = False,
    device: DeviceOption = "auto",
    max_shard_size: ShardSize = "5GB",
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
    allow_nonfinite: Annotated[
        bool,
        typer.Option(
            "--allow-nonfinite",
            help="Merge even if a model has NaN/Inf weights; their counts are recorded in hubmerge.json "
            "and the card.",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the run record (or the --dry-run plan) as JSON on stdout, no tables."
        ),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Run a merge recipe: a merged model directory, or a compressed artifact (TALL / magnitude masks).

    Models are full fine-tunes or PEFT adapters (LoRA: read as θ0 + B @ A; (IA)³: merged as vectors); with
    `output_format: peft` a merge of LoRA adapters is written as one LoRA adapter of rank `lora_rank`. The
    output appears only when complete (written to a hidden sibling directory, then renamed). Hub
    sources are pinned to the commit they resolve to; with a `push:` block the output is then uploaded.
    On the CPU the arithmetic runs in fused C kernels, compiled with the system C compiler on first use
    (same results; HUBMERGE_FUSED=0 uses torch operations instead).
    """
    from hubmerge.adapters import with_base
    from hubmerge.display import human, print_plan, print_published, print_record, print_timing
    from hubmerge.distributed import join, launch, leave
    from hubmerge.engine import prepare
    from hubmerge.hub import check_push_access
    from hubmerge.lock import read_lock
    from hubmerge.output import check_output_path
    from hubmerge.planning import locate_sources, plan_summary, resolve_device
    from hubmerge.recipe import load_recipe
    from hubmerge.run import publish_output, recipe_inputs, resolve_output, run_recipe
    from hubmerge.writer import parse_shard_size

    started = time.perf_counter()
    parse_shard_size(max_shard_size)
    torch_device = resolve_device(device)
    parsed = with_base(load_recipe(recipe))
    lock = read_lock(recipe) if locked else None
    target = parsed.push if push else None
    # a run that cannot publish fails now, not after the merge
    pusher = check_push_access(target) if target is not None else None
    if dry_run:
        state = check_output_path(
            resolve_output(parsed, output), overwrite, recipe_inputs(parsed, str(recipe))
        )
        job = prepare(parsed, str(recipe), lock=lock)
        plan = plan_summary(job)
        plan["output"] = state.describe()
        if target is not None:
            plan["push"] = {"repo_id": target.repo_id, "user": pusher, "export": target.export}
        if as_json:
            _echo_json(plan)
        else:
            print_plan(_console(), plan)
        job.close()
        return
    if num_processes > 1:
        # what every process would refuse alike is refused here, once
        check_output_path(resolve_output(parsed, output), overwrite, recipe_inputs(parsed, str(recipe)))
        locate_sources(parsed)
        from hubmerge.distributed import current_command_line

        # this very command line, every option included, less --num-processes (the processes run alone)
        raise typer.Exit(launch(num_processes, current_command_line(leave_out={"num_processes"})))
    group, torch_device = join(torch_device)
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
            allow_nonfinite=allow_nonfinite,
        )
    finally:
        leave()
    if not group.is_main:
        return
    record = result.record
    summary = _console(stderr=True)
    if as_json:
        _echo_json(record)
    elif not quiet:
        print_record(summary, record, result.output)
    if verbose:
        print_timing(summary, record, time.perf_counter() - started)
    wrote = f"wrote {result.output} ({record['result']}, {record['seconds']:.1f} s, read {human(record['bytes_read'])})"
    (summary if as_json else _console()).print(wrote, highlight=False, soft_wrap=True)
    if target is not None:
        print_published(publish_output(result.output, target), summary if as_json else _console())


@command()
def validate(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="The YAML recipe to check.")],
    verbose: Verbose = False,
) -> None:
    """Check a recipe and its sources without reading any weights.

    Parses the recipe and the method's parameters, resolves every Hub source to its commit (downloading
    nothing), and opens the headers of local sources to check that every model matches the base.
    """
    from hubmerge.adapters import task_models, with_base
    from hubmerge.display import print_validation
    from hubmerge.ia3 import ia3_configs
    from hubmerge.methods import METHODS
    from hubmerge.planning import locate_sources
    from hubmerge.recipe import load_recipe
    from hubmerge.sources import check_compatible, open_source

    written = load_recipe(recipe)
    parsed = with_base(written)
    located = locate_sources(parsed)
    local: dict[str, Checkpoint] = {}
    try:
        for spec, where in located.items():
            if isinstance(where, Path):
                local[spec] = open_source(spec, where)  # a local source: its headers only
        entries = [
            (n, e) for n, e in zip(parsed.task_names, parsed.entries, strict=True) if e.source in local
        ]
        ia3 = ia3_configs(
            [n for n, _ in entries], [local[e.source] for _, e in entries], [e.kind for _, e in entries]
        )
        # (IA)³ vectors are merged in their own space: ia3_configs checked they fit one another
        if ia3 is None and parsed.base in local:
            models = task_models(parsed, local, local[parsed.base])
            compressed = METHODS[parsed.method].result == "compressed"
            check_compatible(
                local[parsed.base],
                list(models.values()),
                list(models),
                parsed.selects,
                own_tensors=compressed,
            )
    finally:
        for ckpt in local.values():
            ckpt.close()
    tensors = {spec: len(c.infos) for spec, c in local.items()}
    print_validation(_console(), recipe, parsed, located, tensors, base_from_adapters=written.base is None)


@command()
def methods(verbose: Verbose = False) -> None:
    """List the merge methods with their parameters, defaults and what each computes."""
    from hubmerge.display import print_methods

    print_methods(_console())


@command(name="eval")
def eval_command(
    recipe: Annotated[
        Path,
        typer.Argument(
            metavar="RECIPE", help="The recipe whose output to score (needs an `evaluation:` section)."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="The output directory (default: the recipe's `output:`)."),
    ] = None,
    device: DeviceOption = "auto",
    verbose: Verbose = False,
) -> None:
    """Score an existing output: zero-shot, fine-tuned and merged rows, absolute and normalized.

    Writes the results into the output's hubmerge.json and model card (model-index).
    """
    from hubmerge.display import print_evaluation
    from hubmerge.planning import resolve_device
    from hubmerge.recipe import load_recipe
    from hubmerge.run import evaluate_output

    resolve_device(device)
    evaluation = evaluate_output(load_recipe(recipe), str(recipe), output=output, device=device)
    print_evaluation(_console(), evaluation)


@command()
def lock(
    recipe: Annotated[
        Path, typer.Argument(metavar="RECIPE", help="The YAML recipe whose Hub sources to pin.")
    ],
    verbose: Verbose = False,
) -> None:
    """Pin every Hub source of RECIPE to the commit it resolves to now, in RECIPE.lock.yaml.

    `hubmerge run RECIPE --locked` then refuses to run when a source has moved. Downloads no weights.
    """
    from hubmerge.display import print_lock
    from hubmerge.hub import HubSource
    from hubmerge.lock import write_lock
    from hubmerge.planning import locate_sources
    from hubmerge.recipe import load_recipe

    located = locate_sources(load_recipe(recipe))  # with the base the adapters name, when the recipe has none
    hub_sources = {spec: where for spec, where in located.items() if isinstance(where, HubSource)}
    written = write_lock(recipe, hub_sources)
    print_lock(_console(), written, {spec: where.sha for spec, where in hub_sources.items()}, len(located))


def _legacy_push_order(first: str, second: str) -> tuple[str, str]:
    """(repo id, path): `hubmerge push OUTPUT_DIR REPO_ID`, the order of earlier versions, works with a warning."""
    from hubmerge.output import is_hubmerge_output
    from hubmerge.recipe import is_hub_id

    if is_hub_id(second) and not Path(second).exists() and is_hubmerge_output(Path(first)):
        print(
            f"warning: `hubmerge push OUTPUT REPO_ID` is deprecated; write `hubmerge push {second} {first}` "
            "(the order of `hf upload`)",
            file=sys.stderr,
        )
        return second, first
    return first, second


@command(name="push")
def push_command(
    repo_id: Annotated[
        str,
        typer.Argument(
            metavar="REPO_ID", help="The Hub repo to publish to, `user/name` (created if missing)."
        ),
    ],
    path: Annotated[str, typer.Argument(metavar="PATH", help="An output directory of `hubmerge run`.")] = ".",
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", "-m", help="Commit message.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(help="A Hub token with write access (default: HF_TOKEN or the `hf auth login` one)."),
    ] = None,
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
    export: Annotated[
        str,
        typer.Option(
            help="`subfolders`: also store each task's rebuilt model in a subfolder named after the task "
            "(compressed artifacts), so plain transformers loads it with `subfolder=`."
        ),
    ] = "none",
    verbose: Verbose = False,
) -> None:
    """Publish an output directory to the Hub: one commit, files the repo already has are skipped.

    Arguments and options as `hf upload`. Rewrites the output's README.md (model card) for REPO_ID
    first. Safe to re-run after a failed upload.
    """
    from pydantic import ValidationError

    from hubmerge.display import print_published
    from hubmerge.hub import check_push_access
    from hubmerge.output import read_manifest
    from hubmerge.recipe import PushTarget
    from hubmerge.run import publish_output

    repo_id, path = _legacy_push_order(repo_id, path)
    try:
        target = PushTarget(
            repo_id=repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
            export=export,
        )
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise RecipeError(
            f"{'REPO_ID' if field == 'repo_id' else '--' + field}: {first['msg']}", field=f"push.{field}"
        ) from err
    directory = Path(path)
    # `.` has no name, and the default commit message names the directory
    directory = directory if directory.name else directory.resolve()
    read_manifest(directory)  # a wrong PATH is said before any request
    check_push_access(target, token=token)
    print_published(publish_output(directory, target, token=token), _console())


@command()
def materialize(
    artifact: Annotated[
        str,
        typer.Argument(
            metavar="ARTIFACT",
            help="A compressed artifact: a directory, or a Hub repo `user/name[@revision]`.",
        ),
    ],
    task: Annotated[str, typer.Option("--task", "-t", help="Which task's model to rebuild.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the rebuilt model.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")
    ] = False,
    dtype: Annotated[
        str | None,
        typer.Option(
            metavar="|".join(DTYPES),
            autocompletion=lambda: list(DTYPES),
            help="The weights' dtype (default: the artifact's).",
        ),
    ] = None,
    max_shard_size: ShardSize = "5GB",
    base: Annotated[
        str | None,
        typer.Option(
            metavar="PATH|ORG/NAME[@REV]",
            help="Rebuild from this base instead of the recorded one (moved or mirrored; checked against the "
            "artifact).",
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Rebuild one task's model as a directory that transformers (or open_clip) loads: θ0 + m_t ⊙ τ_MTL on
    the merged tensors, the task's own tensors (heads, ...) and its config."""
    from hubmerge.compressed import CompressedMerge
    from hubmerge.recipe import is_hub_id, split_revision
    from hubmerge.writer import parse_shard_size

    parse_shard_size(max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise HubmergeError(f"--dtype {dtype}: choose {', '.join(DTYPES)}")
    repo_id, revision = split_revision(artifact) if is_hub_id(artifact) else (artifact, None)
    merge = CompressedMerge.from_pretrained(repo_id, revision=revision)
    written = merge.save_task(
        task, output, overwrite=overwrite, dtype=dtype, max_shard_size=max_shard_size, base=base
    )
    _console().print(f"wrote {written} (task {task} of {artifact})", highlight=False, soft_wrap=True)


@command()
def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH", help="An output directory of `hubmerge run` (artifact or merged model)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Check every file against the SHA-256 hashes recorded when it was written."
        ),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Tasks, storage (bits as in the paper vs T fine-tuned copies) and the mask agreement histogram."""
    from hubmerge.compressed import CompressedMerge
    from hubmerge.display import print_record
    from hubmerge.integrity import verify_output
    from hubmerge.output import read_record

    record = read_record(path)
    if record.compressed:
        CompressedMerge.from_pretrained(path)  # validates the format version
    verified = verify_output(path) if verify else None
    if as_json:
        _echo_json(record.to_dict())
    elif record.result == "task":
        _console().print(
            f"{path}: task {record.task!r} rebuilt from a {record.method} artifact of base "
            f"{record.base.source}; it loads as it is (AutoModel.from_pretrained)",
            highlight=False,
            soft_wrap=True,
        )
    else:
        print_record(_console(), record, path)
    if verified is not None:
        (_console(stderr=True) if as_json else _console()).print(
            f"verified {len(verified)} file{'' if len(verified) == 1 else 's'}", highlight=False
        )


@command(name="convert-mergekit")
def convert_mergekit(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="A mergekit YAML config.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", metavar="RECIPE.yaml", help="Write the recipe there (default: stdout)."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --output file.")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Convert a mergekit config (linear, task_arithmetic, ties) into the hubmerge recipe of the same merge.

    What hubmerge computes differently, or does not support, is said in the recipe's comments or refused.
    """
    from hubmerge.mergekit import convert_mergekit_file

    if output is not None and output.resolve() == config.resolve():
        raise OutputError(
            f"--output {output} is the mergekit config itself; write the recipe elsewhere", path=output
        )
    if output is not None and output.exists() and not overwrite:
        raise OutputError(f"{output} exists (pass --overwrite to replace it)", path=output)
    text = convert_mergekit_file(config)
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    _console().print(f"wrote {output} (from {config}; run it with `hubmerge run {output}`)", highlight=False)
