"""The Hugging Face Hub: pin sources to commits before any weight is downloaded, fetch them, publish outputs.

Download, cache, revisions, credentials, retries and large-file upload are huggingface_hub's job; this module
decides what to ask for and turns the client's exceptions into one-line errors that name the source.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from hubmerge.errors import HubAccessError, HubSourceError, SourceError
from hubmerge.recipe import PushTarget, split_revision

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_PATTERNS = {"safetensors": ["*.safetensors", SAFETENSORS_INDEX], "bin": ["*.bin", BIN_INDEX]}
# An open_clip checkpoint: this config beside open_clip_model.safetensors (or open_clip_pytorch_model.bin).
OPEN_CLIP_CONFIG = "open_clip_config.json"
# Files a model directory needs besides its weights: downloaded with Hub sources, copied into outputs.
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "[0-9]_*/*.json",
    OPEN_CLIP_CONFIG,
)
# The base's card is read for its license and pipeline tag, which a merge inherits.
CARD_FILE = "README.md"
# A PEFT adapter's config, beside adapter_model.safetensors (matched by the weight patterns).
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class HubSource:
    """A Hub source resolved to the commit it points at now (nothing downloaded yet)."""

    spec: str  # as written in the recipe
    repo_id: str
    requested: str | None  # branch, tag or sha as written; None = the default branch
    sha: str
    weights: str  # "safetensors" or "bin": safetensors wins when a repo has both
    pipeline_tag: str | None = None
    cached_path: Path | None = None  # offline: the cached snapshot the revision resolved to


def allow_patterns(weights: str) -> list[str]:
    return [*WEIGHT_PATTERNS[weights], *SUPPORT_FILES, CARD_FILE, ADAPTER_CONFIG]


PRIVATE_HINT = "a private Hub repository needs HF_TOKEN or `hf auth login`"


def relative_hint() -> str:
    """Where a relative local path is looked for: users often expect the recipe's directory."""
    return f"relative paths are relative to the current directory, {Path.cwd()}"


@contextmanager
def hub_errors(spec: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line errors naming `spec`.

    Problems of this source are `HubSourceError`s (a `SourceError` and a `HubAccessError`); a Hub that cannot
    be reached is a `HubAccessError` only, as it concerns every Hub source alike. The client's exception is
    the cause of each.
    """
    repo_id, revision = split_revision(spec)

    def fail(
        reason: str, *, missing: bool = False, hints: tuple[str, ...] = (), detail: str = ""
    ) -> HubSourceError:
        return HubSourceError(
            f"{spec}: {reason}{detail}", spec, reason, repo_id=repo_id, missing=missing, hints=hints
        )

    try:
        yield
    except hf_errors.GatedRepoError as err:
        raise fail("gated repository: accept its terms on the Hub, then log in") from err
    except hf_errors.RevisionNotFoundError as err:
        raise fail(f"revision {revision!r} not found in {repo_id}", missing=True) from err
    except hf_errors.RepositoryNotFoundError as err:
        raise fail(
            "no such local path, and no such Hub repository",
            missing=True,
            hints=(PRIVATE_HINT, relative_hint()),
            detail=f" (or it is private: set HF_TOKEN or run `hf auth login`; {relative_hint()})",
        ) from err
    except hf_errors.LocalEntryNotFoundError as err:
        raise fail(
            "no such local path, and the Hub repository is not in the local cache while the Hub cannot be "
            "reached",
            missing=True,
            detail=" (connect, or download it first; HF_HUB_OFFLINE=1 reads only the cache)",
        ) from err
    except hf_errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise fail(f"not authorised ({status}): check HF_TOKEN or `hf auth login`") from err
        raise fail(f"Hub error: {_first_line(err)}") from err
    except httpx2.TransportError as err:
        raise HubAccessError(
            f"{spec}: cannot reach the Hub at {endpoint or hf_constants.ENDPOINT} ({err}); to use only "
            "models already in the local cache, set HF_HUB_OFFLINE=1",
            repo_id=repo_id,
        ) from err


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def resolve(spec: str, *, token: str | None = None, endpoint: str | None = None) -> HubSource:
    """The commit `org/name[@revision]` points at, and which weights it has; downloads no weights."""
    repo_id, revision = split_revision(spec)
    with hub_errors(spec, endpoint):
        if hf_constants.HF_HUB_OFFLINE:
            return _resolve_cached(spec, repo_id, revision)
        api = HfApi(endpoint=endpoint, token=token)
        info = api.model_info(repo_id, revision=revision)
        if info.gated:
            api.auth_check(repo_id)  # metadata of a gated repo is public; its files may not be
    names = [s.rfilename for s in info.siblings or []]
    if any(n.endswith(".safetensors") for n in names):
        weights = "safetensors"
    elif any(n.endswith(".bin") for n in names):
        weights = "bin"
    else:
        reason = f"the repository has no .safetensors or .bin weights (commit {info.sha})"
        raise SourceError(f"{spec}: {reason}", spec, reason, missing=False)
    return HubSource(spec, repo_id, revision, str(info.sha), weights, pipeline_tag=info.pipeline_tag)


def _resolve_cached(spec: str, repo_id: str, revision: str | None) -> HubSource:
    """Offline: the cache decides; its snapshot folder for the revision is named after the commit sha."""
    for weights in WEIGHT_PATTERNS:
        try:
            path = Path(
                snapshot_download(
                    repo_id, revision=revision, local_files_only=True, allow_patterns=allow_patterns(weights)
                )
            )
        except hf_errors.IncompleteSnapshotError:
            continue  # a snapshot downloaded with the other weight format
        if any(path.glob(WEIGHT_PATTERNS[weights][0])):
            return HubSource(spec, repo_id, revision, path.name, weights, cached_path=path)
    reason = f"HF_HUB_OFFLINE is set and the cached snapshot of {repo_id} has no complete set of weights"
    raise SourceError(
        f"{spec}: {reason} (run once with network access to download it)", spec, reason, missing=True
    )


def download(source: HubSource, *, token: str | None = None, endpoint: str | None = None) -> Path:
    """The local snapshot of `source` at its pinned commit: weights, config, tokenizer and card only."""
    if source.cached_path is not None:
        return source.cached_path
    with hub_errors(source.spec, endpoint):
        # By the revision as written, so the cache records where the branch or tag points and an offline
        # run can resolve it later; by sha only if the branch has moved since `resolve` pinned it.
        for revision in (source.requested, source.sha):
            path = Path(
                snapshot_download(
                    source.repo_id,
                    revision=revision,
                    allow_patterns=allow_patterns(source.weights),
                    token=token,
                    endpoint=endpoint,
                )
            )
            if path.name == source.sha:
                return path
    raise HubAccessError(
        f"{source.spec}: the Hub served commit {path.name} for pinned commit {source.sha}",
        repo_id=source.repo_id,
    )


def download_file(
    source: HubSource, filename: str, *, token: str | None = None, endpoint: str | None = None
) -> Path | None:
    """One file of `source` at its pinned commit (None if the commit has no such file), e.g. an adapter's
    config, read before anything else of the repository is downloaded."""
    if source.cached_path is not None:
        path = source.cached_path / filename
        return path if path.is_file() else None
    with hub_errors(source.spec, endpoint):
        try:
            return Path(
                hf_hub_download(source.repo_id, filename, revision=source.sha, token=token, endpoint=endpoint)
            )
        except hf_errors.RemoteEntryNotFoundError:
            return None


@dataclass(frozen=True)
class Published:
    repo_url: str
    commit_url: str
    pr_url: str | None


def publish(
    directory: Path, target: PushTarget, *, token: str | None = None, endpoint: str | None = None
) -> Published:
    """Upload an output directory as one commit (files the repo already has are skipped by the client)."""
    repo_id, revision = target.repo_id, target.revision
    api = HfApi(endpoint=endpoint, token=token)
    hint = f"the local output {directory} is complete; re-run `hubmerge push {repo_id} {directory}`"
    try:
        repo_url = api.create_repo(repo_id, private=target.private, exist_ok=True)
        if revision and revision != "main":
            # upload_folder does not create branches; a PR against a missing branch fails too.
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            revision=revision,
            create_pr=target.create_pr,
            commit_message=target.commit_message or f"Upload {directory.name} with hubmerge",
        )
    except hf_errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        why = (
            "not authorised: check HF_TOKEN or `hf auth login`, and write access to the namespace"
            if status in (401, 403)
            else _first_line(err)
        )
        raise HubAccessError(f"push to {repo_id} failed: {why}; {hint}", repo_id=repo_id) from err
    except (httpx2.TransportError, OSError) as err:
        raise HubAccessError(
            f"push to {repo_id} failed: {_first_line(err)}; {hint}", repo_id=repo_id
        ) from err
    return Published(repo_url=str(repo_url), commit_url=info.commit_url, pr_url=info.pr_url)


# Organisation roles that may create repositories (a contributor writes only to the repos they created).
CREATING_ROLES = ("admin", "write", "contributor")


def check_push_access(target: PushTarget, *, token: str | None = None, endpoint: str | None = None) -> str:
    """Who a push to `target` would commit as: checked before merging, so an unpublishable run fails at once.

    Refused: no token, a token the Hub rejects or that is read-only, a namespace that is neither the user's
    nor one of their organisations with a role that can write, and a fine-grained token without
    `repo.write` on the namespace (or, for an existing repo, on the repo). An organisation contributor's
    access to an existing repo they did not create cannot be told without writing; the push then reports it.

    Args:
        target: the recipe's `push:` block.
        token: the token to check; None uses HF_TOKEN or the `hf auth login` one.
        endpoint: the Hub; None for the default (HF_ENDPOINT).

    Returns:
        The user name the token belongs to.
    """
    repo_id = target.repo_id
    namespace = repo_id.split("/")[0]
    api = HfApi(endpoint=endpoint, token=token)
    where = f"cannot push to {repo_id}"
    try:
        who = api.whoami()
    except hf_errors.LocalTokenNotFoundError as err:
        raise HubAccessError(
            f"not logged in: set HF_TOKEN or run `hf auth login` (or pass --token) to push to {repo_id}",
            repo_id=repo_id,
        ) from err
    except hf_errors.OfflineModeIsEnabled as err:
        raise HubAccessError(
            f"{where}: HF_HUB_OFFLINE is set, and a push needs the Hub", repo_id=repo_id
        ) from err
    except hf_errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise HubAccessError(
                f"{where}: the Hub does not accept the token (invalid or expired): set HF_TOKEN or run "
                "`hf auth login` again",
                repo_id=repo_id,
            ) from err
        raise HubAccessError(
            f"{where}: checking the token failed: {_first_line(err)}", repo_id=repo_id
        ) from err
    except httpx2.TransportError as err:
        raise HubAccessError(
            f"{where}: cannot reach the Hub at {endpoint or hf_constants.ENDPOINT} ({err})", repo_id=repo_id
        ) from err
    user = who["name"]
    access = (who.get("auth") or {}).get("accessToken") or {}
    role, token_name = access.get("role"), access.get("displayName", "")
    if role == "read":
        raise HubAccessError(
            f"{where}: the token {token_name!r} of {user} is read-only; use one with the write role "
            "(https://huggingface.co/settings/tokens)",
            repo_id=repo_id,
        )
    orgs = {org["name"]: org.get("roleInOrg") for org in who.get("orgs") or []}
    if namespace != user and namespace not in orgs:
        member_of = ", ".join(orgs) or "none"
        raise HubAccessError(
            f"{where}: {user} can write only to {user}/ and to their organisations' namespaces "
            f"(organisations: {member_of}), not to {namespace}/",
            repo_id=repo_id,
        )
    if namespace != user and orgs[namespace] is not None and orgs[namespace] not in CREATING_ROLES:
        raise HubAccessError(
            f"{where}: {user}'s role in the organisation {namespace} is {orgs[namespace]!r}, which cannot write "
            f"(needed: {', '.join(CREATING_ROLES)})",
            repo_id=repo_id,
        )
    if role == "fineGrained":
        _check_fine_grained(api, access, user, repo_id, where, token_name)
    return user


def _check_fine_grained(
    api: HfApi, access: dict[str, Any], user: str, repo_id: str, where: str, token_name: str
) -> None:
    """A fine-grained token writes where it has `repo.write`: on the namespace, or on the repo if it exists."""
    namespace = repo_id.split("/")[0]
    writable = {
        (scope["entity"].get("type"), scope["entity"].get("name"))
        for scope in (access.get("fineGrained") or {}).get("scoped") or []
        if "repo.write" in scope.get("permissions", [])
    }
    if writable & {("user", namespace), ("org", namespace)}:
        return
    if ("model", repo_id) in writable:
        try:
            if api.repo_exists(repo_id):
                return
        except (hf_errors.HfHubHTTPError, httpx2.TransportError) as err:
            raise HubAccessError(
                f"{where}: checking whether it exists failed: {_first_line(err)}", repo_id=repo_id
            ) from err
    raise HubAccessError(
        f"{where}: the fine-grained token {token_name!r} of {user} has no repo.write permission on {namespace} "
        f"(needed to create the repo) or on {repo_id}",
        repo_id=repo_id,
    )
