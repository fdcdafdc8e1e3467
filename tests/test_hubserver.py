"""The loopback test Hub speaks the protocol of the real clients (huggingface_hub 2.4, transformers 5.23).

Hub tests of hubmerge are only as good as this server's fidelity, so every endpoint is checked here through
the clients themselves: uploads through the LFS path, downloads through the cache, the error classes the
clients raise, pull requests, card validation, and recovery from a dropped connection.
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hubserver import HubServer

README = "---\nlicense: apache-2.0\nlibrary_name: hubmerge\ntags: [merge, hubmerge]\n---\n# A merged model\n"


@pytest.fixture
def api(hub: HubServer, hf_token: str) -> HfApi:
    return HfApi(endpoint=hub.url, token=hf_token)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A card with front matter, a binary file over the LFS threshold, and a small text file in a subfolder."""
    root = tmp_path / "upload"
    (root / "notes").mkdir(parents=True)
    (root / "README.md").write_text(README)
    (root / "weights.dat").write_bytes(os.urandom(20_000))
    (root / "notes" / "hello.txt").write_text("hello\n")
    return root


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_create_repo_answers_conflicts_with_the_url(api: HfApi) -> None:
    url = api.create_repo("alice/model")
    assert (url.repo_id, url.repo_type) == ("alice/model", "model")
    assert api.create_repo("alice/model", exist_ok=True).repo_id == "alice/model"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("alice/model")
    assert conflict.value.response.status_code == 409
    assert api.whoami()["name"] == "alice"


def test_upload_folder_round_trips_through_lfs(
    hub: HubServer, api: HfApi, folder: Path, tmp_path: Path
) -> None:
    api.create_repo("alice/model")
    commit = api.upload_folder(repo_id="alice/model", folder_path=folder)

    assert hub.files("alice/model") == local_files(folder)
    assert hub.commit_sha("alice/model") == commit.oid
    assert (hub.commits["alice/model"], hub.lfs_uploads["alice/model"]) == (1, 1)
    info = api.model_info("alice/model", files_metadata=True)
    assert info.sha == commit.oid
    assert info.card_data.license == "apache-2.0" and info.library_name == "hubmerge"
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["weights.dat"] is not None and lfs["README.md"] is None and lfs["notes/hello.txt"] is None

    downloaded = Path(hf_hub_download("alice/model", "weights.dat"))
    assert downloaded.read_bytes() == (folder / "weights.dat").read_bytes()
    patterns = ["notes/*", "README.md"]
    snapshot = Path(snapshot_download("alice/model", allow_patterns=patterns, cache_dir=tmp_path / "cache"))
    assert snapshot.name == commit.oid
    assert local_files(snapshot) == {k: v for k, v in local_files(folder).items() if k != "weights.dat"}


def test_an_identical_upload_makes_no_commit_and_no_lfs_put(hub: HubServer, api: HfApi, folder: Path) -> None:
    api.create_repo("alice/model")
    first = api.upload_folder(repo_id="alice/model", folder_path=folder)
    hub.requests.clear()
    again = api.upload_folder(repo_id="alice/model", folder_path=folder)
    assert again.oid == first.oid
    assert hub.commits["alice/model"] == 1 and hub.lfs_uploads["alice/model"] == 1
    assert not [path for method, path in hub.requests if method == "PUT" or "/commit/" in path]


def test_branches_tags_and_pull_requests_resolve_like_revisions(
    hub: HubServer, api: HfApi, folder: Path
) -> None:
    main = hub.seed_repo("alice/model", {"config.json": b"{}"})
    api.create_branch("alice/model", branch="task-a")
    api.create_branch("alice/model", branch="task-a", exist_ok=True)
    on_branch = api.upload_folder(repo_id="alice/model", folder_path=folder, revision="task-a")
    api.create_tag("alice/model", tag="v1", revision="task-a")
    pr = api.upload_file(
        path_or_fileobj=b"proposal", path_in_repo="pr.txt", repo_id="alice/model", create_pr=True
    )

    assert (pr.pr_revision, pr.pr_num) == ("refs/pr/1", 1)
    assert Path(hf_hub_download("alice/model", "pr.txt", revision="refs/pr/1")).read_bytes() == b"proposal"
    assert hub.commit_sha("alice/model") == main  # neither the branch nor the PR moved main
    assert (
        api.model_info("alice/model", revision="v1").sha
        == on_branch.oid
        == hub.commit_sha("alice/model", "task-a")
    )
    refs = api.list_repo_refs("alice/model", include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "task-a"} and [t.name for t in refs.tags] == ["v1"]
    assert [(p.ref, p.target_commit) for p in refs.pull_requests] == [("refs/pr/1", pr.oid)]
    api.delete_branch("alice/model", branch="task-a")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/model", revision="task-a")


def test_a_stale_parent_commit_is_refused(hub: HubServer, api: HfApi) -> None:
    stale = hub.seed_repo("alice/model", {"a.txt": b"a"})
    hub.seed_repo("alice/model", {"b.txt": b"b"})
    with pytest.raises(HfHubHTTPError) as refused:
        api.create_commit(
            "alice/model", [CommitOperationAdd("c.txt", b"c")], commit_message="late", parent_commit=stale
        )
    assert refused.value.response.status_code == 412


def test_private_repos_look_missing_without_the_owners_token(hub: HubServer, hf_token: str) -> None:
    hub.seed_repo("alice/secret", {"config.json": b"{}"}, private=True)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token="hf_test_bob").model_info("alice/secret")
    assert Path(hf_hub_download("alice/secret", "config.json", token=hf_token)).read_bytes() == b"{}"


def test_an_invalid_token_is_a_plain_401(hub: HubServer) -> None:
    hub.seed_repo("alice/model", {"config.json": b"{}"})
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=hub.url, token="hf_wrong").model_info("alice/model")
    assert refused.value.response.status_code == 401
    assert not isinstance(refused.value, RepositoryNotFoundError)


def test_missing_repo_revision_and_file_raise_the_clients_errors(hub: HubServer, api: HfApi) -> None:
    hub.seed_repo("alice/model", {"config.json": b"{}"})
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/absent")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/model", revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("alice/model", "absent.json")
    hub.seed_repo("alice/gated", {"config.json": b"{}"}, gated=True)
    with pytest.raises(GatedRepoError):
        HfApi(endpoint=hub.url, token="hf_test_bob").hf_hub_download("alice/gated", "config.json")
    api.delete_repo("alice/model")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/model")


def test_card_validation_reads_the_front_matter(hub: HubServer, api: HfApi, folder: Path) -> None:
    assert hub.url == constants.ENDPOINT  # `validate()` takes no endpoint: conftest set it before any import
    ModelCard(README).validate()
    with pytest.raises(ValueError, match="base_model_relation"):
        ModelCard("---\nbase_model_relation: blend\n---\n").validate()
    api.create_repo("alice/model")
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    with pytest.raises(ValueError, match="does not parse"):
        api.upload_folder(repo_id="alice/model", folder_path=folder)


def test_transformers_loads_an_uploaded_model_bit_identically(api: HfApi, tmp_path: Path) -> None:
    from transformers import AutoModel, BertConfig, BertModel

    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    model = BertModel(config)
    model.save_pretrained(tmp_path / "bert")
    api.create_repo("alice/bert")
    api.upload_folder(repo_id="alice/bert", folder_path=tmp_path / "bert")

    loaded = AutoModel.from_pretrained("alice/bert").state_dict()
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_a_dropped_lfs_put_is_retried(hub: HubServer, api: HfApi, folder: Path) -> None:
    api.create_repo("alice/model")
    hub.inject_fault("PUT", r"^/_lfs/", "drop")
    api.upload_folder(repo_id="alice/model", folder_path=folder)
    assert [method for method, path in hub.requests if path.startswith("/_lfs/")] == ["PUT", "PUT", "POST"]
    assert hub.files("alice/model") == local_files(folder)


def test_a_failed_commit_raises_and_leaves_the_repo_unchanged(
    hub: HubServer, api: HfApi, folder: Path
) -> None:
    api.create_repo("alice/model")
    before = hub.commit_sha("alice/model")
    hub.inject_fault("POST", r"/commit/main$", 500)
    with pytest.raises(HfHubHTTPError) as failed:
        api.upload_folder(repo_id="alice/model", folder_path=folder)
    assert failed.value.response.status_code == 500
    assert hub.commit_sha("alice/model") == before and hub.commits["alice/model"] == 0


def test_ranges_and_chunked_bodies_keep_the_connection_usable(hub: HubServer) -> None:
    """Resumed downloads send `Range`; a streamed upload is chunked: neither may desync the keep-alive."""
    hub.seed_repo("alice/model", {"data.txt": b"0123456789"})
    connection = http.client.HTTPConnection(urlsplit(hub.url).netloc)
    connection.request("GET", "/alice/model/resolve/main/data.txt", headers={"Range": "bytes=4-"})
    partial = connection.getresponse()
    assert (partial.status, partial.headers["Content-Range"], partial.read()) == (
        206,
        "bytes 4-9/10",
        b"456789",
    )
    card = b'{"content": "---\\nlicense: mit\\n---\\n", "repoType": "model"}'
    connection.request("POST", "/api/validate-yaml", body=iter([card[:20], card[20:]]), encode_chunked=True)
    validated = connection.getresponse()
    assert (validated.status, validated.read()) == (200, b'{"errors": [], "warnings": []}')
    connection.close()
