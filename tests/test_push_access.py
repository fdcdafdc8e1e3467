"""The push preflight (`hubmerge.hub.check_push_access`) against the loopback Hub, whose permissions follow the
Hub's: the preflight refuses exactly the pushes that the upload itself would refuse after the merge."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi

from hubmerge.errors import HubmergeError
from hubmerge.hub import check_push_access, publish
from hubmerge.recipe import PushTarget
from tests.hubserver import HubServer


def target(repo_id: str) -> PushTarget:
    return PushTarget(repo_id=repo_id)


def refused(hub: HubServer, repo_id: str, token: str | None) -> str:
    with pytest.raises(HubmergeError) as caught:
        check_push_access(target(repo_id), token=token, endpoint=hub.url)
    message = str(caught.value)
    assert "\n" not in message
    return message


def push_works(hub: HubServer, tmp_path: Path, repo_id: str, token: str) -> bool:
    """Whether a real push (create_repo + upload_folder through the client) goes through."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "hubmerge.json").write_text("{}")
    try:
        publish(out, target(repo_id), token=token, endpoint=hub.url)
    except HubmergeError:
        return False
    return "hubmerge.json" in hub.files(repo_id)


def test_own_namespace(hub: HubServer, hf_token: str, tmp_path: Path) -> None:
    assert check_push_access(target("alice/merged"), token=hf_token, endpoint=hub.url) == "alice"
    assert push_works(hub, tmp_path, "alice/merged", hf_token)
    assert (
        check_push_access(target("alice/merged"), token=hf_token, endpoint=hub.url) == "alice"
    )  # exists now


def test_token_from_the_environment(hub: HubServer, hf_token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hf_token)
    assert check_push_access(target("alice/merged"), endpoint=hub.url) == "alice"


def test_not_logged_in(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert refused(hub, "alice/merged", None) == (
        "not logged in: set HF_TOKEN or run `hf auth login` (or pass --token) to push to alice/merged"
    )


def test_unknown_token(hub: HubServer) -> None:
    assert refused(hub, "alice/merged", "hf_not_a_token") == (
        "cannot push to alice/merged: the Hub does not accept the token (invalid or expired): set HF_TOKEN or "
        "run `hf auth login` again"
    )


def test_read_only_token(hub: HubServer, tmp_path: Path) -> None:
    hub.add_token("hf_alice_read", "alice", role="read")
    assert refused(hub, "alice/merged", "hf_alice_read") == (
        "cannot push to alice/merged: the token 'test' of alice is read-only; use one with the write role "
        "(https://huggingface.co/settings/tokens)"
    )
    assert not push_works(hub, tmp_path, "alice/merged", "hf_alice_read")


@pytest.mark.parametrize("exists", [False, True])
def test_someone_elses_namespace(hub: HubServer, hf_token: str, tmp_path: Path, exists: bool) -> None:
    if exists:
        hub.seed_repo("bob/merged", {"config.json": b"{}"})
    assert refused(hub, "bob/merged", hf_token) == (
        "cannot push to bob/merged: alice can write only to alice/ and to their organisations' namespaces "
        "(organisations: none), not to bob/"
    )
    assert not push_works(hub, tmp_path, "bob/merged", hf_token)


@pytest.mark.parametrize("role", ["admin", "write", "contributor"])
def test_organisation_roles_that_write(hub: HubServer, hf_token: str, tmp_path: Path, role: str) -> None:
    hub.add_org("lab", {"alice": role, "bob": "admin"})
    assert check_push_access(target("lab/merged"), token=hf_token, endpoint=hub.url) == "alice"
    assert push_works(hub, tmp_path, "lab/merged", hf_token)


def test_organisation_read_role(hub: HubServer, hf_token: str, tmp_path: Path) -> None:
    hub.add_org("lab", {"alice": "read"})
    hub.add_org("other", {"alice": "write"})
    assert refused(hub, "lab/merged", hf_token) == (
        "cannot push to lab/merged: alice's role in the organisation lab is 'read', which cannot write "
        "(needed: admin, write, contributor)"
    )
    assert not push_works(hub, tmp_path, "lab/merged", hf_token)
    assert "(organisations: lab, other), not to bob/" in refused(hub, "bob/merged", hf_token)


def test_fine_grained_token_on_the_namespace(hub: HubServer, tmp_path: Path) -> None:
    scoped = [
        {"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.content.read", "repo.write"]}
    ]
    hub.add_token("hf_alice_fine", "alice", role="fineGrained", scoped=scoped)
    assert check_push_access(target("alice/merged"), token="hf_alice_fine", endpoint=hub.url) == "alice"
    assert push_works(hub, tmp_path, "alice/merged", "hf_alice_fine")


def test_fine_grained_token_on_one_repo(hub: HubServer, tmp_path: Path) -> None:
    """Write access to an existing repo only: that repo can be pushed to, no other, and none created."""
    scoped = [{"entity": {"type": "model", "name": "alice/merged"}, "permissions": ["repo.write"]}]
    hub.add_token("hf_alice_repo", "alice", role="fineGrained", scoped=scoped)
    missing = refused(hub, "alice/merged", "hf_alice_repo")
    assert missing == (
        "cannot push to alice/merged: the fine-grained token 'test' of alice has no repo.write permission on "
        "alice (needed to create the repo) or on alice/merged"
    )
    assert not push_works(hub, tmp_path, "alice/merged", "hf_alice_repo")
    hub.seed_repo("alice/merged", {"config.json": b"{}"})
    hub.seed_repo("alice/other", {"config.json": b"{}"})
    assert check_push_access(target("alice/merged"), token="hf_alice_repo", endpoint=hub.url) == "alice"
    assert push_works(hub, tmp_path, "alice/merged", "hf_alice_repo")
    assert "no repo.write permission on alice" in refused(hub, "alice/other", "hf_alice_repo")
    assert not push_works(hub, tmp_path, "alice/other", "hf_alice_repo")


def test_fine_grained_token_that_only_reads(hub: HubServer, tmp_path: Path) -> None:
    scoped = [{"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.content.read"]}]
    hub.add_token("hf_alice_reader", "alice", role="fineGrained", scoped=scoped)
    assert "has no repo.write permission on alice" in refused(hub, "alice/merged", "hf_alice_reader")
    assert not push_works(hub, tmp_path, "alice/merged", "hf_alice_reader")


def test_whoami_reports_orgs_and_token(hub: HubServer, hf_token: str) -> None:
    hub.add_org("lab", {"alice": "contributor"})
    who = HfApi(endpoint=hub.url).whoami(token=hf_token)
    assert who["orgs"] == [{"type": "org", "name": "lab", "fullname": "lab", "roleInOrg": "contributor"}]
    assert who["auth"]["accessToken"]["role"] == "write"


def test_contributor_writes_only_to_repos_they_created(hub: HubServer, hf_token: str, tmp_path: Path) -> None:
    """The test Hub's rule; the preflight cannot see it for an existing repo, the push reports it."""
    hub.add_org("lab", {"alice": "contributor", "bob": "write"})
    hub.seed_repo("lab/bobs", {"config.json": b"{}"})
    assert not push_works(hub, tmp_path, "lab/bobs", hf_token)
    assert push_works(hub, tmp_path, "lab/alices", hf_token)
    assert push_works(hub, tmp_path, "lab/alices", hf_token)  # created by alice: still hers to write


def test_reset_forgets_added_tokens_and_orgs(hub: HubServer) -> None:
    hub.add_token("hf_temp", "carol")
    hub.add_org("lab", {"carol": "admin"})
    hub.reset()
    assert "hf_temp" not in hub.tokens and hub.orgs == {} and hub.token_access == {}
