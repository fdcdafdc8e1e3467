"""Typed errors: each kind of failure raises its `HubmergeError` subclass, carrying what is at fault as an
attribute and the library exception it translates as its cause, while the CLI still prints one `error:` line
and exits with code 2 (the cause only with -v)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import huggingface_hub.errors as hf_errors
import pydantic
import pytest
import yaml

from hubmerge import CompressedMerge
from hubmerge.errors import (
    ArtifactFormatError,
    HubAccessError,
    HubmergeError,
    HubSourceError,
    OutputError,
    RecipeError,
    SourceError,
)
from hubmerge.hub import check_push_access, resolve
from hubmerge.output import MANIFEST, check_output_path, read_manifest
from hubmerge.planning import locate_sources
from hubmerge.recipe import PushTarget, load_recipe, parse_recipe
from tests.hubserver import HubServer
from tests.test_cli import Workspace, error_line, invoke


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def artifact(ws: Workspace) -> Path:
    """A TALL-masks artifact of the workspace's two models."""
    result = invoke("run", ws.recipe, "-q")
    assert result.exit_code == 0, result.output
    return ws.output


def test_every_kind_is_a_hubmerge_error() -> None:
    for kind in (RecipeError, SourceError, HubAccessError, HubSourceError, ArtifactFormatError, OutputError):
        assert issubclass(kind, HubmergeError)
    assert issubclass(HubSourceError, SourceError) and issubclass(HubSourceError, HubAccessError)


def test_source_error_is_one_class_wherever_it_is_imported() -> None:
    import hubmerge.hub
    import hubmerge.sources

    assert hubmerge.sources.SourceError is hubmerge.hub.SourceError is SourceError


def test_errors_keep_their_attributes_through_pickle() -> None:
    err = HubSourceError("org/x: gone", "org/x", "gone", repo_id="org/x", missing=True, hints=("log in",))
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is HubSourceError and str(copy) == "org/x: gone"
    assert (copy.source, copy.repo_id, copy.reason, copy.missing, copy.hints) == (
        "org/x",
        "org/x",
        "gone",
        True,
        ("log in",),
    )
    output = pickle.loads(pickle.dumps(OutputError("out: taken", path="out")))
    assert output.path == Path("out")


# -- recipes ------------------------------------------------------------------------------------------------


def test_a_bad_recipe_field(ws: Workspace) -> None:
    recipe = ws.write(method="no_such_method")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert caught.value.field == "method"
    assert str(caught.value).startswith(f"{recipe}: method: ")
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)
    line = error_line(invoke("validate", recipe))
    assert line == f"error: {caught.value}"


def test_an_unknown_recipe_field_and_a_model_entry(ws: Workspace) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe({**yaml.safe_load(ws.recipe.read_text()), "modles": []})
    assert caught.value.field == "modles"
    data = yaml.safe_load(ws.recipe.read_text())
    data["models"][1] = {"source": data["models"][1], "nmae": "b"}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    assert caught.value.field == "models.1.nmae"


def test_malformed_yaml_names_the_file(ws: Workspace) -> None:
    ws.recipe.write_text("version: 1\nbase: [unclosed\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(ws.recipe)
    assert caught.value.path == ws.recipe and caught.value.field is None
    assert isinstance(caught.value.__cause__, yaml.YAMLError)
    assert "malformed YAML" in error_line(invoke("validate", ws.recipe))


# -- sources ------------------------------------------------------------------------------------------------


def test_a_missing_local_source(ws: Workspace) -> None:
    missing = ws.models / "c.safetensors"
    recipe = ws.write(models=[str(ws.models / "a.safetensors"), str(missing)])
    with pytest.raises(SourceError) as caught:
        locate_sources(load_recipe(recipe))
    err = caught.value
    assert not isinstance(err, HubAccessError)
    assert (err.source, err.path, err.missing) == (str(missing), missing, True)
    assert error_line(invoke("validate", recipe)) == f"error: {err}"
    assert error_line(invoke("run", recipe, "-q")) == f"error: {err}"


def test_a_garbled_weights_file(ws: Workspace) -> None:
    (ws.models / "b.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbled")
    with pytest.raises(SourceError) as caught:
        invoke_raising("validate", ws.recipe)
    assert caught.value.path == ws.models / "b.safetensors"
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)
    assert "not a safetensors file" in error_line(invoke("validate", ws.recipe))


def invoke_raising(*args: object) -> None:
    """Run a command with the CLI's error handling bypassed, so its exception reaches the test."""
    from hubmerge import cli

    command = {c.name or c.callback.__name__: c.callback for c in cli.app.registered_commands}[str(args[0])]
    command(*[Path(a) if isinstance(a, Path) else a for a in args[1:]])


# -- the Hub --------------------------------------------------------------------------------------------------


def test_hub_repository_not_found(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(HubSourceError) as caught:
        resolve("alice/absent")
    err = caught.value
    assert isinstance(err, SourceError) and isinstance(err, HubAccessError)
    assert (err.repo_id, err.source, err.missing) == ("alice/absent", "alice/absent", True)
    assert isinstance(err.__cause__, hf_errors.RepositoryNotFoundError)
    assert str(err).startswith("alice/absent: no such local path, and no such Hub repository")

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "base": "alice/absent",
                "models": ["alice/absent-too"],
                "method": "task_arithmetic",
            }
        )
    )
    line = error_line(invoke("validate", recipe))
    assert line.startswith("error: 2 sources not found: alice/absent (no such local path")


def test_hub_revision_not_found(hub: HubServer) -> None:
    hub.seed_repo("alice/there", {"model.safetensors": b"", "config.json": b"{}"})
    with pytest.raises(HubSourceError) as caught:
        resolve("alice/there@no-such-branch")
    assert (caught.value.repo_id, caught.value.source) == ("alice/there", "alice/there@no-such-branch")
    assert isinstance(caught.value.__cause__, hf_errors.RevisionNotFoundError)


def test_hub_rejects_the_token(hub: HubServer, artifact: Path) -> None:
    with pytest.raises(HubAccessError) as caught:
        check_push_access(PushTarget(repo_id="alice/merged"), token="hf_not_a_token")
    err = caught.value
    assert not isinstance(err, SourceError)
    assert err.repo_id == "alice/merged"
    assert isinstance(err.__cause__, hf_errors.HfHubHTTPError)
    assert err.__cause__.response.status_code == 401
    line = error_line(invoke("push", "alice/merged", artifact, "--token", "hf_not_a_token"))
    assert line == f"error: {err}"
    assert "not accept the token" in line


def test_an_unreachable_hub_is_an_access_error_not_a_source_error() -> None:
    with pytest.raises(HubAccessError) as caught:
        resolve("alice/tiny-base", endpoint="http://127.0.0.1:9")
    assert not isinstance(caught.value, SourceError)
    assert caught.value.repo_id == "alice/tiny-base"
    assert caught.value.__cause__ is not None


# -- outputs and artifacts -------------------------------------------------------------------------------------


def test_a_garbled_run_record(artifact: Path) -> None:
    manifest = artifact / MANIFEST
    manifest.write_text("{not json")
    with pytest.raises(ArtifactFormatError) as caught:
        read_manifest(artifact)
    assert caught.value.path == manifest
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)
    for args in (("inspect", artifact), ("materialize", artifact, "-t", "a", "-o", artifact.parent / "t")):
        assert error_line(invoke(*args)) == f"error: {caught.value}"
    with pytest.raises(ArtifactFormatError) as caught:
        CompressedMerge.from_pretrained(artifact)
    assert caught.value.path == manifest


def test_a_foreign_or_missing_run_record(artifact: Path) -> None:
    manifest = artifact / MANIFEST
    manifest.write_text(json.dumps({"format": "someone-else", "result": "merged"}))
    with pytest.raises(ArtifactFormatError, match="not a hubmerge run record") as caught:
        read_manifest(artifact)
    assert caught.value.path == manifest and caught.value.__cause__ is None
    manifest.unlink()
    with pytest.raises(ArtifactFormatError, match=r"not a hubmerge artifact \(no hubmerge\.json\)") as caught:
        CompressedMerge.from_pretrained(artifact)
    assert caught.value.path == manifest
    assert "not a hubmerge output" in error_line(invoke("inspect", artifact))


def test_a_run_record_of_the_wrong_shape(artifact: Path) -> None:
    manifest = artifact / MANIFEST
    record = json.loads(manifest.read_text())
    record["stats"]["agreement_histogram"] = "many"
    manifest.write_text(json.dumps(record))
    with pytest.raises(
        ArtifactFormatError, match=r"damaged run record \(stats\.agreement_histogram: "
    ) as caught:
        read_manifest(artifact)
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)
    assert "damaged run record" in error_line(invoke("inspect", artifact))


def test_a_missing_mask_file(artifact: Path, tmp_path: Path) -> None:
    mask = artifact / "masks" / "a.safetensors"
    mask.unlink()
    with pytest.raises(ArtifactFormatError) as caught:
        CompressedMerge.from_pretrained(artifact).mask("a")
    assert caught.value.path == mask
    line = error_line(invoke("materialize", artifact, "-t", "a", "-o", tmp_path / "task-a"))
    assert line == f"error: {caught.value}"
    assert "missing" in error_line(invoke("inspect", artifact, "--verify"))


def test_an_unwritable_output(ws: Workspace) -> None:
    blocker = ws.root / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError) as caught:
        check_output_path(blocker, overwrite=True)
    assert caught.value.path == blocker
    recipe = ws.write(output=str(blocker))
    assert error_line(invoke("run", recipe, "-q")) == f"error: {caught.value}"

    inside = ws.write(output=str(blocker / "out"))
    with pytest.raises(OutputError) as caught:
        check_output_path(blocker / "out", overwrite=False)
    assert caught.value.path == blocker / "out"
    assert error_line(invoke("run", inside, "-q")) == f"error: {caught.value}"


def test_an_output_holding_other_files(ws: Workspace) -> None:
    ws.output.mkdir()
    (ws.output / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and holds no hubmerge output") as caught:
        check_output_path(ws.output, overwrite=True)
    assert caught.value.path == ws.output
    assert error_line(invoke("run", ws.recipe, "-q", "--overwrite")) == f"error: {caught.value}"


# -- the CLI shows the cause only when asked ------------------------------------------------------------------


def test_the_cause_of_a_translated_error_is_shown_with_verbose_only(artifact: Path) -> None:
    (artifact / MANIFEST).write_text("{not json")
    quiet = invoke("inspect", artifact)
    assert quiet.exit_code == 2 and len(quiet.stderr.strip().splitlines()) == 1
    assert "Traceback" not in quiet.stderr

    verbose = invoke("inspect", artifact, "-v")
    assert verbose.exit_code == 2
    lines = verbose.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert any(line.startswith("json.decoder.JSONDecodeError") for line in lines)
    assert any(line.startswith("hubmerge.errors.ArtifactFormatError") for line in lines)
    assert lines[-1] == quiet.stderr.strip()
