"""A recipe's problems are reported together, in one line, each naming its field; unknown names get a
suggestion and the valid names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hubmerge.errors import HubmergeError
from hubmerge.recipe import parse_recipe
from tests.hubserver import HubServer
from tests.test_bad_input import Workspace, refused_without_writing

TOP_LEVEL = (
    "version, base, models, method, parameters, dtype, tau_dtype, output, output_format, lora_rank, include, "
    "exclude, evaluation, search, push"
)


def recipe(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"version": 1, "base": "/m/base", "models": ["/m/a", "/m/b"], "method": "ties"}
    data.update(overrides)
    return data


def problem_line(data: dict[str, Any]) -> str:
    with pytest.raises(HubmergeError) as caught:
        parse_recipe(data, "recipe.yaml")
    line = str(caught.value)
    assert "\n" not in line and line.startswith("recipe.yaml: "), line
    return line


def test_every_problem_in_one_line() -> None:
    line = problem_line(recipe(parameters={"densty": 0.5, "scaling": "high"}, metod="ties", dtype="int8"))
    assert line.startswith("recipe.yaml: 4 problems: "), line
    problems = line.removeprefix("recipe.yaml: 4 problems: ").split("; ")
    assert problems[0].startswith("parameters.scaling: Input should be a valid number"), problems
    densty = (
        "parameters.densty: unknown parameter (method ties; did you mean 'density'? valid: density, merge, "
    )
    assert densty + "trim, scaling)" in line
    assert "dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'" in line
    assert f"metod: unknown field (did you mean 'method'? valid: {TOP_LEVEL})" in line


def test_one_problem_keeps_the_plain_form() -> None:
    line = problem_line(recipe(parameters={"densty": 0.5}))
    assert line == (
        "recipe.yaml: parameters.densty: unknown parameter (method ties; did you mean 'density'? "
        "valid: density, merge, trim, scaling)"
    )


UNKNOWN_KEYS = [
    (
        "top-level",
        {"dtyp": "float16"},
        "dtyp: unknown field (did you mean 'dtype'? valid: " + TOP_LEVEL + ")",
    ),
    (
        "model-entry",
        {"models": [{"source": "/m/a", "nmae": "x"}, "/m/b"]},
        "models.0.nmae: unknown field (did you mean 'name'? valid: source, name, kind)",
    ),
    (
        "nested-parameter",
        {"method": "tall_masks", "parameters": {"merge": "ties", "ties": {"denisty": 0.3}}},
        "parameters.ties.denisty: unknown parameter (method tall_masks; did you mean 'density'? "
        "valid: density, merge, trim)",
    ),
    (
        "lambda-alias",
        {"method": "consensus", "parameters": {"lamda": 0.3}},
        "parameters.lamda: unknown parameter (method consensus; did you mean 'lambda'? "
        "valid: merge, lambda, ties, k, scaling)",
    ),
    (
        "push",
        {"push": {"repo_id": "alice/x", "privat": True}},
        "push.privat: unknown field (did you mean 'private'? valid: repo_id, private, revision, create_pr, "
        "commit_message, export)",
    ),
    (
        "evaluation-task",
        {"evaluation": {"head": "zero_shot_text", "tasks": {"a": {"datset": "glue"}, "b": {"dataset": "x"}}}},
        "evaluation.tasks.a.datset: unknown field (did you mean 'dataset'?",
    ),
    (
        "search",
        {"search": {"scalling": [0.5]}},
        "search.scalling: unknown field (did you mean 'scaling'? valid: split, scaling, lambda, k)",
    ),
    ("no-close-name", {"zzz": 1}, "zzz: unknown field (valid: " + TOP_LEVEL + ")"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), [c[1:] for c in UNKNOWN_KEYS], ids=[c[0] for c in UNKNOWN_KEYS]
)
def test_unknown_keys_get_suggestions(overrides: dict[str, Any], expected: str) -> None:
    assert expected in problem_line(recipe(**overrides))


def test_no_suggestion_when_nothing_is_close() -> None:
    assert "did you mean" not in problem_line(recipe(zzz=1))


def test_unknown_method_suggests_and_lists() -> None:
    from hubmerge.methods import METHODS

    assert problem_line(recipe(method="tie")) == (
        "recipe.yaml: method: unknown method 'tie' (did you mean 'ties'? choose one of: "
        f"{', '.join(sorted(METHODS))})"
    )
    assert {"consensus", "tall_masks", "ties", "weight_average"} < set(METHODS)


def test_cross_field_checks_beside_field_errors() -> None:
    """Task names, parameters against the tasks, evaluation and push: all in the same report."""
    line = problem_line(
        recipe(
            models=[
                {"source": "/m/a", "name": "x"},
                {"source": "/m/b", "name": "x"},
                {"source": "/m/c", "name": "a b"},
            ],
            method="weight_average",
            parameters={"scaling": 2},
            push={"repo_id": "alice/x", "export": "subfolders"},
            outptu="out",
        )
    )
    assert line.startswith("recipe.yaml: 5 problems: "), line
    for fragment in (
        "models: task name 'a b' is not usable as a file name",
        "models: duplicate task name 'x': give the models distinct `name`s",
        "parameters.scaling: unknown parameter (method weight_average)",
        "push.export: subfolders applies to compressed artifacts only",
        "outptu: unknown field (did you mean 'output'?",
    ):
        assert fragment in line, (fragment, line)


def test_evaluation_and_search_problems_together() -> None:
    evaluation = {"head": "zero_shot_text", "tasks": {"a": {"dataset": "x"}, "zz": {"dataset": "y"}}}
    line = problem_line(recipe(method="magnitude_masking", evaluation=evaluation, search={"k": [5]}))
    assert line.startswith("recipe.yaml: 4 problems: "), line
    for fragment in (
        "evaluation.tasks: 'zz' is not a task of this recipe (a, b)",
        "evaluation.tasks: task 'b' has no evaluation data",
        "search: magnitude_masking has no parameter to search",
        "search.k: 5 is more than the 2 tasks",
    ):
        assert fragment in line, (fragment, line)


def test_method_defaults_are_checked_against_the_tasks() -> None:
    """Consensus's default k = 2 with one task: refused although `parameters` is not written."""
    assert problem_line(recipe(method="consensus", models=["/m/a"])) == (
        "recipe.yaml: parameters.k: 2 is larger than the number of tasks (1)"
    )


def test_parameters_of_an_unknown_method_are_not_guessed() -> None:
    line = problem_line(recipe(method="nope", parameters={"densty": 1}))
    assert line.startswith("recipe.yaml: method: unknown method 'nope'") and "parameters" not in line


def test_cli_prints_all_problems_and_writes_nothing(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.write(method="ties", parameters={"densty": 0.5, "trim": "layer"}, exclud=["x.*"])
    line = refused_without_writing(ws, "recipe.yaml: 3 problems: ")
    assert "parameters.trim: Input should be 'global' or 'tensor' (method ties)" in line
    assert "parameters.densty: unknown parameter (method ties; did you mean 'density'?" in line
    assert "exclud: unknown field (did you mean 'exclude'?" in line


# -- every source that cannot be located, in one line --------------------------------------------------------


def test_every_missing_source_at_once(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    base, first, last = ws.root / "no_base", ws.root / "no_a", ws.root / "no_c"
    ws.write(base=str(base), models=[str(first), str(ws.models[1]), str(last)])
    line = refused_without_writing(ws, "3 sources not found: ")
    assert line == (
        f"error: 3 sources not found: {base} (no such file or directory), {first} (no such file or directory), "
        f"{last} (no such file or directory)"
    )


def test_relative_paths_name_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace(tmp_path)
    monkeypatch.chdir(ws.root / "models")
    ws.write(models=["./a", "./typo-b", "c"])
    line = refused_without_writing(ws, "source not found: ./typo-b")
    assert line.endswith(
        f"(no such file or directory; relative paths are relative to the current directory, {ws.root / 'models'})"
    )
    ws.write(models=["./typo-a", "./typo-b"])
    line = refused_without_writing(ws)
    assert line == (
        "error: 2 sources not found: ./typo-a (no such file or directory), ./typo-b (no such file or directory); "
        f"relative paths are relative to the current directory, {ws.root / 'models'}"
    )


def test_missing_local_and_hub_sources_together(tmp_path: Path, hub: HubServer) -> None:
    ws = Workspace(tmp_path)
    hub.seed_repo(
        "alice/exists",
        {"config.json": b"{}", "model.safetensors": (ws.models[0] / "model.safetensors").read_bytes()},
    )
    missing = ws.root / "gone"
    ws.write(models=[str(missing), "alice/nope", "alice/exists@v9", str(ws.models[0])])
    line = refused_without_writing(ws)
    assert line == (
        f"error: 3 sources not found: {missing} (no such file or directory), alice/nope (no such local path, and "
        "no such Hub repository), alice/exists@v9 (revision 'v9' not found in alice/exists); a private Hub "
        f"repository needs HF_TOKEN or `hf auth login`; relative paths are relative to the current directory, "
        f"{Path.cwd()}"
    )


def test_sources_that_exist_but_cannot_be_used(tmp_path: Path, hub: HubServer) -> None:
    ws = Workspace(tmp_path)
    hub.seed_repo("alice/no-weights", {"config.json": b"{}"})
    ws.write(models=["alice/no-weights", str(ws.root / "gone"), str(ws.models[0])])
    line = refused_without_writing(ws, "2 sources cannot be used: alice/no-weights (the repository has no ")
    assert line.endswith(f", {ws.root / 'gone'} (no such file or directory)")
