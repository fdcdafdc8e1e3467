"""An offline, in-memory Hugging Face Hub on 127.0.0.1, for tests that drive the real clients.

huggingface_hub and transformers talk HTTP to this server exactly as they would to huggingface.co (the LFS
upload path: `HF_HUB_DISABLE_XET=1`), so hubmerge's publishing and downloading code is tested through the
clients' own retries, caches and error mapping rather than through mocks. The endpoints, fields and headers
are those huggingface_hub 2.4.0 and transformers 5.23 send and require (checked against their source).

Permissions: a user writes to their own namespace and to organisations (`add_org`) where their role is admin
or write, or contributor for repos they created (any member reads its private repos); a token (`add_token`)
has the write role unless given read, or fineGrained with scoped `repo.write` permissions on a user, an org or
a repo, as `whoami-v2` reports them.

Deliberate simplifications, invisible to the clients: no pagination, no Xet, no CDN redirects, the
regular/LFS rule is size/binary/extension based, a new repo starts with an empty initial commit (the Hub's
holds a `.gitattributes`), and pull requests can be opened only by those who may write to the repo.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_TOKENS = {"hf_test_alice": "alice", "hf_test_bob": "bob"}
# The exact message that makes the client report a plain 401 instead of "repository not found".
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
LFS_THRESHOLD = 10 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".onnx", ".png", ".jpg")
CARD_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = rf"/api/(?P<type>model|dataset|space)s/{_REPO}"
_REV = r"(?P<rev>[^/]+)"  # quoted by the clients: `refs%2Fpr%2F1`
_PREFIX = r"/(?:(?P<type>dataset|space)s/)?"
_PR_REF = re.compile(r"refs/pr/(\d+)")
_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)^---[ \t]*$", re.DOTALL | re.MULTILINE)


class HubError(Exception):
    """An error reply: status, message, and the `X-Error-Code` the client maps to an exception class."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(moment: datetime) -> str:
    """The Hub's timestamp format, the only one `huggingface_hub.utils.parse_datetime` accepts."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    """Where the Hub would store a file (from its first 512 bytes, as `preupload` sees it): weights, images,
    large or binary files go to LFS; empty ones never."""
    return size > 0 and (path.endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD or b"\0" in sample[:512])


def front_matter(text: str) -> Any:
    """The parsed YAML block at the top of a card, None when there is none; raises yaml.YAMLError."""
    match = _FRONT_MATTER.match(text)
    return yaml.safe_load(match[1]) if match else None


def card_errors(text: str) -> list[str]:
    """The metadata checks of `validate-yaml`: YAML that parses into a mapping, and the types of known keys."""
    try:
        data = front_matter(text)
    except yaml.YAMLError as err:
        return [f"YAML front matter does not parse: {err}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["YAML front matter must be a mapping"]
    errors = []
    for key in ("tags", "datasets", "base_model", "language", "metrics"):
        value = data.get(key, [])
        if not isinstance(value, str) and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            errors.append(f'"{key}" must be a string or a list of strings')
    errors += [
        f'"{key}" must be a string'
        for key in ("license", "library_name", "pipeline_tag")
        if not isinstance(data.get(key, ""), str)
    ]
    if data.get("base_model_relation", "merge") not in CARD_RELATIONS:
        errors.append(f'"base_model_relation" must be one of {sorted(CARD_RELATIONS)}')
    return errors


@dataclass
class _File:
    """A file of a commit; LFS files are stored by content too, only their ids differ."""

    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def oid(self) -> str:
        """The git blob id: of the content, or of the LFS pointer as git stores it."""
        return git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        """What downloads name their cache blob after, and what `preupload` compares with the local file."""
        return self.sha256 if self.lfs else self.oid

    def entry(self, path: str) -> dict[str, Any]:
        """The file's entry in tree and paths-info listings."""
        entry: dict[str, Any] = {"type": "file", "path": path, "oid": self.oid, "size": len(self.data)}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class _Commit:
    sha: str
    files: dict[str, _File]
    date: datetime


@dataclass
class _Repo:
    """One repository: commits by sha, refs pointing at them, and the LFS objects uploaded to it."""

    repo_type: str
    repo_id: str
    private: bool
    gated: bool
    creator: str | None = None  # who created it over HTTP (seeded repos: None)
    created: datetime = field(default_factory=_now)
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def url_path(self) -> str:
        return URL_PREFIX[self.repo_type] + self.repo_id

    def resolve(self, rev: str) -> _Commit:
        """A branch, tag, `refs/pr/N` or full commit sha, as every read endpoint accepts."""
        sha = self.branches.get(rev) or self.tags.get(rev)
        if sha is None and (pr := _PR_REF.fullmatch(rev)):
            sha = self.prs.get(int(pr[1]))
        if sha is None and rev in self.commits:
            sha = rev
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self.commits[sha]

    def head(self, ref: str) -> _Commit:
        """The tip of a ref that commits can move: a branch or an open pull request."""
        if ref not in self.branches and not ((pr := _PR_REF.fullmatch(ref)) and int(pr[1]) in self.prs):
            raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
        return self.resolve(ref)

    def move(self, ref: str, sha: str) -> None:
        if pr := _PR_REF.fullmatch(ref):
            self.prs[int(pr[1])] = sha
        else:
            self.branches[ref] = sha


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    action: str | int
    times: int


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(
        status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
    )


class HubServer:
    """The Hub's state plus the test hooks; `_Handler` serves it over HTTP.

    Every read or change of repository state happens under `lock`, so the clients' parallel uploads and
    the test's own hooks see consistent snapshots.
    """

    def __init__(self, tokens: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self._initial_tokens = dict(self.tokens)
        self.token_access: dict[str, dict[str, Any]] = {}  # token -> {role, scoped}; absent: the write role
        self.orgs: dict[str, dict[str, str]] = {}  # organisation -> {member: role}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []  # (method, URL path as sent, without query), in order
        self.commits: Counter[str] = Counter()  # commits posted over HTTP, by repo id
        self.lfs_uploads: Counter[str] = Counter()  # LFS PUTs stored, by repo id
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._faults: list[_Fault] = []
        self._sequence = itertools.count()
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # -- test hooks ------------------------------------------------------------------------------------------

    def seed_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        private: bool = False,
        gated: bool = False,
        branch: str = "main",
        message: str = "seed",
    ) -> str:
        """Commit `files` on top of `branch` (created from main if missing), creating the repo if needed.

        `private` and `gated` apply only when the repo is created here. Returns the new commit's sha.
        """
        with self.lock:
            repo = self._repos.get((repo_type, repo_id)) or self._create(repo_type, repo_id, private, gated)
            parent = repo.resolve(branch if branch in repo.branches else "main")
            added = {path: _File(data, is_lfs(path, len(data), data)) for path, data in files.items()}
            repo.lfs.update((f.sha256, f.data) for f in added.values() if f.lfs)
            commit = self._new_commit(repo, parent, {**parent.files, **added}, message)
            repo.branches[branch] = commit.sha
            return commit.sha

    def commit_sha(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self.lock:
            return self._repo(repo_type, repo_id).resolve(revision).sha

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        with self.lock:
            return {
                path: f.data for path, f in self._repo(repo_type, repo_id).resolve(revision).files.items()
            }

    def inject_fault(self, method: str, path_regex: str, action: str | int, times: int = 1) -> None:
        """Fail the next `times` requests whose path matches: "drop" closes the socket mid-body, an int replies
        with that status."""
        if action != "drop" and not isinstance(action, int):
            raise ValueError(f'a fault is "drop" or an HTTP status, not {action!r}')
        with self.lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), action, times))

    def add_token(
        self, token: str, user: str, *, role: str = "write", scoped: list[dict[str, Any]] | None = None
    ) -> None:
        """A token of `user` with the `read` or `write` role, or `fineGrained` with `scoped` permissions:
        `{"entity": {"type": "user" | "org" | "model" | ..., "name": ...}, "permissions": ["repo.write", ...]}`."""
        with self.lock:
            self.tokens[token] = user
            self.token_access[token] = {"role": role, "scoped": scoped or []}

    def add_org(self, org: str, members: dict[str, str]) -> None:
        """An organisation and its members' roles: admin, write, contributor or read."""
        with self.lock:
            self.orgs[org] = dict(members)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def reset(self) -> None:
        """Forget every repo, request and counter, so that each test starts on an empty Hub."""
        with self.lock:
            self._repos.clear()
            self.tokens = dict(self._initial_tokens)
            self.token_access.clear()
            self.orgs.clear()
            self.requests.clear()
            self.commits.clear()
            self.lfs_uploads.clear()

    # -- state used by the handler (callers hold `lock`) -----------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        if (repo_type, repo_id) not in self._repos:
            raise KeyError(f"no {repo_type} repo {repo_id} on the test Hub")
        return self._repos[repo_type, repo_id]

    def _create(self, repo_type: str, repo_id: str, private: bool, gated: bool) -> _Repo:
        repo = _Repo(repo_type, repo_id, private, gated)
        repo.branches["main"] = self._new_commit(repo, None, {}, "initial commit").sha
        self._repos[repo_type, repo_id] = repo
        return repo

    def _new_commit(
        self, repo: _Repo, parent: _Commit | None, files: dict[str, _File], message: str
    ) -> _Commit:
        """Store a commit; its sha covers parent, message, content and a sequence number, so each is unique."""
        digest = hashlib.sha1(f"{parent.sha if parent else ''}\0{message}\0{next(self._sequence)}".encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{files[path].oid}".encode())
        commit = _Commit(digest.hexdigest(), files, _now())
        repo.commits[commit.sha] = commit
        return commit

    def _member(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, {}))

    def _readable(self, repo_type: str, repo_id: str, user: str | None) -> _Repo:
        """The repo, unless it is missing or private to someone else: both look the same, as on the Hub."""
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._member(user, repo.owner)):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _refusal(
        self, user: str, token: str | None, repo_type: str, repo_id: str, repo: _Repo | None
    ) -> str | None:
        """Why `user` with `token` may not write to (or create, when `repo` is None) a repo; None if they may."""
        namespace = repo_id.split("/")[0]
        access = self.token_access.get(token or "", {"role": "write"})
        if access["role"] == "read":
            return "This token has read-only access"
        # a repo-scoped permission writes to that repo; creating one needs the namespace's
        granted = {("user", namespace), ("org", namespace)} | ({(repo_type, repo_id)} if repo else set())
        if access["role"] == "fineGrained" and not any(
            "repo.write" in scope["permissions"]
            and (scope["entity"]["type"], scope["entity"]["name"]) in granted
            for scope in access["scoped"]
        ):
            return f"This fine-grained token has no repo.write permission on {repo_id}"
        role = "admin" if user == namespace else self.orgs.get(namespace, {}).get(user)
        if role in ("admin", "write") or (role == "contributor" and (repo is None or repo.creator == user)):
            return None
        return f"You don't have the rights to write to {repo_id}"

    def _writable(self, repo_type: str, repo_id: str, user: str | None, token: str | None = None) -> _Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        repo = self._readable(repo_type, repo_id, user)
        if (reason := self._refusal(user, token, repo_type, repo_id, repo)) is not None:
            raise HubError(403, reason)
        return repo

    def _take_fault(self, method: str, path: str) -> str | int | None:
        """Log the request and consume the first fault that matches it."""
        with self.lock:
            self.requests.append((method, path))
            for fault in self._faults:
                if fault.method == method and fault.path.search(path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault.action
        return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


_Endpoint = Callable[["_Handler", "re.Match[str]"], _Reply]
_ROUTES: list[tuple[str, re.Pattern[str], _Endpoint]] = []


def _route(*methods: str, pattern: str) -> Callable[[_Endpoint], _Endpoint]:
    def register(endpoint: _Endpoint) -> _Endpoint:
        _ROUTES.extend((method, re.compile(pattern), endpoint) for method in methods)
        return endpoint

    return register


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive front end: reads the whole body first, answers every request with a length."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    body: bytes
    query: dict[str, list[str]]
    user: str | None
    token: str | None

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read `HubServer.requests` instead of a log."""

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        fault = self.hub._take_fault(self.command, url.path)
        if fault == "drop":
            # Part of the body, then a closed socket without a reply: a connection lost mid-upload.
            self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)
            self.close_connection = True
            return
        self.body = self._read_body()
        self.query = parse_qs(url.query)
        try:
            if isinstance(fault, int):
                raise HubError(fault, f"injected fault {fault}")
            self.user = self._authenticate()
            endpoint, match = self._find_route(url.path)
            with self.hub.lock:
                reply = endpoint(self, match)
        except HubError as err:
            reply = _json({"error": err.message}, err.status, {"X-Error-Message": err.message, **err.headers})
            if err.code:
                reply.headers["X-Error-Code"] = err.code
        except (ValueError, KeyError, TypeError) as err:  # a malformed request body or parameter
            reply = _json({"error": f"Bad request: {err!r}"}, 400)
        except Exception as err:  # a server bug: answer it, or the client would retry a dead connection
            traceback.print_exc()
            reply = _json({"error": f"test Hub failure: {err!r}"}, 500)
        self._send(reply)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _read_body(self) -> bytes:
        """The whole body, chunked or not: an unread rest would be parsed as the next kept-alive request."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailer section
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authenticate(self) -> str | None:
        """The token's user (the token is kept in `self.token`); an unknown token is refused everywhere, as by
        the Hub."""
        header = self.headers.get("Authorization")
        self.token = None if header is None else header.removeprefix("Bearer ").strip()
        if self.token is None:
            return None
        user = self.hub.tokens.get(self.token)
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return user

    def _find_route(self, path: str) -> tuple[_Endpoint, re.Match[str]]:
        for method, pattern, endpoint in _ROUTES:
            if method == self.command and (match := pattern.fullmatch(path)):
                return endpoint, match
        raise HubError(404, f"no such endpoint on the test Hub: {self.command} {path}")

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        reply.headers.setdefault("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value.replace("\r", " ").replace("\n", " "))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _json_body(self) -> dict[str, Any]:
        return json.loads(self.body or b"{}")

    def _flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in ("1", "true")

    def _readable(self, match: re.Match[str]) -> _Repo:
        return self.hub._readable(match["type"] or "model", match["repo"], self.user)

    def _writable(self, match: re.Match[str]) -> _Repo:
        return self.hub._writable(match["type"] or "model", match["repo"], self.user, self.token)

    def _accessible(self, match: re.Match[str]) -> _Repo:
        """Readable, and for a gated repo only to its owner (who stands in for users who accepted the terms)."""
        repo = self._readable(match)
        if repo.gated and self.user != repo.owner:
            raise HubError(
                403, f"Access to {repo.repo_id} is restricted: accept its conditions first", "GatedRepo"
            )
        return repo

    # -- account and repositories ----------------------------------------------------------------------------

    @_route("GET", pattern=r"/api/whoami-v2")
    def _whoami(self, match: re.Match[str]) -> _Reply:
        if self.user is None:
            raise HubError(401, "You must be authenticated")
        access = self.hub.token_access.get(self.token or "", {"role": "write"})
        token: dict[str, Any] = {"displayName": "test", "role": access["role"]}
        if access["role"] == "fineGrained":
            token["fineGrained"] = {"canReadGatedRepos": False, "global": [], "scoped": access["scoped"]}
        orgs = [
            {"type": "org", "name": org, "fullname": org, "roleInOrg": members[self.user]}
            for org, members in self.hub.orgs.items()
            if self.user in members
        ]
        auth = {"type": "access_token", "accessToken": token}
        return _json({"type": "user", "name": self.user, "fullname": self.user, "orgs": orgs, "auth": auth})

    def _repo_key(self) -> tuple[str, str, dict[str, Any]]:
        """Type and id of the repo a create/delete body names; only who may write to it may create or delete it."""
        if self.user is None:
            raise HubError(401, "You must be authenticated to create or delete a repository")
        body = self._json_body()
        namespace = body.get("organization") or self.user
        repo_type, repo_id = body.get("type") or "model", f"{namespace}/{body['name']}"
        existing = self.hub._repos.get((repo_type, repo_id))
        if self.hub._refusal(self.user, self.token, repo_type, repo_id, existing) is not None:
            raise HubError(
                403, f"You don't have the rights to create or delete repositories under {namespace}"
            )
        return repo_type, repo_id, body

    @_route("POST", pattern=r"/api/repos/create")
    def _create_repo(self, match: re.Match[str]) -> _Reply:
        repo_type, repo_id, body = self._repo_key()
        url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub._repos:
            return _json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        private = body.get("visibility", "private" if body.get("private") else "public") != "public"
        self.hub._create(repo_type, repo_id, private, gated=False).creator = self.user
        return _json({"url": url, "name": repo_id})

    @_route("DELETE", pattern=r"/api/repos/delete")
    def _delete_repo(self, match: re.Match[str]) -> _Reply:
        repo_type, repo_id, _ = self._repo_key()
        self.hub._readable(repo_type, repo_id, self.user)
        del self.hub._repos[repo_type, repo_id]
        return _Reply()

    # -- commits -----------------------------------------------------------------------------------------------

    @_route("POST", pattern=r"/api/validate-yaml")
    def _validate_yaml(self, match: re.Match[str]) -> _Reply:
        errors = card_errors(self._json_body()["content"])
        return _json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)

    def _commit_base(self, repo: _Repo, rev: str) -> _Commit:
        """A commit goes on top of a branch or PR, or with `create_pr` opens a PR from any revision."""
        return repo.resolve(rev) if self._flag("create_pr") else repo.head(rev)

    @_route("POST", pattern=rf"{_API}/preupload/{_REV}")
    def _preupload(self, match: re.Match[str]) -> _Reply:
        existing = self._commit_base(self._writable(match), unquote(match["rev"])).files
        answers = []
        for item in self._json_body()["files"]:
            path = item["path"]
            lfs = is_lfs(path, item["size"], base64.b64decode(item["sample"]))
            answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in existing and existing[path].lfs == lfs:
                answer["oid"] = existing[path].etag  # lets the client skip an unchanged file
            answers.append(answer)
        return _json({"files": answers})

    @_route("POST", pattern=rf"{_PREFIX}{_REPO}\.git/info/lfs/objects/batch")
    def _lfs_batch(self, match: re.Match[str]) -> _Reply:
        repo = self._writable(match)
        body = self._json_body()
        if body["operation"] != "upload":
            raise HubError(400, "the test Hub serves downloads from resolve/, not from LFS")
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int):
                raise HubError(422, f"invalid LFS object {obj}")
            href = f"{self.hub.url}/_lfs/{repo.repo_type}s/{repo.repo_id}/{oid}"
            actions = (
                None if oid in repo.lfs else {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            )
            objects.append({"oid": oid, "size": size, **({"actions": actions} if actions else {})})
        return _Reply(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    @_route("PUT", pattern=rf"/_lfs/(?P<type>model|dataset|space)s/{_REPO}/(?P<oid>[0-9a-f]{{64}})")
    def _lfs_put(self, match: re.Match[str]) -> _Reply:
        """The upload href: like a presigned storage URL, it needs no token, only the right content."""
        repo = self.hub._repos.get((match["type"], match["repo"]))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if hashlib.sha256(self.body).hexdigest() != match["oid"]:
            raise HubError(400, "content does not match the LFS oid")
        repo.lfs[match["oid"]] = self.body
        self.hub.lfs_uploads[repo.repo_id] += 1
        return _Reply()

    @_route("POST", pattern=rf"/_lfs/(?P<type>model|dataset|space)s/{_REPO}/(?P<oid>[0-9a-f]{{64}})/verify")
    def _lfs_verify(self, match: re.Match[str]) -> _Reply:
        stored = self._writable(match).lfs.get(match["oid"])
        if stored is None or len(stored) != self._json_body()["size"]:
            raise HubError(404, f"LFS object {match['oid']} was not uploaded")
        return _json({})

    @_route("POST", pattern=rf"{_API}/commit/{_REV}")
    def _commit(self, match: re.Match[str]) -> _Reply:
        repo, rev = self._writable(match), unquote(match["rev"])
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        base = self._commit_base(repo, rev)
        if header.get("parentCommit", base.sha) != base.sha:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines:
            key, value = line["key"], line["value"]
            path = value.get("path", "")
            if key == "file":
                files[path] = _File(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in repo.lfs:
                    raise HubError(422, f"LFS object {value['oid']} of {path} was not uploaded")
                files[path] = _File(repo.lfs[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = path.rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(folder)}
            elif key != "header":
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self.hub._new_commit(repo, base, files, header["summary"])
        self.hub.commits[repo.repo_id] += 1
        reply = {"commitOid": commit.sha, "commitUrl": f"{self.hub.url}/{repo.url_path}/commit/{commit.sha}"}
        if self._flag("create_pr"):
            number = max(repo.prs, default=0) + 1
            repo.prs[number] = commit.sha
            reply["pullRequestUrl"] = f"{self.hub.url}/{repo.url_path}/discussions/{number}"
        else:
            repo.move(rev, commit.sha)
        return _json(reply)

    # -- branches, tags, refs ---------------------------------------------------------------------------------

    @_route("POST", pattern=rf"{_API}/branch/(?P<branch>[^/]+)")
    def _create_branch(self, match: re.Match[str]) -> _Reply:
        repo, branch = self._writable(match), unquote(match["branch"])
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: {branch}")
        repo.branches[branch] = repo.resolve(self._json_body().get("startingPoint") or "main").sha
        return _json({})

    @_route("DELETE", pattern=rf"{_API}/branch/(?P<branch>[^/]+)")
    def _delete_branch(self, match: re.Match[str]) -> _Reply:
        repo, branch = self._writable(match), unquote(match["branch"])
        if repo.branches.pop(branch, None) is None:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return _json({})

    @_route("POST", pattern=rf"{_API}/tag/{_REV}")
    def _create_tag(self, match: re.Match[str]) -> _Reply:
        repo, tag = self._writable(match), self._json_body()["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag already exists: {tag}")
        repo.tags[tag] = repo.resolve(unquote(match["rev"])).sha
        return _json({})

    @_route("GET", pattern=rf"{_API}/refs")
    def _refs(self, match: re.Match[str]) -> _Reply:
        repo = self._readable(match)
        refs = {
            "branches": [_ref(name, f"refs/heads/{name}", sha) for name, sha in repo.branches.items()],
            "tags": [_ref(name, f"refs/tags/{name}", sha) for name, sha in repo.tags.items()],
            "converts": [],
        }
        if self._flag("include_prs"):
            refs["pullRequests"] = [_ref(f"refs/pr/{n}", f"refs/pr/{n}", sha) for n, sha in repo.prs.items()]
        return _json(refs)

    @_route("GET", pattern=rf"{_API}/auth-check")
    def _auth_check(self, match: re.Match[str]) -> _Reply:
        self._accessible(match)
        return _json({})

    # -- reading -------------------------------------------------------------------------------------------------

    @_route("GET", pattern=rf"{_API}(?:/revision/{_REV})?")
    def _info(self, match: re.Match[str]) -> _Reply:
        repo = self._readable(match)
        commit = repo.resolve(unquote(match["rev"] or "main"))
        card = _card_data(commit.files.get("README.md"))
        tags = [card["library_name"]] if "library_name" in card else []
        tags += [tag for tag in card.get("tags", []) if tag not in tags]
        siblings = []
        for path, f in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": len(f.data), "blobId": f.oid}
            if f.lfs:
                sibling["lfs"] = {"size": len(f.data), "sha256": f.sha256, "pointerSize": len(f.pointer)}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.owner,
            "sha": commit.sha,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created),
            "tags": tags,
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "siblings": siblings,
            "downloads": 0,
            "likes": 0,
        }
        if card:
            info["cardData"] = card
        return _json(info)

    @_route("GET", pattern=rf"{_API}/tree/{_REV}(?:/(?P<path>.+))?")
    def _tree(self, match: re.Match[str]) -> _Reply:
        files = self._readable(match).resolve(unquote(match["rev"])).files
        base = unquote(match["path"] or "").strip("/")
        prefix = f"{base}/" if base else ""
        recursive = self._flag("recursive")
        entries: dict[str, dict[str, Any]] = {}
        for path, f in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                if folder not in entries:
                    entries[folder] = _folder_entry(files, folder)
            if recursive or len(parts) == 1:
                entries[path] = f.entry(path)
        if base and not entries:
            raise HubError(404, f"{base} does not exist", "EntryNotFound")
        return _json(list(entries.values()))

    @_route("POST", pattern=rf"{_API}/paths-info/{_REV}")
    def _paths_info(self, match: re.Match[str]) -> _Reply:
        files = self._readable(match).resolve(unquote(match["rev"])).files
        entries = []
        for path in parse_qs(self.body.decode()).get("paths", []):
            if path in files:
                entries.append(files[path].entry(path))
            elif any(p.startswith(f"{path}/") for p in files):
                entries.append(_folder_entry(files, path))
        return _json(entries)

    @_route("GET", "HEAD", pattern=rf"{_PREFIX}{_REPO}/resolve/{_REV}/(?P<path>.+)")
    def _resolve(self, match: re.Match[str]) -> _Reply:
        repo = self._accessible(match)
        commit, path = repo.resolve(unquote(match["rev"])), unquote(match["path"])
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        f = commit.files[path]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": str(len(f.data))}
        wanted = self.headers.get("Range")
        if wanted is None:
            return _Reply(200, f.data, headers)
        first, last = _byte_range(wanted, len(f.data))
        headers["Content-Range"] = f"bytes {first}-{last}/{len(f.data)}"
        return _Reply(206, f.data[first : last + 1], headers)


def _card_data(readme: _File | None) -> dict[str, Any]:
    """The front matter the Hub shows as `cardData`: none for a card that `validate-yaml` would refuse."""
    text = readme.data.decode(errors="replace") if readme else ""
    return {} if card_errors(text) else front_matter(text) or {}


def _ref(name: str, ref: str, sha: str) -> dict[str, str]:
    return {"name": name, "ref": ref, "targetCommit": sha}


def _folder_entry(files: dict[str, _File], folder: str) -> dict[str, Any]:
    """A directory's listing entry; its oid hashes what lies below, so it changes when any of that does."""
    digest = hashlib.sha1()
    for path in sorted(p for p in files if p.startswith(f"{folder}/")):
        digest.update(f"{path}\0{files[path].oid}\0".encode())
    return {"type": "directory", "path": folder, "oid": digest.hexdigest()}


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """First and last byte of a single `Range: bytes=...` (resumed downloads send `bytes=N-`)."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.groups() == ("", ""):
        raise HubError(416, f"unsupported range {header!r}", headers={"Content-Range": f"bytes */{size}"})
    if match[1] == "":
        first, last = max(size - int(match[2]), 0), size - 1
    else:
        first, last = int(match[1]), min(int(match[2] or size - 1), size - 1)
    if first >= size or first > last:
        raise HubError(
            416, f"range {header!r} outside {size} bytes", headers={"Content-Range": f"bytes */{size}"}
        )
    return first, last


def start_server(tokens: dict[str, str] | None = None) -> HubServer:
    """A test Hub on a free port of 127.0.0.1, served from a daemon thread until `stop()`."""
    return HubServer(tokens).start()
