"""A small in-memory stand-in for the Hugging Face Hub HTTP API, for tests without network.

Only the standard library is used. It serves the part of the API that the real ``huggingface_hub``
client (2.x) calls for ``create_repo``, ``create_branch``, ``create_commit`` / ``upload_file`` /
``upload_folder`` (preupload, Git LFS "basic" transfer, NDJSON commit), ``repo_info``,
``list_repo_tree`` / ``list_repo_files``, ``hf_hub_download`` and ``snapshot_download``, so tests run the
client's own code end to end against ``HfApi(endpoint=hub.url)``.

Two servers share one state, both on 127.0.0.1 but on different ports, because the real Hub also
spans two origins:

* the *Hub* (``hub.url``): the JSON API, ``/resolve/`` and the LFS batch/verify endpoints;
* a *storage* origin (``hub.storage_url``) standing in for S3/CloudFront: LFS uploads (PUT to the
  href the batch endpoint hands out) and LFS downloads (``/resolve/`` of an LFS file answers 302 to
  it). Being another origin matters: the client keeps the metadata of the 302 itself, follows it
  only for the GET, and drops the ``Authorization`` header on the way, as it does with the real CDN.

Not implemented: Xet storage (tests must set ``huggingface_hub.constants.HF_HUB_DISABLE_XET``, so
the client takes its plain LFS path), pull requests, tags, multipart LFS uploads, ``.gitignore``,
byte ranges and anything not listed above; an unknown route answers 404 and is recorded in
``hub.unhandled`` so a test can assert that nothing fell through.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".parquet", ".arrow")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub sends files over 10 MB to LFS whatever their content
DEFAULT_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid`` / ``ETag`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class RepoEntry:
    """One file of a commit. LFS content lives in the shared object store, keyed by sha256.

    The ids are fixed when the file is committed (as in git), so ``MockHub.corrupt_file`` can change
    the stored bytes behind them.
    """

    size: int
    sha256: str
    git_oid: str  # of the blob, or of the LFS pointer for LFS files
    lfs: bool
    content: bytes | None = None  # regular files only

    @classmethod
    def regular(cls, data: bytes) -> RepoEntry:
        return cls(len(data), hashlib.sha256(data).hexdigest(), git_blob_oid(data), False, data)

    @classmethod
    def large(cls, sha256: str, size: int) -> RepoEntry:
        return cls(size, sha256, git_blob_oid(lfs_pointer(sha256, size)), True)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, RepoEntry]
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)


class HubError(Exception):
    """Raised inside a handler: becomes an HTTP error with the Hub's ``X-Error-Code`` header."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class _Server(ThreadingHTTPServer):
    """A threading server that can end its keep-alive connections, so ``close()`` really joins."""

    daemon_threads = False  # server_close() joins the handler threads...
    block_on_close = True

    def __init__(self, hub: MockHub, role: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.role = hub, role
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def close_connections(self) -> None:
        # ...which only ends once idle keep-alive connections (the client pools them) are shut down
        with self.connections_lock:
            for conn in list(self.connections):
                with contextlib.suppress(OSError):  # already closed by the client
                    conn.shutdown(socket.SHUT_RDWR)


class MockHub:
    """The mock Hub. Use as a context manager, or call ``start()`` / ``close()``.

    Args:
        token: when set, writes (and reads of private repos) need ``Authorization: Bearer <token>``;
            when ``None`` every request is accepted.
        page_size: entries per page of the tree listing (the Hub uses 1000); small values exercise
            the client's ``Link``-header pagination.
    """

    def __init__(self, token: str | None = None, page_size: int = 1000):
        self.token = token
        self.page_size = page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content: the "S3 bucket"
        self.requests: list[tuple[str, str, str]] = []  # (role, method, path) of every request
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._counter = 0

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> MockHub:
        for role in ("hub", "storage"):
            server = _Server(self, role)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.02},
                name=f"mock-hub-{role}",
                daemon=True,
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()  # stops serve_forever
            server.close_connections()
            server.server_close()  # joins the handler threads
        for thread in self._threads:
            thread.join(timeout=10)
        self._servers, self._threads = [], []

    def __enter__(self) -> MockHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        host, port = self._servers[0].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def storage_url(self) -> str:
        host, port = self._servers[1].server_address[:2]
        return f"http://{host}:{port}"

    # ---- helpers for tests ----------------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        """Path -> content of every file of ``repo_id`` at ``revision``."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            commit = self._commit(repo, revision)
            return {p: self._content(e) for p, e in commit.files.items()}

    def corrupt_file(self, repo_id: str, path: str, data: bytes, repo_type: str = "dataset") -> None:
        """Replace the stored bytes of a file *without* a commit: its oid, sha256 and ETag stay the
        same, as after silent storage corruption or a tampering mirror."""
        with self.lock:
            entry = self._commit(self.repo(repo_id, repo_type), "main").files[path]
            if entry.lfs:
                self.lfs_objects[entry.sha256] = data
            else:
                entry.content = data

    # ---- state ----------------------------------------------------------------------------------

    def _content(self, entry: RepoEntry) -> bytes:
        return self.lfs_objects[entry.sha256] if entry.lfs else entry.content  # type: ignore[return-value]

    def _new_commit(self, repo: Repo, parent: str | None, title: str, files: dict[str, RepoEntry]) -> Commit:
        self._counter += 1
        listing = json.dumps(sorted((p, e.git_oid) for p, e in files.items()))
        oid = hashlib.sha1(
            f"{repo.repo_id}\n{parent}\n{title}\n{listing}\n{self._counter}".encode()
        ).hexdigest()
        commit = Commit(oid=oid, parent=parent, title=title, files=files)
        repo.commits[oid] = commit
        return commit

    def _commit(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if COMMIT_RE.fullmatch(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool, write: bool = False) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        return repo


_BATCH_RE = re.compile(
    r"^/(?P<prefix>datasets/|spaces/)?(?P<ns>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/(?P<op>batch|verify)$"
)
_RESOLVE_RE = re.compile(
    r"^/(?P<prefix>datasets/|spaces/)?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects from the Hub
    # one write per response, sent at once: an unbuffered header write followed by the body would
    # meet Nagle's algorithm and delayed ACKs and cost ~40 ms per request
    wbufsize = -1
    disable_nagle_algorithm = True
    server: _Server
    _raw_body: bytes = b""

    # ---- plumbing -------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # keep pytest output clean; requests are recorded in hub.requests

    @property
    def hub(self) -> MockHub:
        return self.server.hub

    def _read_body(self) -> bytes:
        """The request body, whether sent with Content-Length or chunked (file uploads may be)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _body(self) -> bytes:
        return self._raw_body

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"invalid JSON body: {err}") from None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _dispatch(self) -> None:
        self.hub.requests.append((self.server.role, self.command, self.path))
        # read the body up front, whatever the route does with it: an unread body would be parsed
        # as the next request on this keep-alive connection
        self._raw_body = self._read_body()
        try:
            with self.hub.lock:
                handled = (self._route_hub if self.server.role == "hub" else self._route_storage)()
            if not handled:
                self.hub.unhandled.append((self.command, self.path))
                raise HubError(404, f"mock hub: no route for {self.command} {self.path}")
        except HubError as err:
            headers = {}
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            self._send_json({"error": err.message}, err.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch  # noqa: N815 - http.server's names

    # ---- storage origin (S3 / CDN stand-in) -----------------------------------------------------

    def _route_storage(self) -> bool:
        path = urlsplit(self.path).path
        kind, _, oid = path.strip("/").partition("/")
        if kind == "upload" and self.command == "PUT":
            data = self._body()
            expected_size = int(parse_qs(urlsplit(self.path).query).get("size", ["-1"])[0])
            if hashlib.sha256(data).hexdigest() != oid or len(data) != expected_size:
                raise HubError(400, "uploaded content does not match its sha256 or size")
            self.hub.lfs_objects[oid] = data
            self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
            return True
        if kind == "lfs" and self.command in ("GET", "HEAD"):
            data = self.hub.lfs_objects.get(oid)
            if data is None:
                raise HubError(404, "no such object")
            self._send(200, data, {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"'})
            return True
        return False

    # ---- Hub origin -----------------------------------------------------------------------------

    def _route_hub(self) -> bool:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        if path == "/api/repos/create" and self.command == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and self.command == "POST":
            return self._validate_yaml()
        if match := _BATCH_RE.match(path):
            repo_type = (
                "dataset" if match["prefix"] == "datasets/" else "space" if match["prefix"] else "model"
            )
            repo = self.hub._get_repo(
                repo_type, f"{match['ns']}/{match['name']}", self._authorized(), write=True
            )
            return self._lfs_batch(repo) if match["op"] == "batch" else self._lfs_verify()
        if match := _RESOLVE_RE.match(path):
            if self.command not in ("GET", "HEAD"):
                return False
            repo_type = (
                "dataset" if match["prefix"] == "datasets/" else "space" if match["prefix"] else "model"
            )
            repo = self.hub._get_repo(repo_type, f"{match['ns']}/{match['name']}", self._authorized())
            return self._resolve(repo, unquote(match["rev"]), unquote(match["path"]))
        parts = [unquote(p) for p in path.split("/")[1:]]
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in REPO_TYPES:
            repo_type, repo_id, rest = REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            return self._repo_api(repo_type, repo_id, rest, query)
        return False

    def _repo_api(self, repo_type: str, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> bool:
        auth = self._authorized()
        if self.command == "GET" and (not rest or (len(rest) == 2 and rest[0] == "revision")):
            repo = self.hub._get_repo(repo_type, repo_id, auth)
            return self._repo_info(repo, rest[1] if rest else "main", query)
        if self.command == "GET" and len(rest) >= 2 and rest[0] == "tree":
            repo = self.hub._get_repo(repo_type, repo_id, auth)
            return self._tree(repo, rest[1], "/".join(rest[2:]), query)
        if self.command == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._preupload(self.hub._get_repo(repo_type, repo_id, auth, write=True), rest[1], query)
        if self.command == "POST" and len(rest) == 2 and rest[0] == "commit":
            return self._commit(self.hub._get_repo(repo_type, repo_id, auth, write=True), rest[1], query)
        if self.command == "POST" and len(rest) == 2 and rest[0] == "branch":
            return self._create_branch(self.hub._get_repo(repo_type, repo_id, auth, write=True), rest[1])
        return False

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.hub.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # POST /api/repos/create  {"name", "organization", "type", "visibility"}
    def _create_repo(self) -> bool:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX or not payload.get("organization") or not payload.get("name"):
            raise HubError(400, "mock hub: repos need a type and a namespace/name")
        repo_id = f"{payload['organization']}/{payload['name']}"
        key = (repo_type, repo_id)
        if key in self.hub.repos:
            # the Hub answers 409 with the url; create_repo(exist_ok=True) reads it from this body
            self._send_json(
                {
                    "error": f"You already created this {repo_type} repo",
                    "url": self._repo_url(self.hub.repos[key]),
                },
                409,
            )
            return True
        repo = Repo(repo_type, repo_id, private=payload.get("visibility", "public") != "public")
        # like the Hub, a new repo starts with one commit holding the default .gitattributes
        entry = RepoEntry.regular(DEFAULT_GITATTRIBUTES.encode())
        commit = self.hub._new_commit(repo, None, "initial commit", {".gitattributes": entry})
        repo.branches["main"] = commit.oid
        self.hub.repos[key] = repo
        self._send_json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})
        return True

    # POST /api/validate-yaml {"content", "repoType"}: the README.md metadata check before a commit
    def _validate_yaml(self) -> bool:
        content = self._json_body().get("content", "")
        lines = content.splitlines()
        if not lines or lines[0].strip() != "---" or "---" not in [x.strip() for x in lines[1:]]:
            self._send_json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        else:
            self._send_json({"errors": [], "warnings": []})
        return True

    # GET /api/{type}s/{ns}/{name}[/revision/{rev}]
    def _repo_info(self, repo: Repo, revision: str, query: dict[str, list[str]]) -> bool:
        commit = self.hub._commit(repo, revision)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
                    }
            siblings.append(sibling)
        ns, _ = repo.repo_id.split("/")
        self._send_json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": ns,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(e.size for e in commit.files.values()),
            }
        )
        return True

    # GET /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]?recursive=&expand=&cursor=
    def _tree(self, repo: Repo, revision: str, prefix: str, query: dict[str, list[str]]) -> bool:
        commit = self.hub._commit(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        base = prefix.strip("/")
        entries: dict[str, dict[str, Any]] = {}
        for path, entry in commit.files.items():
            if base and not path.startswith(base + "/"):
                continue
            rel = path[len(base) + 1 :] if base else path
            parts = rel.split("/")
            # the folders on the way down are entries too (all of them when recursive)
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = "/".join(([base] if base else []) + parts[:depth])
                entries.setdefault(
                    folder,
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(folder.encode()).hexdigest(),
                        "size": 0,
                        "path": folder,
                    },
                )
            if recursive or len(parts) == 1:
                item: dict[str, Any] = {
                    "type": "file",
                    "oid": entry.git_oid,
                    "size": entry.size,
                    "path": path,
                }
                if entry.lfs:
                    item["lfs"] = {
                        "oid": entry.sha256,
                        "size": entry.size,
                        "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
                    }
                entries[path] = item
        if base and not entries and base not in commit.files:
            raise HubError(404, f"{base} does not exist on {revision}", "EntryNotFound", commit.oid)
        listing = [entries[k] for k in sorted(entries)]
        start = int(query.get("cursor", ["0"])[0])
        page = listing[start : start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(listing):
            # cursor pagination with a Link header, like the Hub (and GitHub)
            params = f"recursive={str(recursive).lower()}&expand=false&cursor={start + self.hub.page_size}"
            next_url = f"{self.hub.url}{urlsplit(self.path).path}?{params}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(page, headers=headers)
        return True

    # POST /api/{type}s/{ns}/{name}/preupload/{rev}  {"files": [{"path", "sample", "size"}]}
    def _preupload(self, repo: Repo, revision: str, query: dict[str, list[str]]) -> bool:
        if query.get("create_pr"):
            raise HubError(400, "mock hub: pull requests are not supported")
        commit = self.hub._commit(repo, revision)
        out = []
        for item in self._json_body().get("files", []):
            sample = base64.b64decode(item["sample"])
            lfs = (
                item["path"].endswith(LFS_SUFFIXES)  # the default .gitattributes
                or b"\x00" in sample  # binary content
                or item["size"] > LFS_THRESHOLD
            )
            existing = commit.files.get(item["path"])
            # the oid lets the client skip unchanged files: sha256 for LFS files, git oid otherwise
            oid = None if existing is None else existing.sha256 if existing.lfs else existing.git_oid
            out.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        self._send_json({"files": out, "commitOid": commit.oid})
        return True

    # POST /{prefix}{ns}/{name}.git/info/lfs/objects/batch  (Git LFS batch API, "basic" transfer)
    def _lfs_batch(self, repo: Repo) -> bool:
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "mock hub: only LFS uploads go through the batch API")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            if oid in self.hub.lfs_objects:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, no upload
                continue
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.hub.storage_url}/upload/{oid}?size={size}"},
                        "verify": {"href": f"{self._repo_url(repo)}.git/info/lfs/objects/verify"},
                    },
                }
            )
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )
        return True

    # POST {repo}.git/info/lfs/objects/verify  {"oid", "size"}
    def _lfs_verify(self) -> bool:
        payload = self._json_body()
        data = self.hub.lfs_objects.get(payload.get("oid", ""))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, "object not found or of the wrong size")
        self._send_json({"success": True})
        return True

    # POST /api/{type}s/{ns}/{name}/commit/{rev}  (NDJSON: header, file, lfsFile, deletedFile, deletedFolder)
    def _commit(self, repo: Repo, revision: str, query: dict[str, list[str]]) -> bool:
        if query.get("create_pr"):
            raise HubError(400, "mock hub: pull requests are not supported")
        if self.headers.get("Content-Type", "").split(";")[0] != "application/x-ndjson":
            raise HubError(400, "the commit payload must be application/x-ndjson")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        files = dict(head.files)
        header: dict[str, Any] | None = None
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                continue
            path = value["path"]
            if key in ("file", "lfsFile") and (path.startswith("/") or ".." in path.split("/")):
                raise HubError(400, f"invalid path {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "mock hub: regular files must be base64-encoded")
                data = base64.b64decode(value["content"])
                if b"\x00" in data or len(data) > LFS_THRESHOLD:
                    # the Hub refuses binary or large files outside LFS
                    raise HubError(400, f"{path} is binary or too large: it must be uploaded with LFS")
                files[path] = RepoEntry.regular(data)
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} of {path} was never uploaded")
                files[path] = RepoEntry.large(value["oid"], len(data))
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound", head.oid)
            elif key == "deletedFolder":
                folder = path.rstrip("/") + "/"
                files = {p: e for p, e in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"mock hub: unsupported commit operation {key!r}")
        if header is None or not header.get("summary"):
            raise HubError(400, "the commit needs a header with a summary")
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise HubError(412, f"parentCommit {parent} is not the head of {revision} ({head.oid})")
        commit = self.hub._new_commit(repo, head.oid, header["summary"], files)
        repo.branches[revision] = commit.oid
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "pullRequestUrl": None,
            }
        )
        return True

    # POST /api/{type}s/{ns}/{name}/branch/{branch}  {"startingPoint"?}
    def _create_branch(self, repo: Repo, branch: str) -> bool:
        start = self._json_body().get("startingPoint") or "main"
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self.hub._commit(repo, start).oid
        self._send_json({"success": True})
        return True

    # HEAD|GET /{prefix}{ns}/{name}/resolve/{rev}/{path}
    def _resolve(self, repo: Repo, revision: str, path: str) -> bool:
        commit = self.hub._commit(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit.oid)
        headers = {"X-Repo-Commit": commit.oid, "Content-Type": "application/octet-stream"}
        if entry.lfs:
            # like the Hub: a redirect to the storage origin, with the file's metadata on the redirect
            headers.update(
                {
                    "Location": f"{self.hub.storage_url}/lfs/{entry.sha256}",
                    "ETag": f'"{entry.git_oid}"',
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(entry.size),
                }
            )
            self._send(302, b"", headers)
        else:
            headers["ETag"] = f'"{entry.git_oid}"'
            self._send(200, self.hub._content(entry), headers)
        return True


__all__ = ["MockHub", "RepoEntry", "git_blob_oid", "lfs_pointer"]
