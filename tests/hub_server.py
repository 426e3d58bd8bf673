"""A local Hugging Face Hub for the tests: real HTTP on 127.0.0.1, spoken to by the ordinary `huggingface_hub` client.

`HubServer` implements the part of the Hub API that `huggingface_hub` 2.4 uses to create repos, push to them and pull
from them, closely enough that the client takes its normal code paths and raises its normal errors. Library code under
test knows nothing about it: it only sees an endpoint URL (`HF_ENDPOINT` or `endpoint=`).

Usage in a test (tests/conftest.py registers this module as a plugin, so the `hub_server` fixture is everywhere)::

    def test_push_pull(hub_server, tmp_path):
        token = hub_server.add_user("alice")
        HfApi(token=token).create_repo("alice/pack")      # no endpoint needed: the fixture points the client here
        ...

The `hub_server` fixture starts a fresh server, points `huggingface_hub` (and so `transformers`) at it with
`connect_huggingface_hub` (online mode, an empty cache under `tmp_path`, no implicit token) and undoes all of it after
the test. `set_hub_offline(monkeypatch)` switches the client to offline mode mid-test (`HF_HUB_OFFLINE=1`).

Endpoints served (`{type}` is `models` or `datasets`; a repo id is always `namespace/name`; `{rev}` is a branch name or
a full 40-hex commit id, URL-quoted as one path segment):

    GET    /api/whoami-v2
    POST   /api/repos/create                          {"name", "organization", "type", "visibility"}
    DELETE /api/repos/delete                          {"name", "organization", "type"}
    POST   /api/validate-yaml                         accepts any README.md metadata
    GET    /api/{type}?author=&search=                listing, visible repos only, one page
    GET    /api/{type}/{repo}[/revision/{rev}]        repo info: sha, private, siblings (sizes and LFS with ?blobs=true)
    GET    /api/{type}/{repo}/tree/{rev}[/{path}]     ?recursive=true; files and directories, one page
    GET    /api/{type}/{repo}/refs                    branches (no tags, converts or pull requests)
    GET    /api/{type}/{repo}/commits/{rev}           newest first, one page
    POST   /api/{type}/{repo}/branch/{branch}         {"startingPoint": rev}
    POST   /api/{type}/{repo}/preupload/{rev}         upload mode ("lfs" or "regular") and remote oid per file
    POST   /api/{type}/{repo}/commit/{branch}         NDJSON: header, file, lfsFile, deletedFile, deletedFolder
    POST   /[datasets/]{repo}.git/info/lfs/objects/batch   LFS batch API, "basic" transfer only
    PUT    /lfs-upload/{ticket}                       the basic-transfer upload URL handed out by the batch API
    POST   /[datasets/]{repo}.git/info/lfs/objects/verify
    HEAD   /[datasets/]{repo}/resolve/{rev}/{path}    X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size, Content-Length
    GET    /[datasets/]{repo}/resolve/{rev}/{path}    the file itself, with the same headers

Not served (a 404 naming the request, or a 400): Spaces, organizations, tags, pull requests (`create_pr`), gated
repos, `expand`, `paths-info` (so no `CommitOperationCopy`), multipart LFS uploads, Range requests, pagination (every
listing is one page), redirects (files are served directly from `/resolve`: a redirect to the same host is followed by
the client and changes nothing it sees), Xet (the server never sends `X-Xet-*` headers, so the client downloads over
plain HTTP; `connect_huggingface_hub` also disables Xet uploads, which `hf_xet`, if installed, would otherwise attempt).

Semantics copied from the Hub:
    - `create_repo` makes an initial commit holding the Hub's default `.gitattributes`.
    - Preupload answers "lfs" for a path matched by a `filter=lfs` pattern of that `.gitattributes`, for a file of
      10 MB or more, and for a sample holding a NUL byte (binary); "regular" otherwise.
    - Authentication is `Authorization: Bearer <token>` with a token from `add_user`. An unknown token gets 401
      "Invalid credentials in Authorization header" (the client raises `HfHubHTTPError`). A repo that is missing, or
      private to someone else, gets `X-Error-Code: RepoNotFound` with 401 when anonymous and 404 when authenticated
      (the client raises `RepositoryNotFoundError`). Only the owner (namespace == user name) may write: others get 403,
      anonymous writers 401. Missing revisions and files get `RevisionNotFound` / `EntryNotFound`.
    - ETag: the git blob id for a regular file, the sha256 for an LFS file (also in `X-Linked-Etag`); commit ids are
      40 hex characters; a commit with a stale `parentCommit` gets 412.

What protects downloads (huggingface_hub 2.4, plain HTTP): `hf_hub_download` checks only the number of bytes against
the size announced by the HEAD call (`X-Linked-Size`, else `Content-Length`): a short or long body raises `OSError`
("Consistency check failed") and nothing is left in the cache. It never hashes the bytes, so a body of the right size
with wrong bytes is cached as if it were good, and later calls return it from the cache. `HfApi.verify_repo_checksums`
detects such a file afterwards. `HubServer.corrupt` lets tests produce both cases.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import secrets
import shutil
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest


REPO_TYPES = {"models": "model", "datasets": "dataset"}  # URL segment -> repo type
URL_PREFIXES = {"model": "", "dataset": "datasets/"}  # repo type -> prefix of its web, git and resolve URLs
LFS_SIZE_THRESHOLD = 10 * 1000 * 1000  # files this large are LFS whatever their name
MAX_BODY_SIZE = 512 * 1024 * 1024  # a request body larger than this is refused
SOCKET_TIMEOUT_S = 30  # an idle or stalled connection is dropped after this long

# The `.gitattributes` the Hub puts in the initial commit of a new model or dataset repo (the LFS part of it).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
        "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip


def git_blob_id(data: bytes) -> str:
    """The id git gives a blob holding `data`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class StoredFile:
    """A file in a commit: its content lies in the blob store under `blob_key`."""

    size: int
    oid: str  # git blob id: of the content for a regular file, of the LFS pointer for an LFS file
    sha256: str | None = None  # LFS files only

    @property
    def blob_key(self) -> str:
        """Where the content lies in the blob store; also the file's ETag."""
        return self.sha256 or self.oid

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.sha256 is not None:
            pointer_size = len(lfs_pointer(self.sha256, self.size))
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return entry


@dataclass(frozen=True)
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, StoredFile]  # path -> file: the whole tree at this commit


@dataclass
class Repo:
    type: str  # "model" or "dataset"
    id: str  # "namespace/name"
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit id
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo

    @property
    def owner(self) -> str:
        return self.id.split("/")[0]

    @property
    def url(self) -> str:
        return URL_PREFIXES[self.type] + self.id


class HubError(Exception):
    """An error answer: JSON `{"error": message, **body}` plus the `X-Error-Code` / `X-Error-Message` headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    head_length: int | None = None  # Content-Length a HEAD answer announces (metadata), when it is not len(body)


def json_response(data: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": content_type})


class HubServer:
    """A Hub on `http://127.0.0.1:<free port>`, holding its blobs under `root` (a temporary folder by default).

    Repos and commits live in memory; file contents live on disk, content-addressed (sha256 for LFS files, git blob id
    for regular files). Thread-safe: requests are served concurrently, state changes under one lock.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="hub_server_") if root is None else root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.requests: list[str] = []  # "METHOD /path?query" of every request, in order of arrival
        self.errors: list[str] = []  # tracebacks of requests the server failed on (answered with a 400)
        self._lock = threading.RLock()
        self._users: dict[str, str] = {}  # token -> user name
        self._repos: dict[tuple[str, str], Repo] = {}  # (type, id) -> repo
        self._upload_tickets: dict[str, tuple[Repo, str, int]] = {}  # ticket -> (repo, sha256, size)
        self._corrupted: dict[str, bytes] = {}  # blob key -> bytes served instead of the stored ones
        self._commit_counter = itertools.count()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError("HubServer is already running")
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub_server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wait for the request threads, close the port and delete a temporary `root`."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()  # joins the request threads (each is bounded by SOCKET_TIMEOUT_S)
            assert self._thread is not None
            self._thread.join()
            self._httpd = self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- test controls ---------------------------------------------------------------------------------------------

    def add_user(self, name: str) -> str:
        """Register user `name` (who owns the namespace `name`) and return a new access token for them."""
        token = f"hf_{secrets.token_hex(17)}"
        with self._lock:
            self._users[token] = name
        return token

    def corrupt(
        self, repo_id: str, path: str, *, repo_type: str = "model", revision: str = "main", data: bytes | None = None
    ) -> None:
        """Serve `data` instead of the bytes of `path` (at `revision`), keeping its metadata: size, ETag, commit.

        By default `data` is the stored content with its first byte flipped (same size). The corruption is of the
        stored blob, so every repo and revision holding the same content serves it, until `repair`.
        """
        stored = self._file(repo_id, path, repo_type, revision)
        if data is None:
            original = self._read_blob(stored.blob_key)
            if not original:
                raise ValueError(f"{path} is empty: there is no byte to flip")
            data = bytes([original[0] ^ 0xFF]) + original[1:]
        with self._lock:
            self._corrupted[stored.blob_key] = data

    def repair(self, repo_id: str, path: str, *, repo_type: str = "model", revision: str = "main") -> None:
        """Serve the stored bytes of `path` again, undoing `corrupt`."""
        stored = self._file(repo_id, path, repo_type, revision)
        with self._lock:
            self._corrupted.pop(stored.blob_key, None)

    def _file(self, repo_id: str, path: str, repo_type: str, revision: str) -> StoredFile:
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return self._resolve(repo, revision).files[path]

    # -- storage ---------------------------------------------------------------------------------------------------

    def _blob_path(self, key: str) -> Path:
        return self.root / "blobs" / key

    def _write_blob(self, key: str, data: bytes) -> None:
        path = self._blob_path(key)
        if not path.exists():
            tmp = path.with_name(f"{key}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

    def _read_blob(self, key: str) -> bytes:
        return self._blob_path(key).read_bytes()

    def _served_bytes(self, stored: StoredFile) -> bytes:
        with self._lock:
            corrupted = self._corrupted.get(stored.blob_key)
        return corrupted if corrupted is not None else self._read_blob(stored.blob_key)

    def _new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, StoredFile], title: str, message: str, author: str
    ) -> Commit:
        date = now_iso()
        seed = json.dumps([repo.type, repo.id, parent, title, author, date, next(self._commit_counter)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, author, date, files)
        repo.commits[commit.id] = commit
        return commit

    # -- lookups shared by the routes (called with the lock held) ---------------------------------------------------

    def _caller(self, authorization: str | None) -> str | None:
        """The user behind an `Authorization` header, None when anonymous; an unknown token is a 401."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            user = self._users.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _readable_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and repo.owner != user):
            # The Hub does not tell "missing" from "private": 401 when anonymous, 404 when authenticated.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self._readable_repo(repo_type, repo_id, user)
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if repo.owner != user:
            raise HubError(403, f"You don't have the rights to write to {repo_type} repository {repo_id}")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        commit_id = repo.branches.get(revision, revision)
        if commit_id not in repo.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[commit_id]

    def _branch_head(self, repo: Repo, branch: str) -> Commit:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
        return repo.commits[repo.branches[branch]]

    def _repo_summary(self, repo: Repo) -> dict[str, Any]:
        head = repo.commits[repo.branches["main"]]
        return {
            "_id": hashlib.sha1(f"{repo.type}/{repo.id}".encode()).hexdigest()[:24],
            "id": repo.id,
            "author": repo.owner,
            "sha": head.id,
            "lastModified": head.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
        }

    # -- routes ----------------------------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> Response:
        """Answer one request; `headers` has lower-case names."""
        with self._lock:
            self.requests.append(f"{method} {raw_path}")
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        segments = [unquote(part) for part in url.path.strip("/").split("/")]
        user = self._caller(headers.get("authorization"))

        if segments[0] == "api":
            return self._api(method, segments[1:], query, user, body)
        if method == "PUT" and segments[0] == "lfs-upload" and len(segments) == 2:
            return self._lfs_upload(segments[1], body)
        repo_type = "model"
        if segments[0] == "datasets":
            repo_type, segments = "dataset", segments[1:]
        if len(segments) >= 2 and segments[1].endswith(".git") and segments[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{segments[0]}/{segments[1].removesuffix('.git')}"
            if method == "POST" and segments[5:] == ["batch"]:
                return self._lfs_batch(repo_type, repo_id, user, json.loads(body))
            if method == "POST" and segments[5:] == ["verify"]:
                return self._lfs_verify(repo_type, repo_id, user, json.loads(body))
        if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
            return self._resolve_file(repo_type, "/".join(segments[:2]), segments[3], "/".join(segments[4:]), user)
        raise HubError(404, f"Not served by tests/hub_server.py: {method} {url.path}")

    def _api(self, method: str, segments: list[str], query: dict[str, list[str]], user: str | None, body: bytes):
        route = (method, *segments[:2])
        if route == ("GET", "whoami-v2"):
            return self._whoami(user)
        if route == ("POST", "repos", "create"):
            return self._create_repo(user, json.loads(body))
        if route == ("DELETE", "repos", "delete"):
            return self._delete_repo(user, json.loads(body))
        if route == ("POST", "validate-yaml"):
            return json_response({"errors": [], "warnings": []})
        if segments and segments[0] in REPO_TYPES:
            repo_type = REPO_TYPES[segments[0]]
            if method == "GET" and len(segments) == 1:
                return self._list_repos(repo_type, user, query)
            if len(segments) >= 3:
                repo_id, action, args = f"{segments[1]}/{segments[2]}", segments[3:4], segments[4:]
                if method == "GET" and action in ([], ["revision"]):
                    return self._repo_info(repo_type, repo_id, args[0] if args else "main", user, query)
                if method == "GET" and action == ["tree"] and args:
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]), recursive, user)
                if method == "GET" and action == ["refs"]:
                    return self._refs(repo_type, repo_id, user)
                if method == "GET" and action == ["commits"] and len(args) == 1:
                    return self._commits(repo_type, repo_id, args[0], user)
                if method == "POST" and action == ["branch"] and len(args) == 1:
                    return self._create_branch(repo_type, repo_id, args[0], user, json.loads(body or b"{}"))
                if method == "POST" and action == ["preupload"] and len(args) == 1:
                    return self._preupload(repo_type, repo_id, args[0], user, json.loads(body))
                if method == "POST" and action == ["commit"] and len(args) == 1:
                    if "create_pr" in query:
                        raise HubError(400, "Pull requests are not supported by tests/hub_server.py")
                    return self._commit(repo_type, repo_id, args[0], user, body)
        raise HubError(404, f"Not served by tests/hub_server.py: {method} /api/{'/'.join(segments)}")

    def _whoami(self, user: str | None) -> Response:
        if user is None:
            raise HubError(401, "Invalid username or password.")
        access_token = {"displayName": "hub_server", "role": "write"}
        return json_response(
            {
                "type": "user",
                "name": user,
                "fullname": user,
                "email": None,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": access_token},
            }
        )

    def _create_repo(self, user: str | None, payload: dict[str, Any]) -> Response:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Repo type {repo_type!r} is not supported by tests/hub_server.py")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        with self._lock:
            repo_id = f"{namespace}/{payload['name']}"
            if (repo_type, repo_id) in self._repos:
                existing_url = f"{self.endpoint}/{self._repos[(repo_type, repo_id)].url}"
                # `create_repo(exist_ok=True)` reads the url of the existing repo from this answer.
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": existing_url})
            repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private", created_at=now_iso())
            gitattributes = DEFAULT_GITATTRIBUTES.encode()
            self._write_blob(git_blob_id(gitattributes), gitattributes)
            files = {".gitattributes": StoredFile(len(gitattributes), git_blob_id(gitattributes))}
            repo.branches["main"] = self._new_commit(repo, None, files, "initial commit", "", user).id
            self._repos[(repo_type, repo_id)] = repo
        return json_response({"url": f"{self.endpoint}/{repo.url}", "name": repo_id, "id": repo_id})

    def _delete_repo(self, user: str | None, payload: dict[str, Any]) -> Response:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        with self._lock:
            self._writable_repo(repo_type, repo_id, user)
            del self._repos[(repo_type, repo_id)]
        return Response(200)

    def _list_repos(self, repo_type: str, user: str | None, query: dict[str, list[str]]) -> Response:
        author, search = query.get("author", [None])[0], query.get("search", [""])[0]
        with self._lock:
            found = [
                self._repo_summary(repo)
                for repo in self._repos.values()
                if repo.type == repo_type
                and (not repo.private or repo.owner == user)
                and (author is None or repo.owner == author)
                and search in repo.id
            ]
        return json_response(found)

    def _repo_info(self, repo_type: str, repo_id: str, revision: str, user: str | None, query) -> Response:
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        with self._lock:
            repo = self._readable_repo(repo_type, repo_id, user)
            commit = self._resolve(repo, revision)
            info = {**self._repo_summary(repo), "sha": commit.id, "lastModified": commit.date}
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=stored.size, blobId=stored.oid)
                if stored.sha256 is not None:
                    pointer_size = len(lfs_pointer(stored.sha256, stored.size))
                    sibling["lfs"] = {"sha256": stored.sha256, "size": stored.size, "pointerSize": pointer_size}
            siblings.append(sibling)
        return json_response({**info, "siblings": siblings})

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, recursive: bool, user: str | None):
        with self._lock:
            commit = self._resolve(self._readable_repo(repo_type, repo_id, user), revision)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        files = {name: stored for name, stored in commit.files.items() if name.startswith(prefix)}
        if prefix and not files:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for name, stored in sorted(files.items()):
            parts = name[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # the directories on the way to this file
                directory = prefix + "/".join(parts[:i])
                tree_id = hashlib.sha1(f"{commit.id}:{directory}".encode()).hexdigest()
                entries.setdefault(directory, {"type": "directory", "oid": tree_id, "size": 0, "path": directory})
            if recursive or len(parts) == 1:
                entries[name] = stored.tree_entry(name)
        return json_response(list(entries.values()))

    def _refs(self, repo_type: str, repo_id: str, user: str | None) -> Response:
        with self._lock:
            repo = self._readable_repo(repo_type, repo_id, user)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit_id}
                for name, commit_id in repo.branches.items()
            ]
        return json_response({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_type: str, repo_id: str, revision: str, user: str | None) -> Response:
        with self._lock:
            repo = self._readable_repo(repo_type, repo_id, user)
            commit: Commit | None = self._resolve(repo, revision)
            history = []
            while commit is not None:
                history.append(
                    {
                        "id": commit.id,
                        "title": commit.title,
                        "message": commit.message,
                        "authors": [{"user": commit.author}],
                        "date": commit.date,
                    }
                )
                commit = repo.commits[commit.parent] if commit.parent else None
        return json_response(history)

    def _create_branch(self, repo_type: str, repo_id: str, branch: str, user: str | None, payload) -> Response:
        with self._lock:
            repo = self._writable_repo(repo_type, repo_id, user)
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = self._resolve(repo, payload.get("startingPoint") or "main").id
        return Response(200)

    def _preupload(self, repo_type: str, repo_id: str, revision: str, user: str | None, payload) -> Response:
        with self._lock:
            repo = self._writable_repo(repo_type, repo_id, user)
            head = self._branch_head(repo, revision)
        lfs_patterns = []
        if ".gitattributes" in head.files:
            for line in self._read_blob(head.files[".gitattributes"].blob_key).decode().splitlines():
                pattern, *attributes = line.split() or [""]
                if "filter=lfs" in attributes and not pattern.startswith("#"):
                    lfs_patterns.append(pattern)
        answers = []
        for item in payload["files"]:
            path, size, sample = item["path"], item["size"], base64.b64decode(item["sample"])
            by_name = any(fnmatch.fnmatch(path if "/" in p else path.rsplit("/", 1)[-1], p) for p in lfs_patterns)
            mode = "lfs" if by_name or size >= LFS_SIZE_THRESHOLD or b"\0" in sample else "regular"
            remote = head.files.get(path)
            answers.append(
                {
                    "path": path,
                    "uploadMode": mode,
                    "shouldIgnore": False,
                    "oid": None if remote is None else remote.sha256 or remote.oid,
                }
            )
        return json_response({"files": answers})

    def _lfs_batch(self, repo_type: str, repo_id: str, user: str | None, payload: dict[str, Any]) -> Response:
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "tests/hub_server.py serves LFS uploads with the basic transfer only")
        objects = []
        with self._lock:
            repo = self._writable_repo(repo_type, repo_id, user)
            for item in payload["objects"]:
                answer = {"oid": item["oid"], "size": item["size"]}
                if item["oid"] not in repo.lfs_oids:
                    ticket = secrets.token_urlsafe(16)
                    self._upload_tickets[ticket] = (repo, item["oid"], item["size"])
                    verify_url = f"{self.endpoint}/{repo.url}.git/info/lfs/objects/verify"
                    answer["authenticated"] = True
                    answer["actions"] = {
                        "upload": {"href": f"{self.endpoint}/lfs-upload/{ticket}"},
                        "verify": {"href": verify_url},
                    }
                objects.append(answer)
        return json_response({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, ticket: str, body: bytes) -> Response:
        with self._lock:
            upload = self._upload_tickets.get(ticket)
        if upload is None:
            raise HubError(403, "Unknown or used upload URL")
        repo, sha256, size = upload
        if len(body) != size or hashlib.sha256(body).hexdigest() != sha256:
            raise HubError(400, f"Uploaded content does not match the announced sha256 {sha256} and size {size}")
        self._write_blob(sha256, body)
        with self._lock:
            repo.lfs_oids.add(sha256)
            self._upload_tickets.pop(ticket, None)
        return Response(200)

    def _lfs_verify(self, repo_type: str, repo_id: str, user: str | None, payload: dict[str, Any]) -> Response:
        with self._lock:
            repo = self._writable_repo(repo_type, repo_id, user)
            if payload["oid"] not in repo.lfs_oids:
                raise HubError(404, f"LFS object {payload['oid']} was not uploaded")
        return Response(200)

    def _commit(self, repo_type: str, repo_id: str, branch: str, user: str | None, body: bytes) -> Response:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self._lock:
            repo = self._writable_repo(repo_type, repo_id, user)
            assert user is not None
            head = self._branch_head(repo, branch)
            files = dict(head.files)
            header: dict[str, Any] = {}
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    header = value
                    if header.get("parentCommit") not in (None, head.id):
                        raise HubError(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    data = base64.b64decode(value["content"])
                    self._write_blob(git_blob_id(data), data)
                    files[value["path"]] = StoredFile(len(data), git_blob_id(data))
                elif key == "lfsFile":
                    sha256 = value["oid"]
                    if sha256 not in repo.lfs_oids:
                        raise HubError(400, f"LFS object {sha256} of {value['path']} was not uploaded to {repo_id}")
                    size = self._blob_path(sha256).stat().st_size
                    files[value["path"]] = StoredFile(size, git_blob_id(lfs_pointer(sha256, size)), sha256)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    doomed = [path for path in files if path.startswith(folder)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                    for path in doomed:
                        del files[path]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            title = header.get("summary", "")
            commit = self._new_commit(repo, head.id, files, title, header.get("description", ""), user)
            repo.branches[branch] = commit.id
        return json_response(
            {
                "success": True,
                "commitOid": commit.id,
                "hookOutput": "",
                "commitUrl": f"{self.endpoint}/{repo.url}/commit/{commit.id}",
            }
        )

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str, user: str | None) -> Response:
        with self._lock:
            commit = self._resolve(self._readable_repo(repo_type, repo_id, user), revision)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.id,
            "ETag": f'"{stored.blob_key}"',
        }
        if stored.sha256 is not None:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})
        return Response(200, self._served_bytes(stored), headers, head_length=stored.size)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # so that server_close() joins the request threads
    hub: HubServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers once a request is answered
    timeout = SOCKET_TIMEOUT_S

    def _serve(self) -> None:
        try:
            headers = {name.lower(): value for name, value in self.headers.items()}
            response = self.server.hub.handle(self.command, self.path, headers, self._read_body())
        except HubError as error:
            response = json_response({"error": error.message, **error.body}, error.status)
            response.headers.update(error.headers)
            response.headers["X-Error-Message"] = error.message
            if error.code is not None:
                response.headers["X-Error-Code"] = error.code
        except Exception as error:  # noqa: BLE001  (a request it cannot parse, or a bug in it: fail fast and loudly)
            # 400, not 500: the client retries some calls on a 500, with backoff, for up to half a minute.
            self.server.hub.errors.append(traceback.format_exc())
            message = f"tests/hub_server.py failed on {self.command} {self.path}: {error!r}"
            response = json_response({"error": message}, 400)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        is_head = self.command == "HEAD"
        length = response.head_length if is_head and response.head_length is not None else len(response.body)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if not is_head:
            self.wfile.write(response.body)

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise HubError(411, "tests/hub_server.py needs a Content-Length")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_SIZE:
            raise HubError(413, f"Request body larger than {MAX_BODY_SIZE} bytes")
        return self.rfile.read(length)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # requests are recorded in HubServer.requests instead
        pass


# -- pointing huggingface_hub at a server ----------------------------------------------------------------------------


def connect_huggingface_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache_dir: str | Path) -> None:
    """Make `huggingface_hub` (and `transformers`, which goes through it) use `endpoint`, online, with `cache_dir`.

    `huggingface_hub` reads its settings from the environment once, at import, so setting `HF_ENDPOINT` or
    `HF_HUB_OFFLINE` in a test is not enough: this patches the module constants that hold them, and the default `HfApi`
    behind the module-level functions (`huggingface_hub.create_repo`, ...). It also sets the environment variables, for
    subprocesses. It removes implicit tokens (`HF_TOKEN`, the saved token file) so that only tokens passed explicitly
    (or set with `monkeypatch.setenv("HF_TOKEN", ...)`) reach the server, and disables Xet, which the server does not
    speak. Everything is undone by `monkeypatch` after the test.
    """
    from huggingface_hub import constants, hf_api

    endpoint = endpoint.rstrip("/")
    cache_dir = str(cache_dir)
    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_CACHE": cache_dir,
        "HF_HUB_DISABLE_XET": "1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(Path(cache_dir) / "no_saved_token"))
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


def set_hub_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """Switch `huggingface_hub` (and `transformers`) to offline mode (`HF_HUB_OFFLINE=1`) or back to online mode."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running `HubServer` that `huggingface_hub` talks to, online, with an empty cache at `tmp_path / "hf_cache"`.

    Fails the test if the server failed on a request (see `HubServer.errors`).
    """
    with HubServer(tmp_path / "hub_storage") as server:
        connect_huggingface_hub(monkeypatch, server.endpoint, tmp_path / "hf_cache")
        yield server
        assert not server.errors, "tests/hub_server.py failed on some requests:\n" + "\n".join(server.errors)
