"""The command line as a user and a script meet it: start-up, help, streams, JSON, values, errors, commands.

Commands run in-process through typer's CliRunner (stdout and stderr apart), except where the thing under
test is the interpreter itself (what `import hubmerge.cli` loads, shell completion).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

import hubmerge
from hubmerge.cli import app
from hubmerge.display import parameter_rows
from hubmerge.errors import HubmergeError
from hubmerge.methods import METHODS
from tests.hubserver import HubServer

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "run": "RECIPE",
    "validate": "RECIPE",
    "methods": "",
    "eval": "RECIPE",
    "lock": "RECIPE",
    "push": "REPO_ID [PATH]",
    "convert-mergekit": "CONFIG",
    "materialize": "ARTIFACT",
    "inspect": "PATH",
}


def invoke(*args: Any, **kwargs: Any):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"}, **kwargs)


def error_line(result, code: int = 2) -> str:
    """The one stderr line of a refused command (checked to be alone, `error: ...`, exit `code`)."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert result.stdout == ""
    return lines[0]


def tensors(seed: int, shape: tuple[int, int] = (8, 6)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(shape, generator=g), "layer.bias": torch.randn(shape[0], generator=g)}


class Workspace:
    """A base and two fine-tunes (safetensors files) and a TALL-masks recipe over them."""

    def __init__(self, root: Path):
        self.root = root
        self.models = root / "models"
        self.models.mkdir()
        base = tensors(0)
        save_file(base, self.models / "base.safetensors")
        for i, name in enumerate(("a", "b"), start=1):
            delta = tensors(i)
            save_file({k: v + 0.1 * delta[k] for k, v in base.items()}, self.models / f"{name}.safetensors")
        self.output = root / "out"
        self.recipe = self.write()

    def write(self, **overrides: Any) -> Path:
        data = {
            "version": 1,
            "base": str(self.models / "base.safetensors"),
            "models": [str(self.models / "a.safetensors"), str(self.models / "b.safetensors")],
            "method": "tall_masks",
            "output": str(self.output),
            **overrides,
        }
        path = self.root / "recipe.yaml"
        path.write_text(yaml.safe_dump(data))
        return path


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading sources or merging fails the test: a refused value must be refused before either."""

    def started(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("work started before the command line was checked")

    monkeypatch.setattr("hubmerge.engine.prepare", started)
    monkeypatch.setattr("hubmerge.run.run_recipe", started)
    monkeypatch.setattr("hubmerge.compressed.CompressedMerge.from_pretrained", started)


# -- start-up -----------------------------------------------------------------------------------------------


def test_cli_import_loads_no_heavy_library() -> None:
    heavy = ("torch", "transformers", "datasets", "evaluate", "matplotlib", "huggingface_hub", "numpy")
    code = f"import sys, hubmerge.cli; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hubmerge", "--version"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout == f"hubmerge {hubmerge.__version__}\n" == "hubmerge 0.1.0\n"
    assert invoke("--version").stdout == "hubmerge 0.1.0\n"


def test_a_plain_run_loads_no_evaluation_library(ws: Workspace) -> None:
    code = (
        "import sys; from hubmerge.cli import app\n"
        f"try: app(['run', {str(ws.recipe)!r}, '-q'])\n"
        "except SystemExit as done: assert done.code == 0, done.code\n"
        "print([m for m in ('transformers', 'datasets', 'evaluate') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.splitlines()[-1] == "[]"
    assert (ws.output / "hubmerge.json").is_file()


def test_public_names_resolve_through_the_lazy_package() -> None:
    from hubmerge.compressed import CompressedMerge
    from hubmerge.run import run_recipe

    assert hubmerge.CompressedMerge is CompressedMerge
    assert hubmerge.run_recipe is run_recipe
    assert set(hubmerge.__all__) <= set(dir(hubmerge))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = hubmerge.nothing


# -- help and completion ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "arguments"), COMMANDS.items())
def test_h_is_help_and_usage_names_the_arguments(command: str, arguments: str) -> None:
    short, long = invoke(command, "-h"), invoke(command, "--help")
    assert short.exit_code == long.exit_code == 0
    assert short.stdout == long.stdout
    usage = next(line.strip() for line in short.stdout.splitlines() if "Usage:" in line)
    assert usage == f"Usage: hubmerge {command} [OPTIONS] {arguments}".rstrip()


def test_top_level_help_lists_every_command() -> None:
    result = invoke("-h")
    assert result.exit_code == 0
    listed = [
        line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and "  " in line
    ]
    assert set(COMMANDS) <= set(listed)
    assert "--install-completion" in result.stdout and "--version" in result.stdout


def complete(words: str) -> list[str]:
    env = {
        **os.environ,
        "_HUBMERGE_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    code = "from hubmerge.cli import app; app(prog_name='hubmerge')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    return done.stdout.split()


def test_shell_completion() -> None:
    assert complete("hubmerge va") == ["validate"]
    assert complete("hubmerge run r.yaml --device c") == ["cpu", "cuda"]
    assert complete("hubmerge materialize out --dtype b") == ["bfloat16"]


# -- streams: results on stdout, the rest on stderr ---------------------------------------------------------


def test_run_prints_only_its_result_on_stdout(ws: Workspace) -> None:
    result = invoke("run", ws.recipe)
    assert result.exit_code == 0, result.output
    record = json.loads((ws.output / "hubmerge.json").read_text())
    assert result.stdout.splitlines() == [
        f"wrote {ws.output} (compressed, {record['seconds']:.1f} s, read {bytes_read(record)})"
    ]
    assert "Mask agreement" in result.stderr  # the summary tables
    assert "compress and write" in result.stderr  # the progress bar of the last pass


def bytes_read(record: dict[str, Any]) -> str:
    from hubmerge.display import human

    return human(record["bytes_read"])


def test_run_json_is_the_run_record(ws: Workspace) -> None:
    result = invoke("run", ws.recipe, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((ws.output / "hubmerge.json").read_text())
    assert result.stderr.startswith(f"wrote {ws.output}")


def test_dry_run_json_is_the_plan(ws: Workspace) -> None:
    result = invoke("run", ws.recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [s["name"] for s in plan["sources"]] == ["base", "a", "b"]
    assert plan["parameters_counted"] == 8 * 6 + 8
    assert not ws.output.exists()


def test_verbose_run_shows_sources_and_timing(ws: Workspace) -> None:
    result = invoke("run", ws.recipe, "-q", "-v")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert f"a: {ws.models / 'a.safetensors'} -> {ws.models / 'a.safetensors'} @ local files" in lines
    assert any(line.startswith("time: ") and "merging and writing on cpu" in line for line in lines)


def test_allow_nonfinite(ws: Workspace) -> None:
    weights = tensors(1)
    weights["layer.weight"][2, 3] = float("nan")
    save_file(weights, ws.models / "a.safetensors")
    line = error_line(invoke("run", ws.recipe, "-q"))
    assert "'layer.weight'" in line and "--allow-nonfinite" in line
    result = invoke("run", ws.recipe, "-q", "--json", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert [(n["model"], n["tensor"], n["count"]) for n in json.loads(result.stdout)["nonfinite"]] == [
        ("a", "layer.weight", 1)
    ]


# A value for each option of `run` that takes one: a new option fails the test below until it has one here.
RELAUNCH_VALUES = {"output": "elsewhere", "device": "cpu", "max_shard_size": "1GB"}
# --num-processes is what the relaunch takes out; --dry-run never launches (it prints the plan at once).
NOT_RELAUNCHED = {"num_processes", "dry_run"}


def run_command():
    import typer

    return typer.main.get_command(app).commands["run"]


def every_run_option() -> list[str]:
    """Every option of `run` but NOT_RELAUNCHED, each away from its default, in short form where it has one."""
    given = []
    for param in run_command().params:
        if param.name in NOT_RELAUNCHED or param.param_type_name == "argument":
            continue
        if param.is_flag:
            given.append((param.secondary_opts or param.opts)[-1])  # --no-push: push is on by default
        else:
            assert param.name in RELAUNCH_VALUES, f"new option {param.opts[0]}: give it a RELAUNCH_VALUES"
            given += [param.opts[-1], RELAUNCH_VALUES[param.name]]
    return given


@pytest.mark.parametrize("num_processes", [["--num-processes", "2"], ["--num-processes=2"]])
def test_num_processes_relaunch_forwards_every_option(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, num_processes: list[str]
) -> None:
    """What `launch` runs parses to the values of the command typed, every option of `run` given (found from
    the command itself, so an option added later is covered), less --num-processes."""
    launched = []

    def launch(processes: int, args: list[str]) -> int:
        launched.append((processes, args))
        return 0

    monkeypatch.setattr("hubmerge.distributed.launch", launch)
    monkeypatch.chdir(ws.root)  # --output elsewhere: relative, as typed
    assert invoke("lock", ws.recipe).exit_code == 0  # for --locked
    options = every_run_option()
    typed = [str(ws.recipe), *options[:2], *num_processes, *options[2:]]
    assert "--no-push" in options and "-q" in options and "-o" in options

    result = invoke("-v", "run", *typed)

    assert result.exit_code == 0, result.output
    [(processes, args)] = launched
    assert processes == 2 and not any(a.startswith("--num-processes") for a in args), args
    assert args[:2] == ["--verbose", "run"], args  # the options before the command too
    run = run_command()
    relaunched, original = run.make_context("run", args[2:]).params, run.make_context("run", typed).params
    assert original["num_processes"] == 2 and relaunched["num_processes"] == 1
    assert {k: v for k, v in relaunched.items() if k != "num_processes"} == {
        k: v for k, v in original.items() if k != "num_processes"
    }
    defaults = run.make_context("run", [str(ws.recipe)]).params
    options = [p.name for p in run.params if p.param_type_name == "option" and p.name not in NOT_RELAUNCHED]
    dropped = [k for k in options if relaunched[k] == defaults[k]]
    assert not dropped, f"options left at their default by the relaunch: {dropped}"


def test_num_processes_relaunch_leaves_defaults_out_and_keeps_arguments_apart(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched = []
    monkeypatch.setattr("hubmerge.distributed.launch", lambda n, args: launched.append(args) or 0)
    monkeypatch.chdir(ws.root)
    Path("-recipe.yaml").write_text(ws.recipe.read_text())  # a recipe whose name reads like an option

    assert invoke("run", "--num-processes", "3", "--", "-recipe.yaml").exit_code == 0
    assert invoke("run", "--num-processes", "3", "--push", "recipe.yaml").exit_code == 0

    assert launched == [["run", "--", "-recipe.yaml"], ["run", "--push", "recipe.yaml"]]


# -- values checked before any work -------------------------------------------------------------------------


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-shard-size", "5gigs"], "--max-shard-size 5gigs: not a size"),
        (["--max-shard-size", "0MB"], "--max-shard-size 0MB: must be larger than zero"),
        (["--device", "tpu"], "--device tpu: choose cpu, cuda or auto"),
        (["--num-processes", "0"], "'--num-processes'"),
        (["--num-processes", "two"], "'--num-processes'"),
    ],
)
def test_run_refuses_bad_values_before_any_work(
    ws: Workspace, no_work: None, args: list[str], fragment: str, dry_run: list[str]
) -> None:
    assert fragment in error_line(invoke("run", ws.recipe, *args, *dry_run))
    assert not ws.output.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--dtype", "float64"], "--dtype float64: choose auto, float32, bfloat16, float16"),
        (["--max-shard-size", "5gigs"], "--max-shard-size 5gigs: not a size"),
    ],
)
def test_materialize_refuses_bad_values_before_opening_the_artifact(
    ws: Workspace, no_work: None, args: list[str], fragment: str
) -> None:
    result = invoke("materialize", ws.output, "--task", "a", "--output", ws.root / "task-a", *args)
    assert fragment in error_line(result)


def test_usage_errors_are_one_line() -> None:
    assert error_line(invoke("bogus")) == "error: No such command 'bogus'. (see `hubmerge -h`)"
    assert error_line(invoke("run")) == "error: Missing argument 'RECIPE'. (see `hubmerge run -h`)"
    assert error_line(invoke("--bogus")).startswith("error: No such option: --bogus")
    assert error_line(invoke("run", "r.yaml", "--bogus")).startswith("error: No such option: --bogus")


# -- failures: one line, exit 2; the traceback with -v -----------------------------------------------------


def fail_with(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    def run_recipe(*_args: Any, **_kwargs: Any) -> None:
        raise err

    monkeypatch.setattr("hubmerge.run.run_recipe", run_recipe)


def test_disk_full_is_one_line(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    target = str(ws.root / ".out.partial-1" / "tau_mtl.safetensors")
    fail_with(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target))
    assert error_line(invoke("run", ws.recipe, "-q")) == f"error: {target}: No space left on device"


def test_os_error_without_a_path(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_with(monkeypatch, OSError(errno.EROFS, os.strerror(errno.EROFS)))
    assert error_line(invoke("run", ws.recipe, "-q")) == "error: Read-only file system"


def test_verbose_failure_prints_the_traceback_and_the_hidden_cause(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        try:
            raise ValueError("the underlying cause")
        except ValueError:
            raise HubmergeError("what went wrong") from None
    except HubmergeError as err:
        fail_with(monkeypatch, err)
    assert error_line(invoke("run", ws.recipe, "-q")) == "error: what went wrong"

    for args in (["run", ws.recipe, "-q", "-v"], ["-v", "run", ws.recipe, "-q"]):
        result = invoke(*args)
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert lines[0] == "Traceback (most recent call last):"
        assert "ValueError: the underlying cause" in lines
        assert lines[-1] == "error: what went wrong"


def test_interrupt(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_with(monkeypatch, KeyboardInterrupt())
    result = invoke("run", ws.recipe, "-q")
    assert (result.exit_code, result.stderr) == (130, "interrupted\n")


def test_internal_error_is_one_line_with_exit_code_1(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_with(monkeypatch, RuntimeError("boom"))
    assert error_line(invoke("run", ws.recipe, "-q"), code=1).startswith(
        "error: internal error, RuntimeError: boom"
    )


# -- methods and validate -----------------------------------------------------------------------------------


def test_methods_lists_every_method_with_its_parameters() -> None:
    result = invoke("methods")
    assert result.exit_code == 0
    # one section per method, separated by ├───┤ rules
    sections: list[list[list[str]]] = [[]]
    for line in result.stdout.splitlines():
        if line.startswith("├"):
            sections.append([])
        elif line.startswith("│"):
            sections[-1].append([cell.strip() for cell in line.strip("│").split("│")])
    sections = sections[1:] if not sections[0] or sections[0][0][0] == "method / parameter" else sections
    assert [s[0][0] for s in sections] == list(METHODS)
    defaults = {}
    for spec, rows in zip(METHODS.values(), sections, strict=True):
        assert rows[0][1] == spec.result
        assert spec.description in " ".join(r[2] for r in rows)
        defaults[spec.name] = {r[0]: r[1] for r in rows[1:] if r[0]}  # rows without a name: wrapped text
        assert defaults[spec.name] == {name: default for name, default, _ in parameter_rows(spec)}
    # the reference implementation's defaults (README's table)
    assert defaults["ties"] == {"density": "0.2", "merge": '"mean"', "trim": '"global"', "scaling": "1.0"}
    assert defaults["magnitude_pruning"] == {"density": "0.1"}
    assert defaults["consensus"]["k"] == "2"
    assert defaults["tall_masks"]["lambda"] == "0.4"
    assert defaults["tall_masks"]["ties.merge"] == '"sum"'
    assert defaults["weight_average"] == {}


def test_validate_reads_headers_only(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    def read(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("validate read tensor data")

    monkeypatch.setattr("hubmerge.sources.Checkpoint.read", read)
    result = invoke("validate", ws.recipe)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith(f"{ws.recipe}: OK (tall_masks, 2 models;")
    assert result.stdout.count("local file, 2 tensors") == 3


def test_validate_refuses_a_model_that_does_not_match(ws: Workspace) -> None:
    save_file(tensors(5, shape=(8, 7)), ws.models / "b.safetensors")
    line = error_line(invoke("validate", ws.recipe))
    assert "model 'b'" in line and "layer.weight [8, 7] vs base [8, 6]" in line


def test_validate_refuses_bad_recipes(ws: Workspace) -> None:
    assert "unknown method 'tall_mask'" in error_line(invoke("validate", ws.write(method="tall_mask")))
    missing = str(ws.models / "c.safetensors")
    line = error_line(invoke("validate", ws.write(models=[str(ws.models / "a.safetensors"), missing])))
    assert f"source not found: {missing}" in line


def test_validate_resolves_hub_sources_without_downloading(ws: Workspace, hub: HubServer) -> None:
    shas = {
        f"alice/{name}": hub.seed_repo(
            f"alice/{name}", {"model.safetensors": (ws.models / f"{name}.safetensors").read_bytes()}
        )
        for name in ("base", "a", "b")
    }
    recipe = ws.write(base="alice/base", models=["alice/a", "alice/b"])
    hub.requests.clear()
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    for repo_id, sha in shas.items():
        assert f"{repo_id} @ {sha}" in result.stdout
    assert not [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert "`hubmerge run` checks the shapes" in result.stdout


# -- push and inspect ---------------------------------------------------------------------------------------


def test_push_repo_first_with_a_token_and_the_current_directory(
    ws: Workspace, hub: HubServer, hf_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke("run", ws.recipe, "-q").exit_code == 0
    monkeypatch.chdir(ws.output)
    refused = invoke("push", "alice/merged")
    assert error_line(refused).startswith("error: not logged in: set HF_TOKEN or run `hf auth login`")
    result = invoke("push", "alice/merged", "--token", hf_token, "--commit-message", "first")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"pushed: {hub.url}/alice/merged/commit/")
    assert result.stderr == ""
    assert set(hub.files("alice/merged")) >= {"hubmerge.json", "tau_mtl.safetensors", "README.md"}


def test_inspect_verify(ws: Workspace) -> None:
    assert invoke("run", ws.recipe, "-q").exit_code == 0
    files = json.loads((ws.output / "hubmerge.json").read_text())["files"]
    result = invoke("inspect", ws.output, "--verify")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"verified {len(files)} files"

    mask = ws.output / "masks" / "a.safetensors"
    data = bytearray(mask.read_bytes())
    data[-1] ^= 1
    mask.write_bytes(bytes(data))
    assert str(mask) in error_line(invoke("inspect", ws.output, "--verify"))
    assert invoke("inspect", ws.output).exit_code == 0  # without --verify, no file is hashed


# -- push access, checked before any work -------------------------------------------------------------------


def test_run_with_push_checks_access_before_any_work(
    ws: Workspace, hub: HubServer, hf_token: str, no_work: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = ws.write(push={"repo_id": "bob/merged"})
    for dry_run in ([], ["--dry-run"]):
        line = error_line(invoke("run", recipe, "-q", *dry_run))
        assert line.startswith("error: not logged in: set HF_TOKEN or run `hf auth login`")
    monkeypatch.setenv("HF_TOKEN", hf_token)  # alice's
    line = error_line(invoke("run", recipe, "-q"))
    assert line.startswith("error: cannot push to bob/merged: alice can write only to alice/")
    assert not ws.output.exists()


def test_dry_run_names_the_pushing_user(ws: Workspace, hub: HubServer, hf_token: str, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hf_token)
    recipe = ws.write(push={"repo_id": "alice/merged"})
    result = invoke("run", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "push to       alice/merged as alice (export: none)" in result.stdout.splitlines()
    plan = json.loads(invoke("run", recipe, "--dry-run", "--json").stdout)
    assert plan["push"] == {"repo_id": "alice/merged", "user": "alice", "export": "none"}


def test_push_checks_access_before_writing_the_card(ws: Workspace, hub: HubServer, hf_token: str) -> None:
    assert invoke("run", ws.recipe, "-q").exit_code == 0
    card = (ws.output / "README.md").read_bytes()
    line = error_line(invoke("push", "bob/merged", ws.output, "--token", hf_token))
    assert line.startswith("error: cannot push to bob/merged: alice can write only to alice/")
    assert (ws.output / "README.md").read_bytes() == card
    assert hub.commits["bob/merged"] == 0


# -- convert-mergekit ---------------------------------------------------------------------------------------


def test_convert_mergekit(ws: Workspace) -> None:
    from hubmerge.mergekit import convert_mergekit_file

    config = ws.root / "mergekit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(ws.models / "base.safetensors"),
                "models": [
                    {"model": str(ws.models / f"{n}.safetensors"), "parameters": {"weight": 0.5}}
                    for n in "ab"
                ],
                "dtype": "float32",
            }
        )
    )
    printed = invoke("convert-mergekit", config)
    assert printed.exit_code == 0, printed.output
    assert printed.stdout == convert_mergekit_file(config)
    assert yaml.safe_load(printed.stdout)["parameters"] == {"scaling": 0.5}

    target = ws.root / "converted.yaml"
    written = invoke("convert-mergekit", config, "-o", target)
    assert written.exit_code == 0, written.output
    assert target.read_text() == printed.stdout
    assert written.stdout.startswith(f"wrote {target}")
    target.write_text("mine")
    assert error_line(invoke("convert-mergekit", config, "-o", target)) == (
        f"error: {target} exists (pass --overwrite to replace it)"
    )
    assert target.read_text() == "mine"
    assert invoke("convert-mergekit", config, "-o", target, "--overwrite").exit_code == 0
    assert target.read_text() == printed.stdout
    assert invoke("run", target, "-o", ws.output, "-q").exit_code == 0  # the converted recipe runs


def test_convert_mergekit_refuses_what_it_cannot_convert(ws: Workspace) -> None:
    config = ws.root / "slerp.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": "org/a", "models": []}))
    assert "slerp" in error_line(invoke("convert-mergekit", config))
    assert error_line(invoke("convert-mergekit", ws.root / "absent.yaml")) == (
        f"error: mergekit config not found: {ws.root / 'absent.yaml'}"
    )


# -- found in review ----------------------------------------------------------------------------------------


def test_push_names_a_wrong_path_before_any_request(ws: Workspace, hub: HubServer) -> None:
    hub.requests.clear()
    line = error_line(invoke("push", "alice/x", ws.root / "nothing-here"))
    assert "not a hubmerge output" in line and not hub.requests


def test_convert_mergekit_never_writes_over_its_own_config(tmp_path: Path) -> None:
    config = tmp_path / "mk.yaml"
    config.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a/x"}, {"model": "a/y"}]})
    )
    before = config.read_text()
    assert "is the mergekit config itself" in error_line(
        invoke("convert-mergekit", config, "-o", config, "--overwrite")
    )
    assert config.read_text() == before


def test_a_directory_given_as_the_recipe(ws: Workspace) -> None:
    assert "is a directory" in error_line(invoke("validate", ws.root))
