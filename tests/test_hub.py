"""Hub integration against the loopback test Hub (`tests/hubserver.py`), with the real clients over HTTP.

Sources by Hub id (branch, sha), lock files, publishing (branch, PR, private, re-push), model cards, loading
back with `transformers.AutoModel` and `CompressedMerge`, and the errors a user meets on the way.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    BertModel,
)
from typer.testing import CliRunner

from hubmerge import CompressedMerge
from hubmerge.cli import app
from hubmerge.errors import HubmergeError
from hubmerge.hub import resolve
from tests.hubserver import HubServer
from tests.tiny_models import bert_config, perturb_

runner = CliRunner()
BASE_CARD = "---\nlicense: apache-2.0\npipeline_tag: feature-extraction\n---\n# tiny base\n"
TASKS = ("ft-a", "ft-b")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """A tiny BERT base (with a card) and two perturbed copies, as the files of their repos."""
    root = tmp_path_factory.mktemp("hub-models")
    torch.manual_seed(0)
    model = BertModel(bert_config()).eval()
    repos = {}
    for i, name in enumerate(("tiny-base", *TASKS)):
        if i:
            perturb_(model, 0.01, keep=0.5)
        model.save_pretrained(root / name)
        repos[name] = {p.name: p.read_bytes() for p in (root / name).iterdir() if p.is_file()}
    repos["tiny-base"]["README.md"] = BASE_CARD.encode()
    return repos


@pytest.fixture
def seeded(hub: HubServer, checkpoints: dict[str, dict[str, bytes]]) -> dict[str, str]:
    """The models on the test Hub under `alice/`; returns repo id -> commit sha of main."""
    return {f"alice/{name}": hub.seed_repo(f"alice/{name}", files) for name, files in checkpoints.items()}


@pytest.fixture
def logged_in(monkeypatch: pytest.MonkeyPatch, hf_token: str) -> str:
    monkeypatch.setenv("HF_TOKEN", hf_token)
    return hf_token


def write_recipe(tmp_path: Path, method: str = "task_arithmetic", **extra) -> Path:
    data = {
        "version": 1,
        "base": "alice/tiny-base",
        "models": [f"alice/{t}" for t in TASKS],
        "method": method,
        "output": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def local_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def downloads(hub: HubServer) -> list[str]:
    return [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]


def test_merge_of_hub_models_pushed_and_loaded_back(
    hub: HubServer, seeded: dict[str, str], logged_in: str, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, parameters={"scaling": 0.5}, push={"repo_id": "alice/merged"})
    result = invoke("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    assert f"{hub.url}/alice/merged/commit/" in result.output.replace("\n", "")
    out = tmp_path / "out"
    assert hub.files("alice/merged") == local_files(out)

    loaded = AutoModel.from_pretrained("alice/merged").state_dict()
    written = load_file(out / "model.safetensors")
    assert written.keys() <= loaded.keys()
    for key, tensor in written.items():
        assert torch.equal(loaded[key], tensor), key

    pinned = yaml.safe_load((out / "hubmerge_recipe.yaml").read_text())
    assert pinned["base"] == f"alice/tiny-base@{seeded['alice/tiny-base']}"
    assert [m["source"] for m in pinned["models"]] == [f"alice/{t}@{seeded[f'alice/{t}']}" for t in TASKS]
    assert "push" not in pinned  # re-running the pinned recipe must not publish again

    card = ModelCard.load("alice/merged")
    assert card.data.base_model == ["alice/tiny-base", *(f"alice/{t}" for t in TASKS)]
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "feature-extraction"
    assert card.data.tags == ["merge", "hubmerge", "task_arithmetic"]
    assert seeded["alice/tiny-base"] in card.text
    assert 'AutoModel.from_pretrained("alice/merged")' in card.text
    assert "More Information Needed" not in card.content and "{{" not in card.content
    card.validate()


def test_compressed_artifact_round_trip_with_subfolders(
    hub: HubServer, seeded: dict[str, str], logged_in: str, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, "tall_masks", push={"repo_id": "alice/tall", "export": "subfolders"})
    result = invoke("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert hub.files("alice/tall") == local_files(out)
    local = CompressedMerge.from_pretrained(out)

    remote = CompressedMerge.from_pretrained("alice/tall")
    assert sorted(p.name for p in remote.directory.iterdir()) == sorted(
        [
            "README.md",
            "hubmerge.json",
            "hubmerge_recipe.yaml",
            "mask_agreement.png",
            "masks",
            "tau_mtl.safetensors",
        ]
    )  # the exported subfolders are not downloaded
    for task in TASKS:
        expected = local.materialize(task)
        rebuilt = remote.materialize(task)
        assert rebuilt.keys() == expected.keys()
        assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)
        plain = AutoModel.from_pretrained("alice/tall", subfolder=task).state_dict()
        assert all(torch.equal(plain[k], v) for k, v in expected.items() if k in plain)

    card = ModelCard.load("alice/tall")
    assert card.data.library_name == "hubmerge"
    assert card.data.base_model_relation == "merge"
    assert "![Mask agreement histogram](mask_agreement.png)" in card.text
    assert 'subfolder="ft-a"' in card.text
    card.validate()

    cli = invoke("materialize", "alice/tall", "--task", "ft-b", "--output", tmp_path / "ft-b")
    assert cli.exit_code == 0, cli.output
    assert (
        load_file(tmp_path / "ft-b" / "model.safetensors").keys()
        == load_file(out / "ft-b" / "model.safetensors").keys()
    )


def test_compressed_merge_push_to_hub_through_the_mixin(
    hub: HubServer, seeded: dict[str, str], hf_token: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert invoke("run", write_recipe(tmp_path, "tall_masks"), "-q").exit_code == 0
    merge = CompressedMerge.from_pretrained(out)
    merge.push_to_hub("alice/tall-copy", token=hf_token)
    assert hub.files("alice/tall-copy") == local_files(out)  # no config.json added, card kept
    copy = CompressedMerge.from_pretrained("alice/tall-copy", token=hf_token)
    assert all(
        torch.equal(a, b)
        for a, b in zip(copy.materialize("ft-a").values(), merge.materialize("ft-a").values(), strict=True)
    )


def test_second_push_uploads_nothing(
    hub: HubServer, seeded: dict[str, str], logged_in: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert invoke("run", write_recipe(tmp_path), "-q").exit_code == 0
    assert invoke("push", "alice/merged", out).exit_code == 0
    commits, uploads = hub.commits["alice/merged"], hub.lfs_uploads["alice/merged"]
    again = invoke("push", out, "alice/merged")  # the order before `hf upload`'s, deprecated
    assert again.exit_code == 0, again.output
    assert again.stderr.splitlines()[0] == (
        f"warning: `hubmerge push OUTPUT REPO_ID` is deprecated; write `hubmerge push alice/merged {out}` "
        "(the order of `hf upload`)"
    )
    assert (hub.commits["alice/merged"], hub.lfs_uploads["alice/merged"]) == (commits, uploads)


def test_push_to_a_branch_and_as_a_pull_request(
    hub: HubServer, seeded: dict[str, str], logged_in: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert invoke("run", write_recipe(tmp_path), "-q").exit_code == 0
    assert invoke("push", "alice/merged", out, "--revision", "dev").exit_code == 0
    assert hub.files("alice/merged", "dev") == local_files(out)
    assert "model.safetensors" not in hub.files("alice/merged", "main")

    pr = invoke("push", "alice/merged", out, "--create-pr", "-m", "merge as a PR")
    assert pr.exit_code == 0, pr.output
    assert "/discussions/1" in pr.output.replace("\n", "")
    assert hub.files("alice/merged", "refs/pr/1") == local_files(out)
    assert "model.safetensors" not in hub.files("alice/merged", "main")


def test_private_repos_need_the_token(
    hub: HubServer, checkpoints: dict[str, dict[str, bytes]], hf_token: str, monkeypatch, tmp_path: Path
) -> None:
    for name, files in checkpoints.items():
        hub.seed_repo(f"alice/{name}", files, private=name == "tiny-base")
    recipe = write_recipe(tmp_path)
    anonymous = invoke("run", recipe, "-q")
    assert anonymous.exit_code == 2
    assert (
        "alice/tiny-base: no such local path, and no such Hub repository (or it is private"
        in anonymous.output
    )
    assert not (tmp_path / "out").exists()

    monkeypatch.setenv("HF_TOKEN", hf_token)
    assert invoke("run", recipe, "-q").exit_code == 0
    assert invoke("push", "alice/secret", tmp_path / "out", "--private").exit_code == 0
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
        huggingface_hub.hf_hub_download("alice/secret", "hubmerge.json", token=False)
    assert huggingface_hub.hf_hub_download("alice/secret", "hubmerge.json", token=hf_token)


def test_sources_at_a_branch_and_at_a_sha(hub: HubServer, seeded: dict[str, str], tmp_path: Path) -> None:
    first = seeded["alice/ft-a"]
    v2 = hub.seed_repo("alice/ft-b", {"extra.txt": b"on a branch"}, branch="v2")
    moved = hub.seed_repo("alice/ft-a", {"notes.txt": b"a later commit on main"})
    recipe = write_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["models"] = [f"alice/ft-a@{first}", {"source": "alice/ft-b@v2", "name": "b"}]
    recipe.write_text(yaml.safe_dump(data))
    assert invoke("run", recipe, "-q").exit_code == 0
    record = yaml.safe_load((tmp_path / "out" / "hubmerge_recipe.yaml").read_text())
    assert [m["source"] for m in record["models"]] == [f"alice/ft-a@{first}", f"alice/ft-b@{v2}"]
    assert moved != first


def test_lock_file_pins_and_refuses_drift(hub: HubServer, seeded: dict[str, str], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    locked = invoke("lock", recipe)
    assert locked.exit_code == 0, locked.output
    lock = yaml.safe_load((tmp_path / "recipe.lock.yaml").read_text())
    assert lock == {"version": 1, "sources": seeded}
    assert invoke("run", recipe, "--locked", "-q").exit_code == 0

    moved = hub.seed_repo("alice/ft-b", {"notes.txt": b"new commit"})
    hub.requests.clear()
    drift = invoke("run", recipe, "--locked", "--overwrite", "-q")
    assert drift.exit_code == 2
    message = " ".join(drift.output.split())
    assert f"alice/ft-b: resolves to commit {moved} now, but" in message
    assert f"pins {seeded['alice/ft-b']}" in message
    assert downloads(hub) == []  # refused before any download


def test_missing_lock_file(hub: HubServer, seeded: dict[str, str], tmp_path: Path) -> None:
    result = invoke("run", write_recipe(tmp_path), "--locked")
    assert result.exit_code == 2
    assert "recipe.lock.yaml not found" in result.output


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("alice/nope", "alice/nope: no such local path, and no such Hub repository"),
        (
            "alice/ft-b@no-such-branch",
            "alice/ft-b@no-such-branch: revision 'no-such-branch' not found in alice/ft-b",
        ),
    ],
)
def test_bad_hub_source_fails_before_any_download(
    hub: HubServer, seeded: dict[str, str], tmp_path: Path, source: str, message: str
) -> None:
    recipe = write_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["models"] = ["alice/ft-a", {"source": source, "name": "bad"}]
    recipe.write_text(yaml.safe_dump(data))
    hub.requests.clear()
    result = invoke("run", recipe)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert downloads(hub) == []
    assert not (tmp_path / "out").exists()


def test_repo_without_weights(hub: HubServer, seeded: dict[str, str], tmp_path: Path) -> None:
    hub.seed_repo("alice/no-weights", {"config.json": b"{}"})
    with pytest.raises(
        HubmergeError, match=r"alice/no-weights: the repository has no \.safetensors or \.bin weights"
    ):
        resolve("alice/no-weights")


def test_unreachable_hub_suggests_offline_mode() -> None:
    with pytest.raises(
        HubmergeError, match=r"cannot reach the Hub at http://127\.0\.0\.1:9 .*HF_HUB_OFFLINE=1"
    ):
        resolve("alice/tiny-base", endpoint="http://127.0.0.1:9")


def test_offline_mode_reads_the_cache(
    hub: HubServer, seeded: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = tmp_path / "online"
    assert invoke("run", write_recipe(tmp_path), "--output", online, "-q").exit_code == 0
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    offline = tmp_path / "offline"
    result = invoke("run", write_recipe(tmp_path), "--output", offline, "-q")
    assert result.exit_code == 0, result.output
    assert hub.requests == []
    assert (offline / "model.safetensors").read_bytes() == (online / "model.safetensors").read_bytes()
    assert (offline / "hubmerge_recipe.yaml").read_text() == (online / "hubmerge_recipe.yaml").read_text()

    never = write_recipe(tmp_path, output=str(tmp_path / "never"))
    data = yaml.safe_load(never.read_text())
    data["base"] = "alice/never-downloaded"
    never.write_text(yaml.safe_dump(data))
    failed = invoke("run", never)
    assert failed.exit_code == 2
    assert "HF_HUB_OFFLINE=1 reads only the cache" in " ".join(failed.output.split())


def test_invalid_token_on_push(hub: HubServer, seeded: dict[str, str], tmp_path: Path, monkeypatch) -> None:
    assert invoke("run", write_recipe(tmp_path), "-q").exit_code == 0
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    result = invoke("push", "alice/merged", tmp_path / "out")
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "cannot push to alice/merged: the Hub does not accept the token (invalid or expired)" in message


@pytest.mark.parametrize("fault", ["drop", 500])
def test_failed_upload_keeps_the_output_and_can_be_pushed_again(
    hub: HubServer, seeded: dict[str, str], logged_in: str, tmp_path: Path, fault
) -> None:
    out = tmp_path / "out"
    assert invoke("run", write_recipe(tmp_path), "-q", "--no-push").exit_code == 0
    before = local_files(out)
    hub.inject_fault("POST", r"/api/models/alice/merged/commit/", fault)
    failed = invoke("push", "alice/merged", out)
    assert failed.exit_code == 2
    message = " ".join(failed.output.split())
    assert "push to alice/merged failed" in message
    assert f"the local output {out} is complete; re-run `hubmerge push alice/merged {out}`" in message
    assert local_files(out).keys() == before.keys()
    assert hub.commits["alice/merged"] == 0

    again = invoke("push", "alice/merged", out)
    assert again.exit_code == 0, again.output
    assert hub.files("alice/merged") == local_files(out)


def test_gated_source_fails_before_any_download(
    hub: HubServer, checkpoints: dict[str, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.seed_repo("alice/gated-base", checkpoints["tiny-base"], gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_test_bob")  # a user who has not accepted alice's conditions
    hub.requests.clear()
    with pytest.raises(HubmergeError, match="alice/gated-base: gated repository: accept its terms"):
        resolve("alice/gated-base")
    assert downloads(hub) == []


def test_compressed_merge_at_a_revision(
    hub: HubServer, seeded: dict[str, str], logged_in: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert invoke("run", write_recipe(tmp_path, "tall_masks"), "-q").exit_code == 0
    assert invoke("push", "alice/tall", out, "--revision", "v1").exit_code == 0
    with pytest.raises(HubmergeError, match=r"not a hubmerge artifact \(no hubmerge\.json\)"):
        CompressedMerge.from_pretrained("alice/tall")  # nothing on main
    at_branch = CompressedMerge.from_pretrained("alice/tall", revision="v1")
    local = CompressedMerge.from_pretrained(out)
    assert at_branch.tasks == list(TASKS)
    for key, tensor in local.materialize("ft-b").items():
        assert torch.equal(at_branch.materialize("ft-b")[key], tensor), key


def test_merged_model_loads_with_the_task_specific_auto_class(
    hub: HubServer, logged_in: str, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    model = BertForSequenceClassification(bert_config(num_hidden_layers=1, num_labels=3)).eval()
    for name in ("cls-base", *TASKS):
        perturb_(model, 0.01)
        model.save_pretrained(tmp_path / name)
        hub.seed_repo(f"alice/{name}", local_files(tmp_path / name))
    recipe = write_recipe(tmp_path, push={"repo_id": "alice/cls-merged"})
    data = yaml.safe_load(recipe.read_text())
    data["base"] = "alice/cls-base"
    recipe.write_text(yaml.safe_dump(data))
    assert invoke("run", recipe, "-q").exit_code == 0
    loaded = AutoModelForSequenceClassification.from_pretrained("alice/cls-merged")
    assert isinstance(loaded, BertForSequenceClassification)
    written = load_file(tmp_path / "out" / "model.safetensors")
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in written.items())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["not a repo id"], "REPO_ID: String should match pattern"),
        (["alice/x", "--export", "everything"], "--export: Input should be 'none' or 'subfolders'"),
    ],
)
def test_push_refuses_bad_arguments_before_any_request(hub: HubServer, tmp_path: Path, args, message) -> None:
    hub.requests.clear()
    result = invoke("push", *args, tmp_path)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert hub.requests == []
