"""A user's data is never lost or silently corrupted: issue 13's defects, each reproduced and refused.

- `--overwrite` replaces only a previous hubmerge output: never the current directory, an ancestor, an input,
  a folder holding other files, or the Hub cache (checked in `--dry-run` too);
- one run at a time owns an output path, and the final rename never replaces what appeared meanwhile;
- every file of an output is hashed into hubmerge.json and checked before it is rebuilt, scored or pushed;
- NaN/Inf input weights stop a run unless allowed, and are then recorded;
- staging directories of killed runs are removed by the next run to that output.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge import CompressedMerge, HubmergeError, parse_recipe, run_recipe
from hubmerge.integrity import verify_output
from hubmerge.recipe import PushTarget
from hubmerge.run import publish_output
from tests.processes import hubmerge_cli, long_ties_recipe, start_when_staging
from tests.test_bad_input import Workspace, assert_refused, invoke, snapshot
from tests.test_hub import checkpoints, seeded, write_recipe  # noqa: F401 - the Hub fixtures


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def dead_pid() -> int:
    """The pid of a process that has ended (and, on a quiet test machine, not yet been reused)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def refused_untouched(ws: Workspace, result, *fragments: str) -> None:
    before = snapshot(ws.root)
    assert_refused(result, *fragments)
    assert snapshot(ws.root) == before


# -- 1. --overwrite deletes only what hubmerge wrote -----------------------------------------------------------


def test_output_is_the_current_directory(ws: Workspace, monkeypatch) -> None:
    ws.write()
    (ws.root / "notes.txt").write_text("mine")
    monkeypatch.chdir(ws.root)
    before = snapshot(ws.root)
    for args in ((), ("--dry-run",)):
        assert_refused(
            invoke("run", ws.recipe_path, "-o", ".", "--overwrite", "-q", *args), "the current directory"
        )
    assert snapshot(ws.root) == before


def test_output_is_an_ancestor_of_the_current_directory(ws: Workspace, monkeypatch) -> None:
    ws.write()
    (ws.root / "work").mkdir()
    monkeypatch.chdir(ws.root / "work")
    before = snapshot(ws.root)
    assert_refused(
        invoke("run", ws.recipe_path, "-o", "..", "--overwrite", "-q"), "ancestor of the current directory"
    )
    assert snapshot(ws.root) == before


def test_overwrite_keeps_a_folder_that_is_not_a_hubmerge_output(ws: Workspace) -> None:
    ws.write()
    sandbox = ws.root / "sandbox"
    (sandbox / "precious").mkdir(parents=True)
    (sandbox / "precious" / "thesis.txt").write_text("four years")
    before = snapshot(ws.root)
    for args in ((), ("--dry-run",)):
        assert_refused(
            invoke("run", ws.recipe_path, "-o", sandbox, "--overwrite", "-q", *args),
            str(sandbox),
            "holds no hubmerge output",
        )
    assert snapshot(ws.root) == before
    assert (sandbox / "precious" / "thesis.txt").read_text() == "four years"


@pytest.mark.parametrize("where", ["a fine-tune", "the parent of the inputs", "inside the base"])
def test_output_touching_an_input_is_refused(ws: Workspace, where: str) -> None:
    target = {
        "a fine-tune": ws.models[0],
        "the parent of the inputs": ws.base.parent,
        "inside the base": ws.base / "merged",
    }[where]
    ws.write(output=str(target))
    fragment = {
        "a fine-tune": "is model 'a'",
        "the parent of the inputs": "contains",
        "inside the base": "lies inside",
    }
    before = snapshot(ws.root)
    for args in (("--overwrite",), ("--overwrite", "--dry-run")):
        assert_refused(invoke("run", ws.recipe_path, "-q", *args), fragment[where])
    assert snapshot(ws.root) == before


def test_output_inside_the_hub_cache_is_refused(ws: Workspace) -> None:
    from huggingface_hub import constants

    ws.write(output=str(Path(constants.HF_HUB_CACHE) / "merged"))
    assert_refused(invoke("run", ws.recipe_path, "-q"), "the Hugging Face cache")


def test_materialize_does_not_overwrite_the_artifact_or_a_foreign_folder(ws: Workspace) -> None:
    ws.write()
    assert ws.run().exit_code == 0
    refused_untouched(
        ws, invoke("materialize", ws.output, "-t", "a", "-o", ws.output, "--overwrite"), "is the artifact"
    )
    refused_untouched(
        ws, invoke("materialize", ws.output, "-t", "a", "-o", ws.base, "--overwrite"), "is the base"
    )
    (ws.root / "mine").mkdir()
    (ws.root / "mine" / "notes.txt").write_text("mine")
    refused_untouched(
        ws,
        invoke("materialize", ws.output, "-t", "a", "-o", ws.root / "mine", "--overwrite"),
        "holds no hubmerge output",
    )
    # a rebuilt task model is a hubmerge output: --overwrite may replace it
    task = ws.root / "task-a"
    assert invoke("materialize", ws.output, "-t", "a", "-o", task).exit_code == 0
    assert invoke("materialize", ws.output, "-t", "a", "-o", task, "--overwrite").exit_code == 0
    assert verify_output(task)


def test_dry_run_says_whether_the_output_exists_and_will_be_replaced(ws: Workspace) -> None:
    ws.write()
    result = ws.run("--dry-run")
    assert result.exit_code == 0, result.output
    assert f"{ws.output} (new)" in " ".join(result.output.split())
    assert ws.run().exit_code == 0
    result = ws.run("--dry-run", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "exists: a hubmerge output, replaced when the run completes" in " ".join(result.output.split())


# -- 2. one run per output -------------------------------------------------------------------------------------


# The first run sleeps before its passes (its staging directory exists by then), so the second surely overlaps.
SLOW_RUN = (
    "import sys, time; from hubmerge.engine import Engine; slowed = Engine.collect_statistics; "
    "Engine.collect_statistics = lambda self: (time.sleep(float(sys.argv[1])), slowed(self))[1]; "
    "from hubmerge.cli import app; app(sys.argv[2:], prog_name='hubmerge')"
)


def test_a_second_run_to_the_same_output_fails_naming_the_first(ws: Workspace) -> None:
    ws.write()
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, "6", "run", str(ws.recipe_path), "-o", str(ws.output), "-q"]
    )
    deadline = time.monotonic() + 60
    while not list(ws.root.glob(".out.partial-*")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the first run ended before the second started"
    for args in ((), ("--overwrite",)):
        before = snapshot(ws.root)
        assert_refused(ws.run(*args), "being written by another hubmerge run", f"pid {first.pid}")
        assert snapshot(ws.root) == before
    assert first.wait(timeout=120) == 0
    assert verify_output(ws.output)
    assert not list(ws.root.glob(".out.*")), "the lock file or staging outlived the run"
    assert ws.run("--overwrite").exit_code == 0


def test_an_output_that_appears_during_the_run_is_not_replaced(ws: Workspace, monkeypatch) -> None:
    from hubmerge.engine import Engine

    original = Engine.collect_statistics

    def someone_else_writes(self) -> None:
        ws.output.mkdir()
        (ws.output / "theirs.txt").write_text("not yours")
        original(self)

    ws.write()
    monkeypatch.setattr(Engine, "collect_statistics", someone_else_writes)
    line = assert_refused(
        ws.run("--overwrite"), "appeared while this run was writing", "nothing was replaced"
    )
    assert [p.name for p in ws.output.iterdir()] == ["theirs.txt"]
    kept = [p for p in ws.root.iterdir() if p.name.startswith("out.hubmerge-")]
    assert len(kept) == 1 and str(kept[0]) in line
    assert verify_output(kept[0])


# -- 4. integrity ----------------------------------------------------------------------------------------------


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of the data section of a safetensors file."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = header + (len(data) - header) // 2 - count // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["masks/a.safetensors", "tau_mtl.safetensors"])
def test_a_damaged_artifact_file_is_named_not_rebuilt(ws: Workspace, damaged: str) -> None:
    ws.write()
    assert ws.run().exit_code == 0
    record = json.loads((ws.output / "hubmerge.json").read_text())
    assert set(record["files"]) >= {"tau_mtl.safetensors", "masks/a.safetensors", "hubmerge_recipe.yaml"}
    assert verify_output(ws.output)
    flip_bytes(ws.output / damaged)
    target = ws.root / "task"
    refused_untouched(ws, invoke("materialize", ws.output, "-t", "a", "-o", target), damaged, "SHA-256")
    with pytest.raises(HubmergeError, match=damaged):
        CompressedMerge.from_pretrained(ws.output).materialize("a")
    with pytest.raises(HubmergeError, match=damaged):
        verify_output(ws.output)
    with pytest.raises(HubmergeError, match=damaged):  # before any request: no Hub is needed here
        publish_output(ws.output, PushTarget(repo_id="alice/never"), endpoint="http://127.0.0.1:9")


def test_a_damaged_merged_model_is_named(ws: Workspace) -> None:
    ws.write(method="task_arithmetic")
    assert ws.run().exit_code == 0
    assert "model.safetensors" in verify_output(ws.output)
    flip_bytes(ws.output / "model.safetensors")
    with pytest.raises(HubmergeError, match=r"model\.safetensors: content differs"):
        verify_output(ws.output)


def test_missing_and_garbled_artifact_files_are_one_line_errors(ws: Workspace) -> None:
    ws.write()
    assert ws.run().exit_code == 0
    target = ws.root / "task"
    (ws.output / "masks" / "b.safetensors").unlink()
    assert_refused(
        invoke("materialize", ws.output, "-t", "b", "-o", target), "masks/b.safetensors", "missing"
    )
    (ws.output / "tau_mtl.safetensors").unlink()
    assert_refused(
        invoke("materialize", ws.output, "-t", "a", "-o", target), "tau_mtl.safetensors", "missing"
    )
    (ws.output / "hubmerge.json").write_text("{not json")
    assert_refused(invoke("materialize", ws.output, "-t", "a", "-o", target), "hubmerge.json", "unreadable")
    (ws.output / "hubmerge.json").unlink()
    assert_refused(invoke("materialize", ws.output, "-t", "a", "-o", target), "no hubmerge.json")
    assert not target.exists()


# -- 5. non-finite weights -------------------------------------------------------------------------------------


def with_nonfinite(ws: Workspace) -> None:
    tensors = load_file(ws.models[1] / "model.safetensors")
    tensors["a.weight"][1, 2] = float("nan")
    tensors["a.weight"][3, 0] = float("-inf")
    save_file(tensors, ws.models[1] / "model.safetensors")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tall_masks"])
def test_nonfinite_weights_stop_the_run(ws: Workspace, method: str) -> None:
    with_nonfinite(ws)
    ws.write(method=method)
    before = snapshot(ws.root)
    assert_refused(ws.run(), "model 'b'", "'a.weight'", "2 NaN/Inf entries", "--allow-nonfinite")
    assert snapshot(ws.root) == before


@pytest.mark.parametrize("fused_kernels", [True, False])
def test_allowed_nonfinite_weights_are_recorded(ws: Workspace, fused_kernels: bool) -> None:
    with_nonfinite(ws)
    recipe = parse_recipe(ws.recipe(method="task_arithmetic"))
    result = run_recipe(recipe, output=ws.output, allow_nonfinite=True, fused_kernels=fused_kernels)
    assert result.record["nonfinite"] == [
        {"model": "b", "source": str(ws.models[1]), "tensor": "a.weight", "count": 2}
    ]
    assert json.loads((ws.output / "hubmerge.json").read_text())["nonfinite"] == result.record["nonfinite"]
    card = (ws.output / "README.md").read_text()
    assert "## Non-finite input weights" in card and "| b | `a.weight` | 2 |" in card


def test_nonfinite_in_the_base_is_named_as_the_base(ws: Workspace) -> None:
    tensors = load_file(ws.base / "model.safetensors")
    tensors["b.weight"][0, 0] = float("inf")
    save_file(tensors, ws.base / "model.safetensors")
    ws.write(method="task_arithmetic")
    assert_refused(ws.run(), "base (", "'b.weight'", "1 NaN/Inf")


# -- 6. staging left by killed runs ----------------------------------------------------------------------------


def test_stale_staging_of_a_dead_run_is_removed_and_a_live_one_kept(ws: Workspace, caplog) -> None:
    ws.write()
    stale = ws.root / f".out.partial-{dead_pid()}-abcd1234"
    stale.mkdir()
    (stale / "tau_mtl.safetensors").write_bytes(os.urandom(1 << 20))
    live = ws.root / f".out.partial-{os.getppid()}-efgh5678"  # the test runner's parent is alive
    live.mkdir()
    other_output = ws.root / f".other.partial-{dead_pid()}-ijkl9012"
    other_output.mkdir()
    with caplog.at_level(logging.WARNING, logger="hubmerge"):
        assert ws.run().exit_code == 0
    assert not stale.exists() and live.is_dir() and other_output.is_dir()
    assert "removed 1 staging directory of" in caplog.text and "(1.0 MB)" in caplog.text


def test_a_killed_run_leaves_staging_that_the_next_run_removes(tmp_path: Path) -> None:
    recipe = long_ties_recipe(tmp_path, rows=2048)
    hubmerge = Path(sys.executable).with_name("hubmerge")
    command = [str(hubmerge), "run", str(recipe), "-o", str(tmp_path / "out"), "-q"]
    process = start_when_staging(command, tmp_path)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert list(tmp_path.glob(".out.partial-*")), "kill -9 left no staging directory to clean"

    again = subprocess.run(command, capture_output=True, text=True)

    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob(".out.*"))
    assert "removed 1 staging directory of" in again.stderr
    assert verify_output(tmp_path / "out")


def test_files_hashed_while_written_in_any_order(tmp_path: Path) -> None:
    import hashlib

    from hubmerge.writer import SafetensorsFile, Slot

    slots = [
        Slot("a", torch.float32, (3, 5)),
        Slot("b", torch.bfloat16, (0,)),
        Slot("c", torch.float16, (7,)),
    ]
    values = {"a": torch.randn(3, 5), "b": torch.zeros(0, dtype=torch.bfloat16), "c": torch.randn(7).half()}

    def written(order: list[tuple[str, int, int]]) -> SafetensorsFile:
        file = SafetensorsFile(tmp_path / "x.safetensors", slots, {"k": "v"})
        file.create()
        for key, start, stop in order:
            file.write(key, values[key].reshape(-1)[start:stop], start)
        file.close()
        return file

    actual = lambda: hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()  # noqa: E731
    in_order = written([("a", 0, 15), ("b", 0, 0), ("c", 0, 7)])
    assert in_order.sha256 == actual()
    shuffled = written([("c", 3, 7), ("a", 10, 15), ("c", 0, 3), ("a", 0, 10)])
    assert shuffled.sha256 == actual()
    assert load_file(tmp_path / "x.safetensors")["a"].equal(values["a"])
    assert written([("a", 0, 15), ("c", 0, 7), ("a", 0, 15)]).sha256 is None  # written twice: hash after
    assert written([("a", 0, 15)]).sha256 is None  # another process wrote the rest


@pytest.mark.parametrize("method", ["task_arithmetic", "tall_masks"])
def test_weights_are_not_read_back_to_be_hashed(ws: Workspace, method: str, monkeypatch) -> None:
    import hubmerge.integrity

    hashed_after: list[str] = []
    original = hubmerge.integrity.file_sha256

    def spy(path: Path) -> str:
        if ws.base not in (path, *path.parents):  # a compressed artifact records its local base's hash
            hashed_after.append(path.name)
        return original(path)

    monkeypatch.setattr(hubmerge.integrity, "file_sha256", spy)
    run_recipe(parse_recipe(ws.recipe(method=method)), output=ws.output)
    assert not [name for name in hashed_after if name.endswith(".safetensors")], hashed_after
    assert "hubmerge_recipe.yaml" in hashed_after
    monkeypatch.undo()
    assert verify_output(ws.output)


# -- write failures: one line, nothing left behind -------------------------------------------------------------


def test_a_full_disk_is_one_line_and_leaves_nothing(ws: Workspace, monkeypatch) -> None:
    import errno

    from hubmerge.writer import SafetensorsFile

    def full(self, *args) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    ws.write()
    monkeypatch.setattr(SafetensorsFile, "write", full)
    before = snapshot(ws.root)
    assert_refused(ws.run(), "No space left on device")
    assert snapshot(ws.root) == before


@pytest.mark.parametrize("problem", ["read-only", "permission"])
def test_an_unwritable_output_parent_is_refused_before_reading(
    ws: Workspace, monkeypatch, problem: str
) -> None:
    import hubmerge.output
    from hubmerge.sources import Checkpoint

    def never_read(*args, **kwargs):
        raise AssertionError("a tensor was read before the output was checked")

    ws.write()
    if problem == "read-only":
        real = os.statvfs
        monkeypatch.setattr(
            hubmerge.output.os,
            "statvfs",
            lambda path: os.statvfs_result((*real(path)[:8], os.ST_RDONLY, real(path)[9])),
        )
        fragment = "read-only file system"
    else:
        access = os.access
        monkeypatch.setattr(
            hubmerge.output.os, "access", lambda path, mode: Path(path) != ws.root and access(path, mode)
        )
        fragment = "no permission to write in"
    monkeypatch.setattr(Checkpoint, "read", never_read)
    before = snapshot(ws.root)
    assert_refused(ws.run(), str(ws.output), fragment)
    assert_refused(ws.run("--dry-run"), fragment)
    assert snapshot(ws.root) == before


# -- portable outputs ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("method", ["task_arithmetic", "tall_masks"])
def test_outputs_of_hub_sources_name_no_local_path(tmp_path: Path, method: str) -> None:
    from huggingface_hub import constants

    recipe = write_recipe(tmp_path, method)
    result = invoke("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    for name in ("hubmerge.json", "README.md", "hubmerge_recipe.yaml"):
        text = (tmp_path / "out" / name).read_text()
        for local in (str(tmp_path), constants.HF_HUB_CACHE, os.getcwd()):
            assert local not in text, (name, local)


def test_pushing_an_artifact_of_a_local_base_warns(ws: Workspace, caplog, monkeypatch) -> None:
    import hubmerge.hub

    ws.write()
    assert ws.run().exit_code == 0
    monkeypatch.setattr(hubmerge.hub, "publish", lambda *args, **kwargs: None)
    with caplog.at_level(logging.WARNING, logger="hubmerge"):
        publish_output(ws.output, PushTarget(repo_id="alice/artifact"))
    assert "the base of this artifact is a local path" in caplog.text


def test_inspect_a_rebuilt_task_model(ws: Workspace) -> None:
    ws.write()
    assert ws.run().exit_code == 0
    task = ws.root / "task-a"
    assert invoke("materialize", ws.output, "-t", "a", "-o", task).exit_code == 0
    result = invoke("inspect", task, "--verify")
    assert result.exit_code == 0, result.output
    assert "task 'a' rebuilt from a tall_masks artifact" in " ".join(result.stdout.split())
    assert "verified 1 file\n" in result.stdout  # the weights: these models have no config files


def test_overwrite_keeps_files_the_user_put_in_a_previous_output(ws: Workspace) -> None:
    ws.write()
    assert ws.run().exit_code == 0
    (ws.output / "my_notes.txt").write_text("mine")
    (ws.output / "mystuff").mkdir()
    before = snapshot(ws.root)
    assert_refused(ws.run("--overwrite"), "files hubmerge did not write there", "my_notes.txt", "mystuff/")
    assert snapshot(ws.root) == before


def test_an_output_inside_another_output_is_refused(ws: Workspace) -> None:
    ws.write()
    assert ws.run().exit_code == 0
    nested = ws.output / "nested"
    before = snapshot(ws.root)
    assert_refused(
        invoke("run", ws.recipe_path, "-o", nested, "-q"), "lies inside the hubmerge output", str(ws.output)
    )
    assert_refused(
        invoke("materialize", ws.output, "-t", "a", "-o", ws.output / "a"), "lies inside the artifact"
    )
    assert snapshot(ws.root) == before


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda r: r.pop("tasks"), "tasks must be a list"),
        (lambda r: r.update(tasks=5), "tasks must be a list"),
        (lambda r: r.pop("base"), "base needs a source"),
        (lambda r: r.pop("result"), "result is not"),
        (lambda r: r["files"]["tau_mtl.safetensors"].update(size="12"), "needs an integer size"),
        (
            lambda r: r["files"].update({"../recipe.yaml": r["files"]["tau_mtl.safetensors"]}),
            "not a path inside",
        ),
        (lambda r: r.update(files="x"), "files must map"),
    ],
)
def test_a_damaged_run_record_is_one_line(ws: Workspace, edit, fragment: str) -> None:
    ws.write()
    assert ws.run().exit_code == 0
    record = json.loads((ws.output / "hubmerge.json").read_text())
    edit(record)
    (ws.output / "hubmerge.json").write_text(json.dumps(record))
    for args in (
        ("inspect", ws.output, "--verify"),
        ("materialize", ws.output, "-t", "a", "-o", ws.root / "t"),
    ):
        assert_refused(invoke(*args), "damaged run record", fragment)
    assert_refused(ws.run("--overwrite"), "holds no hubmerge output")


def test_stale_staging_of_an_output_with_glob_characters_is_removed(ws: Workspace) -> None:
    ws.write()
    output = ws.root / "g[1]"
    stale = ws.root / f".g[1].partial-{dead_pid()}-abcd1234"
    stale.mkdir()
    assert invoke("run", ws.recipe_path, "-o", output, "-q").exit_code == 0
    assert not stale.exists()


def test_a_replace_killed_between_its_renames_gets_the_previous_output_back(ws: Workspace, caplog) -> None:
    ws.write()
    assert ws.run().exit_code == 0
    files = json.loads((ws.output / "hubmerge.json").read_text())["files"]
    retired = ws.root / f".out.old-{dead_pid()}-abcd1234"  # the first rename of a replace happened
    retired.mkdir()
    ws.output.rename(retired / "previous")
    with caplog.at_level(logging.WARNING, logger="hubmerge"):
        assert_refused(ws.run(), "holds a previous hubmerge output")  # restored as the run took the lock
    assert "restored" in caplog.text and not retired.exists()
    assert json.loads((ws.output / "hubmerge.json").read_text())["files"].keys() == files.keys()
    assert verify_output(ws.output)
    assert ws.run("--overwrite").exit_code == 0


def test_the_output_is_locked_while_it_is_pushed(ws: Workspace, monkeypatch) -> None:
    import hubmerge.hub

    ws.write()
    assert ws.run().exit_code == 0

    def second_run_meanwhile(*args, **kwargs) -> None:
        second = hubmerge_cli("run", str(ws.recipe_path), "-o", str(ws.output), "--overwrite", "-q")
        assert second.returncode == 2 and f"another hubmerge run (pid {os.getpid()})" in second.stderr

    monkeypatch.setattr(hubmerge.hub, "publish", second_run_meanwhile)
    publish_output(ws.output, PushTarget(repo_id="alice/artifact"))


def test_a_file_added_to_the_output_during_an_overwrite_is_not_deleted(ws: Workspace, monkeypatch) -> None:
    from hubmerge.engine import Engine

    ws.write()
    assert ws.run().exit_code == 0
    original = Engine.collect_statistics

    def user_adds_a_file(self) -> None:
        (ws.output / "notes.txt").write_text("mine")
        original(self)

    monkeypatch.setattr(Engine, "collect_statistics", user_adds_a_file)
    assert_refused(ws.run("--overwrite"), "holds what hubmerge did not write", "nothing was replaced")
    assert (ws.output / "notes.txt").read_text() == "mine"
    assert len([p for p in ws.root.iterdir() if p.name.startswith("out.hubmerge-")]) == 1
