"""A loopback stand-in for the Hugging Face Hub, standard library only (http.server in a thread).

It answers the endpoints huggingface_hub's own client calls to create a repo, commit files (with the pre-upload
step, "regular" upload mode: contents inline in the NDJSON commit, no LFS/Xet) and download them again
(resolve, revision info, tree). Files are stored on disk, one full snapshot folder per commit:

    ROOT/ORG/NAME/repo.json                 {"private", "branches": {name: sha}, "commits": [...]}
    ROOT/ORG/NAME/commits/<sha>/<path>      the files of that commit

Writes need ``Authorization: Bearer <token>`` with a known token whose user may write to the namespace; a request
without a token or with a wrong one gets 401 and stores nothing. Every request is recorded in ``requests`` and any
request the server does not know in ``unhandled``, so a test can see what the client asked for.

Run it by hand:  python tests/hubserver.py --root runs/hub --token SECRET:alice [--port 8765]
then:            HF_ENDPOINT=http://127.0.0.1:8765 HF_TOKEN=SECRET weightspace push soup.safetensors alice/soup
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
WRONG_TOKEN = "Invalid credentials in Authorization header"  # the real Hub's wording for a bad token


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 the Hub reports as oid/ETag for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and "--" not in name and ".." not in name and not name.endswith(".git")


class HubError(Exception):
    """An HTTP error answer: status, message, optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class HubState:
    """Repositories on disk, tokens, and a record of the requests seen."""

    def __init__(self, root: str | os.PathLike, tokens: dict[str, str], orgs: dict[str, set[str]] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)                    # token -> user name
        self.orgs = {u: set(o) for u, o in (orgs or {}).items()}  # user -> organisations they may write to
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status); never headers, so never tokens
        self.unhandled: list[str] = []
        self.endpoint = ""

    # --- repositories ---------------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def meta(self, repo_id: str) -> dict:
        path = self.repo_dir(repo_id) / "repo.json"
        if not path.is_file():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def _write_meta(self, repo_id: str, meta: dict) -> None:
        path = self.repo_dir(repo_id) / "repo.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path)

    def resolve_rev(self, repo_id: str, meta: dict, rev: str) -> str:
        if rev in meta["branches"]:
            return meta["branches"][rev]
        if any(c["sha"] == rev for c in meta["commits"]):
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def files(self, repo_id: str, sha: str) -> dict[str, Path]:
        base = self.repo_dir(repo_id) / "commits" / sha
        return {p.relative_to(base).as_posix(): p for p in sorted(base.rglob("*")) if p.is_file()}

    def repos(self) -> list[str]:
        """Every repo that exists on disk (for tests: 'nothing was stored')."""
        return sorted(p.parent.relative_to(self.root).as_posix() for p in self.root.glob("*/*/repo.json"))

    # --- access ---------------------------------------------------------------------------------------------
    def user_of(self, auth: str | None, required: bool) -> str | None:
        if not auth:
            if required:
                raise HubError(401, "You must be authenticated to access this resource (no token sent)")
            return None
        token = auth[7:] if auth.startswith("Bearer ") else ""
        user = self.tokens.get(token)
        if user is None:
            raise HubError(401, WRONG_TOKEN)
        return user

    def check_write(self, user: str, namespace: str) -> None:
        if namespace != user and namespace not in self.orgs.get(user, set()):
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace}")

    def check_read(self, repo_id: str, meta: dict, user: str | None) -> None:
        if meta["private"] and (user is None or (repo_id.split("/")[0] != user
                                                 and repo_id.split("/")[0] not in self.orgs.get(user, set()))):
            raise HubError(401, "Repository not found", "RepoNotFound")  # the Hub hides private repos

    # --- writes ---------------------------------------------------------------------------------------------
    def create(self, user: str, body: dict) -> dict:
        name, org = body.get("name") or "", body.get("organization") or user
        if not _valid_name(name) or not _valid_name(org):
            raise HubError(400, f"Invalid repo name '{org}/{name}': letters, digits, '-', '_', '.' only")
        if body.get("type") not in (None, "model"):
            raise HubError(400, "this test server only hosts model repos")
        self.check_write(user, org)
        repo_id = f"{org}/{name}"
        with self.lock:
            if (self.repo_dir(repo_id) / "repo.json").is_file():
                # The real Hub names the existing repo's URL; create_repo(exist_ok=True) reads it.
                raise HubError(409, "You already created this model repo", extra={"url": f"{self.endpoint}/{repo_id}"})
            self.repo_dir(repo_id).mkdir(parents=True)
            meta = {"private": body.get("visibility") == "private" or bool(body.get("private")),
                    "branches": {}, "commits": []}
            sha = self._new_commit(repo_id, meta, None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                                   set(), "initial commit")
            meta["branches"]["main"] = sha
            self._write_meta(repo_id, meta)
        return {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}

    def _new_commit(self, repo_id: str, meta: dict, parent: str | None, added: dict[str, bytes], deleted: set[str],
                    summary: str) -> str:
        """Write a full snapshot (parent's files + added − deleted) into a temp folder, then rename it into place."""
        files = {p: f.read_bytes() for p, f in self.files(repo_id, parent).items()} if parent else {}
        for d in deleted:
            for p in [p for p in files if p == d or p.startswith(d.rstrip("/") + "/")]:
                del files[p]
        files.update(added)
        h = hashlib.sha1(f"{parent}|{summary}|{len(meta['commits'])}".encode())
        for p in sorted(files):
            h.update(f"{p}:{git_blob_oid(files[p])}".encode())
        sha = h.hexdigest()
        commits = self.repo_dir(repo_id) / "commits"
        commits.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=commits, prefix=".tmp-"))
        try:
            for p, data in files.items():
                (tmp / p).parent.mkdir(parents=True, exist_ok=True)
                (tmp / p).write_bytes(data)
            os.replace(tmp, commits / sha)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta["commits"].append({"sha": sha, "parent": parent, "summary": summary})
        return sha

    def commit(self, user: str, repo_id: str, rev: str, ndjson: bytes) -> dict:
        self.check_write(user, repo_id.split("/")[0])
        added: dict[str, bytes] = {}
        deleted: set[str] = set()
        header: dict = {}
        for line in ndjson.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                path = _safe_path(value.get("path", ""))
                if value.get("encoding") != "base64":
                    raise HubError(400, f"{path}: only base64 encoding is supported")
                added[path] = base64.b64decode(value.get("content", ""))
            elif key in ("deletedFile", "deletedFolder"):
                deleted.add(_safe_path(value.get("path", "")))
            else:
                raise HubError(422, f"operation '{key}' is not supported by this test server (LFS/Xet/copy)")
        if not header.get("summary"):
            raise HubError(400, "commit header needs a summary")
        with self.lock:
            meta = self.meta(repo_id)
            if rev not in meta["branches"]:
                raise HubError(404, f"Invalid rev id: {rev} (not a branch)", "RevisionNotFound")
            parent = meta["branches"][rev]
            if header.get("parentCommit") not in (None, parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            sha = self._new_commit(repo_id, meta, parent, added, deleted, header["summary"])
            meta["branches"][rev] = sha
            self._write_meta(repo_id, meta)
        return {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True,
                "pullRequestUrl": None}

    def branch(self, user: str, repo_id: str, name: str, body: dict) -> dict:
        self.check_write(user, repo_id.split("/")[0])
        with self.lock:
            meta = self.meta(repo_id)
            if name in meta["branches"]:
                raise HubError(409, f"Reference already exists: {name}")
            meta["branches"][name] = self.resolve_rev(repo_id, meta, body.get("startingPoint") or "main")
            self._write_meta(repo_id, meta)
        return {}

    def preupload(self, user: str, repo_id: str, rev: str, body: dict) -> dict:
        self.check_write(user, repo_id.split("/")[0])
        meta = self.meta(repo_id)
        sha = self.resolve_rev(repo_id, meta, rev) if rev in meta["branches"] else None
        existing = self.files(repo_id, sha) if sha else {}
        out = []
        for f in body.get("files", []):
            path = f.get("path", "")
            oid = git_blob_oid(existing[path].read_bytes()) if path in existing else None
            # "regular": the client sends contents inline in the commit, so this server needs no LFS/Xet.
            out.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return {"files": out, "commitOid": sha}

    # --- reads ----------------------------------------------------------------------------------------------
    def info(self, repo_id: str, rev: str, user: str | None) -> dict:
        meta = self.meta(repo_id)
        self.check_read(repo_id, meta, user)
        sha = self.resolve_rev(repo_id, meta, rev)
        files = self.files(repo_id, sha)
        return {"id": repo_id, "modelId": repo_id, "sha": sha, "private": meta["private"], "disabled": False,
                "gated": False, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": p} for p in files]}

    def tree(self, repo_id: str, rev: str, prefix: str, recursive: bool, user: str | None) -> list[dict]:
        meta = self.meta(repo_id)
        self.check_read(repo_id, meta, user)
        sha = self.resolve_rev(repo_id, meta, rev)
        out, dirs = [], set()
        prefix = prefix.strip("/")
        for p, f in self.files(repo_id, sha).items():
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1:] if prefix else p
            if not recursive and "/" in rest:
                dirs.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            data = f.read_bytes()
            out.append({"type": "file", "path": p, "size": len(data), "oid": git_blob_oid(data)})
        return [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)] + out

    def resolve(self, repo_id: str, rev: str, path: str, user: str | None) -> tuple[str, bytes]:
        meta = self.meta(repo_id)
        self.check_read(repo_id, meta, user)
        sha = self.resolve_rev(repo_id, meta, rev)
        files = self.files(repo_id, sha)
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        return sha, files[path].read_bytes()


def _safe_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubError(400, f"invalid path in repo: {path!r}")
    return path


def _validate_yaml(body: dict) -> dict:
    """Check that a README's front matter is delimited; a stdlib-only server cannot parse YAML itself."""
    content = body.get("content", "")
    errors = []
    if content.startswith("---"):
        if "\n---" not in content[3:]:
            errors.append({"message": "YAML front matter is not closed by '---'"})
    return {"errors": errors, "warnings": []}


class Handler(BaseHTTPRequestHandler):
    """Routes Hub API requests to HubState."""

    protocol_version = "HTTP/1.1"
    server: "HubHTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None, head: bool = False) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)
        with self.server.state.lock:
            self.server.state.requests.append((self.command, urlsplit(self.path).path, status))

    def _error(self, e: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._reply(e.status, {"error": e.message, **e.extra}, headers, head)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        # Split before unquoting: a revision such as refs%2Fpr%2F1 is one segment.
        seg = [unquote(s) for s in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        head = method == "HEAD"
        auth = self.headers.get("Authorization")
        try:
            body = self._body() if method == "POST" else b""
            if method == "POST" and seg == ["api", "repos", "create"]:
                return self._reply(200, state.create(state.user_of(auth, True), json.loads(body or b"{}")))
            if method == "POST" and seg == ["api", "validate-yaml"]:
                state.user_of(auth, False)
                return self._reply(200, _validate_yaml(json.loads(body or b"{}")))
            if method == "GET" and seg == ["api", "agent-harnesses"]:
                return self._reply(200, {"standardEnvVars": [], "harnesses": {}})  # the client's user-agent registry
            if method == "GET" and seg[:2] == ["api", "whoami-v2"]:
                user = state.user_of(auth, True)
                return self._reply(200, {"type": "user", "name": user,
                                         "orgs": [{"name": o} for o in sorted(state.orgs.get(user, ()))]})
            if len(seg) >= 4 and seg[:2] == ["api", "models"]:
                repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
                if method == "GET" and not rest:
                    return self._reply(200, state.info(repo_id, "main", state.user_of(auth, False)))
                if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                    return self._reply(200, state.info(repo_id, rest[1], state.user_of(auth, False)))
                if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return self._reply(200, state.tree(repo_id, rest[1], "/".join(rest[2:]), recursive,
                                                       state.user_of(auth, False)))
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return self._reply(200, state.preupload(state.user_of(auth, True), repo_id, rest[1],
                                                            json.loads(body or b"{}")))
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return self._reply(200, state.commit(state.user_of(auth, True), repo_id, rest[1], body))
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    return self._reply(200, state.branch(state.user_of(auth, True), repo_id, rest[1],
                                                         json.loads(body or b"{}")))
            if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
                repo_id = f"{seg[0]}/{seg[1]}"
                sha, data = state.resolve(repo_id, seg[3], "/".join(seg[4:]), state.user_of(auth, False))
                headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"',
                           "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
                return self._reply(200, data, headers, head=head)
            with state.lock:
                state.unhandled.append(f"{method} {self.path}")
            return self._error(HubError(404, f"test hub server: no route for {method} {url.path}"), head)
        except HubError as e:
            return self._error(e, head)
        except (ValueError, KeyError) as e:
            return self._error(HubError(400, f"bad request: {e}"), head)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")


class HubHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that carries the HubState."""

    daemon_threads = True

    def __init__(self, state: HubState, port: int = 0):
        super().__init__(("127.0.0.1", port), Handler)
        self.state = state
        state.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """Start the loopback Hub in a background thread: ``with HubServer(root, {"tok": "alice"}) as hub: hub.url``."""

    def __init__(self, root: str | os.PathLike, tokens: dict[str, str], orgs: dict[str, set[str]] | None = None,
                 port: int = 0):
        self.state = HubState(root, tokens, orgs)
        self.httpd = HubHTTPServer(self.state, port)
        self.url = self.state.endpoint
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hubserver", daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def main() -> None:
    """Serve until interrupted."""
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="folder where repositories are stored")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", action="append", default=[], help="TOKEN:USER (repeatable)")
    p.add_argument("--org", action="append", default=[], help="USER:ORG, USER may write to ORG (repeatable)")
    a = p.parse_args()
    tokens = dict(t.rsplit(":", 1) for t in a.token)
    orgs: dict[str, set[str]] = {}
    for o in a.org:
        user, org = o.split(":", 1)
        orgs.setdefault(user, set()).add(org)
    state = HubState(a.root, tokens, orgs)
    httpd = HubHTTPServer(state, a.port)
    print(f"serving the test Hub at {state.endpoint} (repos under {a.root}); Ctrl-C stops", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
