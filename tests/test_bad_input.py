"""Bad input is refused before anything is written: one `error:` line naming the culprit, exit code 2.

Every case goes through the CLI (`hubmerge run`, `materialize`, `inspect`) in-process, and checks that the
directory holding the recipe, the models and the output is byte for byte what it was before the call: no
output directory, no hidden `.out.partial-*` sibling, nothing touched.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from hubmerge.cli import app

runner = CliRunner()
TASKS = ["a", "b", "c"]
# set by the payloads of the unsafe checkpoints if the unpickler ever calls into this module
SIDE_EFFECTS: list[str] = []


# -- helpers ------------------------------------------------------------------------------------------------


def base_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 4, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "b.weight": torch.randn(3, 4, generator=g),
        "b.steps": torch.arange(3, dtype=torch.int64),
    }


def finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in base.items()
    }


def save_model(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory


class Workspace:
    """A base, three fine-tunes and a recipe writer, all under one tmp_path."""

    def __init__(self, root: Path):
        self.root = root
        self.base_tensors = base_tensors()
        self.base = save_model(root / "models" / "base", self.base_tensors)
        self.models = [
            save_model(root / "models" / name, finetune(self.base_tensors, i)) for i, name in enumerate(TASKS)
        ]
        self.recipe_path = root / "recipe.yaml"
        self.output = root / "out"

    def recipe(self, **overrides: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": 1,
            "base": str(self.base),
            "models": [str(m) for m in self.models],
            "method": "tall_masks",
            "parameters": {},
        }
        data.update(overrides)
        return data

    def write(self, data: dict[str, Any] | None = None, **overrides: Any) -> Path:
        self.recipe_path.write_text(yaml.safe_dump(data if data is not None else self.recipe(**overrides)))
        return self.recipe_path

    def run(self, *args: Any, recipe: Path | None = None):
        return invoke("run", recipe or self.recipe_path, "--output", self.output, "-q", *args)


def invoke(*args: Any):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for directories)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def assert_refused(result, *fragments: str) -> str:
    """Exit code 2 and exactly one stderr line `error: ...` containing every fragment; returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert "Traceback" not in result.output
    return line


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def refused_without_writing(
    ws: Workspace, *fragments: str, args: tuple = (), recipe: Path | None = None
) -> str:
    existed = ws.output.exists()
    before = snapshot(ws.root)
    line = assert_refused(ws.run(*args, recipe=recipe), *fragments)
    assert snapshot(ws.root) == before
    assert ws.output.exists() == existed
    assert not list(ws.root.glob(".out.*"))
    return line


# -- recipe and parameter errors ----------------------------------------------------------------------------

RECIPE_CASES = [
    ("unknown-method", {"method": "tall_mask"}, ["unknown method 'tall_mask'", "tall_masks", "recipe.yaml"]),
    (
        "unknown-parameter",
        {"method": "ties", "parameters": {"densty": 0.5}},
        ["parameters.densty", "unknown parameter", "ties"],
    ),
    (
        "wrong-type",
        {"method": "ties", "parameters": {"density": "high"}},
        ["parameters.density", "valid number"],
    ),
    (
        "density-zero",
        {"method": "ties", "parameters": {"density": 0}},
        ["parameters.density", "greater than 0"],
    ),
    (
        "density-above-one",
        {"method": "magnitude_masking", "parameters": {"density": 1.5}},
        ["parameters.density", "less than or equal to 1"],
    ),
    (
        "negative-lambda",
        {"method": "tall_masks", "parameters": {"lambda": -0.1}},
        ["parameters.lambda", "greater than or equal to 0"],
    ),
    (
        "k-above-T",
        {"method": "consensus", "parameters": {"k": 4}},
        ["parameters.k", "4", "number of tasks (3)"],
    ),
    (
        "lambda-map-unknown-task",
        {"parameters": {"lambda": {"a": 0.4, "b": 0.4, "c": 0.4, "zz": 0.5}}},
        ["parameters.lambda", "unknown task 'zz'", "a, b, c"],
    ),
    (
        "lambda-map-missing-task",
        {"parameters": {"lambda": {"a": 0.4, "b": 0.4}}},
        ["parameters.lambda", "no value for task 'c'"],
    ),
    (
        "ties-block-without-ties",
        {"parameters": {"merge": "task_arithmetic", "ties": {"density": 0.5}}},
        ["parameters.ties", "merge: ties"],
    ),
    ("unknown-top-level-field", {"dtyp": "bfloat16"}, ["recipe.yaml", "dtyp", "unknown field"]),
    ("bad-dtype", {"dtype": "int8"}, ["recipe.yaml", "dtype"]),
    ("bad-version", {"version": 2}, ["recipe.yaml", "version"]),
    ("no-models", {"models": []}, ["recipe.yaml", "models"]),
]


@pytest.mark.parametrize(
    ("overrides", "fragments"), [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES]
)
def test_recipe_errors(ws: Workspace, overrides: dict[str, Any], fragments: list[str]) -> None:
    ws.write(**overrides)
    refused_without_writing(ws, *fragments)


def test_duplicate_task_names(ws: Workspace) -> None:
    ws.write(models=[{"source": str(ws.models[0]), "name": "x"}, {"source": str(ws.models[1]), "name": "x"}])
    refused_without_writing(ws, "duplicate task name 'x'")


def test_duplicate_default_task_names(ws: Workspace) -> None:
    """Two sources whose directory names coincide: the default names clash and the message says so."""
    other = save_model(ws.root / "elsewhere" / "a", finetune(ws.base_tensors, 7))
    ws.write(models=[str(ws.models[0]), str(other)])
    refused_without_writing(ws, "duplicate task name 'a'", "name")


def test_missing_model(ws: Workspace) -> None:
    missing = ws.root / "models" / "nope.safetensors"
    ws.write(models=[str(ws.models[0]), str(missing)])
    refused_without_writing(ws, "not found", str(missing))


def test_missing_base_dir(ws: Workspace) -> None:
    missing = ws.root / "models" / "no_base"
    ws.write(base=str(missing))
    refused_without_writing(ws, "not found", str(missing))


def test_missing_recipe(ws: Workspace) -> None:
    refused_without_writing(ws, "recipe file not found", "absent.yaml", recipe=ws.root / "absent.yaml")


def test_malformed_yaml(ws: Workspace) -> None:
    ws.recipe_path.write_text(
        f"version: 1\nbase: {ws.base}\nmodels:\n  - {ws.models[0]}\nmethod: ties: oops\nparameters: {{}}\n"
    )
    line = refused_without_writing(ws, "recipe.yaml", "malformed YAML")
    assert f"{ws.recipe_path}:5:" in line  # file:line:column of the offending line


def test_recipe_not_a_mapping(ws: Workspace) -> None:
    ws.recipe_path.write_text("- just\n- a list\n")
    refused_without_writing(ws, "recipe.yaml", "mapping")


# -- checkpoints that do not fit ----------------------------------------------------------------------------


def test_model_with_missing_and_extra_keys(ws: Workspace) -> None:
    tensors = finetune(ws.base_tensors, 9)
    del tensors["b.weight"]
    tensors["c.extra"] = torch.zeros(2)
    save_model(ws.root / "models" / "odd", tensors)
    ws.write(models=[str(ws.models[0]), str(ws.root / "models" / "odd")])
    refused_without_writing(ws, "'odd'", "missing keys b.weight", "extra keys c.extra")


def test_model_with_other_shape(ws: Workspace) -> None:
    tensors = finetune(ws.base_tensors, 9)
    tensors["a.weight"] = torch.zeros(4, 5)
    save_model(ws.root / "models" / "wide", tensors)
    ws.write(models=[str(ws.models[0]), str(ws.root / "models" / "wide")])
    refused_without_writing(ws, "'wide'", "a.weight", "[4, 5]", "[4, 4]")


def test_model_with_int_where_base_has_float(ws: Workspace) -> None:
    tensors = finetune(ws.base_tensors, 9)
    tensors["a.bias"] = torch.zeros(4, dtype=torch.int32)
    save_model(ws.root / "models" / "ints", tensors)
    ws.write(models=[str(ws.models[0]), str(ws.root / "models" / "ints")])
    refused_without_writing(ws, "'ints'", "a.bias")


def test_base_without_float_tensors(ws: Workspace) -> None:
    ints = {
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flags": torch.tensor([1, 0], dtype=torch.int8),
    }
    base = save_model(ws.root / "models" / "int_base", ints)
    ft = save_model(ws.root / "models" / "int_ft", {k: v + 1 for k, v in ints.items()})
    ws.write(base=str(base), models=[str(ft)], method="task_arithmetic")
    refused_without_writing(ws, str(base), "no floating-point weights")


def test_not_a_weights_file(ws: Workspace) -> None:
    junk = ws.root / "models" / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 not safetensors")
    ws.write(models=[str(ws.models[0]), str(junk)])
    refused_without_writing(ws, "junk.safetensors", "safetensors")


def test_directory_without_weights(ws: Workspace) -> None:
    empty = ws.root / "models" / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    ws.write(models=[str(ws.models[0]), str(empty)])
    refused_without_writing(ws, str(empty), "no model weights found")


def _record_side_effect(tag: str) -> dict[str, Any]:
    SIDE_EFFECTS.append(tag)
    return {}


class Payload:
    """Unpickling it calls `_record_side_effect`: the code an unsafe .bin could run."""

    def __reduce__(self):
        return (_record_side_effect, ("reduce",))


class StateDict(collections.OrderedDict):
    """A state dict subclass whose __setstate__ has a side effect."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        SIDE_EFFECTS.append("setstate")
        self.__dict__.update(state)


def _unsafe_payload(tensors: dict[str, torch.Tensor], kind: str) -> Any:
    if kind == "custom-class":
        return {**tensors, "extra": Payload()}
    sd = StateDict(tensors)
    sd.note = "a custom attribute, so that unpickling calls __setstate__"
    return sd


@pytest.mark.parametrize("kind", ["custom-class", "ordered-dict-subclass"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_unsafe_bin_is_refused_without_running_code(ws: Workspace, kind: str, legacy: bool) -> None:
    SIDE_EFFECTS.clear()
    tensors = finetune(ws.base_tensors, 5)
    path = ws.root / "models" / "evil.bin"
    torch.save(_unsafe_payload(tensors, kind), path, _use_new_zipfile_serialization=not legacy)
    # the file really would run the payload under a full unpickler
    torch.load(path, weights_only=False)
    assert SIDE_EFFECTS, "the test payload should have a side effect under unsafe unpickling"
    SIDE_EFFECTS.clear()
    ws.write(models=[str(ws.models[0]), str(path)])
    line = refused_without_writing(ws, "evil.bin", "unpickling")
    assert "refusing" in line
    assert SIDE_EFFECTS == []


@pytest.mark.parametrize(
    ("kind", "culprit"), [("custom-class", "_record_side_effect"), ("ordered-dict-subclass", "StateDict")]
)
def test_unsafe_bin_message_names_the_global(ws: Workspace, kind: str, culprit: str) -> None:
    path = ws.root / "models" / "evil.bin"
    torch.save(_unsafe_payload(finetune(ws.base_tensors, 5), kind), path)
    ws.write(models=[str(ws.models[0]), str(path)])
    line = refused_without_writing(ws, "evil.bin", "unpickling")
    assert "\x1b" not in line
    assert culprit in line


def test_safe_bin_is_accepted(ws: Workspace) -> None:
    """Control for the test above: a plain state dict saved with torch.save loads and merges."""
    path = ws.root / "models" / "plain.bin"
    torch.save(finetune(ws.base_tensors, 5), path)
    ws.write(models=[str(ws.models[0]), str(path)], method="task_arithmetic")
    result = ws.run()
    assert result.exit_code == 0, result.output
    assert (ws.output / "model.safetensors").is_file()


# -- output location ----------------------------------------------------------------------------------------


def test_output_is_a_file(ws: Workspace) -> None:
    ws.write()
    ws.output.write_text("precious")
    refused_without_writing(ws, str(ws.output), "is a file")
    assert ws.output.read_text() == "precious"


def test_output_dir_not_empty_without_overwrite(ws: Workspace) -> None:
    ws.write()
    ws.output.mkdir()
    (ws.output / "keep.txt").write_text("precious")
    before = snapshot(ws.root)
    assert_refused(ws.run(), str(ws.output), "not empty", "--overwrite")
    assert snapshot(ws.root) == before
    assert not list(ws.root.glob(".out.*"))


def test_output_dir_replaced_with_overwrite(ws: Workspace) -> None:
    """--overwrite replaces a previous hubmerge output whole (tests/test_output_safety.py: nothing else)."""
    ws.write(method="task_arithmetic")
    assert ws.run().exit_code == 0
    ws.write()
    result = ws.run("--overwrite")
    assert result.exit_code == 0, result.output
    assert not (ws.output / "model.safetensors").exists() and (ws.output / "tau_mtl.safetensors").is_file()
    assert (ws.output / "hubmerge.json").is_file()
    assert not list(ws.root.glob(".out.*"))


def test_empty_output_dir_is_fine(ws: Workspace) -> None:
    ws.write()
    ws.output.mkdir()
    result = ws.run()
    assert result.exit_code == 0, result.output
    assert (ws.output / "hubmerge.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_gpu(ws: Workspace) -> None:
    ws.write()
    refused_without_writing(ws, "--device cuda", "CUDA", args=("--device", "cuda"))


def test_unknown_device(ws: Workspace) -> None:
    ws.write()
    refused_without_writing(ws, "--device tpu", args=("--device", "tpu"))


def test_no_output_anywhere(ws: Workspace) -> None:
    ws.write()
    before = snapshot(ws.root)
    assert_refused(invoke("run", ws.recipe_path, "-q"), "no output directory", "--output")
    assert snapshot(ws.root) == before


@pytest.mark.parametrize("name", ["[bold]nope", "nope[/bold]"])
def test_error_text_is_not_rich_markup(ws: Workspace, name: str) -> None:
    """A culprit containing square brackets is printed as is (not read as console markup)."""
    missing = f"{ws.root}/models/{name}"
    ws.write(models=[str(ws.models[0]), {"source": missing, "name": "nope"}])
    refused_without_writing(ws, "not found", missing)


# -- dry run, materialize, inspect --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "passes"),
    [("tall_masks", 1), ("task_arithmetic", 1), ("ties", 4), ("magnitude_masking", 3)],
)
def test_dry_run_prints_plan_and_writes_nothing(ws: Workspace, method: str, passes: int) -> None:
    ws.write(method=method)
    before = snapshot(ws.root)
    result = ws.run("--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    d = sum(v.numel() for v in ws.base_tensors.values() if v.is_floating_point())
    assert "dry run" in out
    assert f"method        {method}" in out
    assert f"passes        {passes}:" in out
    assert f"d (counted)   {d:,} entries" in out
    assert snapshot(ws.root) == before
    assert not ws.output.exists()


def test_dry_run_still_validates(ws: Workspace) -> None:
    ws.write(models=[str(ws.models[0]), str(ws.root / "nowhere")])
    refused_without_writing(ws, "not found", "nowhere", args=("--dry-run",))


def test_materialize_unknown_task_lists_tasks(ws: Workspace) -> None:
    ws.write()
    assert ws.run().exit_code == 0
    target = ws.root / "task_model"
    before = snapshot(ws.root)
    result = invoke("materialize", ws.output, "--task", "zz", "--output", target)
    assert_refused(result, "unknown task 'zz'", "a, b, c")
    assert snapshot(ws.root) == before
    assert not target.exists()


def test_materialize_from_a_merged_model(ws: Workspace) -> None:
    ws.write(method="task_arithmetic")
    assert ws.run().exit_code == 0
    target = ws.root / "task_model"
    assert_refused(
        invoke("materialize", ws.output, "--task", "a", "--output", target),
        "is a merged model (task_arithmetic), not a compressed artifact",
        "AutoModel.from_pretrained",
    )
    assert not target.exists()


def test_inspect_not_an_output(ws: Workspace) -> None:
    assert_refused(invoke("inspect", ws.base), str(ws.base), "not a hubmerge output")
    assert_refused(invoke("inspect", ws.root / "absent"), "absent", "not a hubmerge output")
