"""A stand-in for the Hugging Face Hub's HTTP API, on localhost, for tests without network.

It serves model and data set repositories held in memory through the endpoints that
``huggingface_hub`` (the real client, unchanged) calls to list and download files: repo info
(``/api/{models,datasets}/ID[/revision/REV]``), the tree listing
(``/api/{models,datasets}/ID/tree/REV``) and file downloads (``[/datasets]/ID/resolve/REV/PATH``,
HEAD and GET). Errors carry the Hub's ``X-Error-Code`` headers (``RepoNotFound``,
``GatedRepo``, ``RevisionNotFound``, ``EntryNotFound``), so the client raises its own
exception classes. Point the client at it with :meth:`FakeHub.patch` (in process) or the
``HF_ENDPOINT`` environment variable (subprocesses).

Every request is logged in :attr:`FakeHub.requests`, so a test can check what was downloaded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

GOOD_TOKEN = "hf_fakehub_good_token"


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str
    gated: bool = False

    def oid(self, path: str) -> str:
        return hashlib.sha1(self.files[path]).hexdigest()


@dataclass
class FakeHub:
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def add(self, repo_id: str, files: dict[str, bytes | str | Path], *, repo_type: str = "model",
            gated: bool = False) -> str:
        """Serve ``files`` (path in repo -> content, or a local file to read) as ``repo_id``;
        returns the commit hash it is served at."""
        content = {name: (value.read_bytes() if isinstance(value, Path)
                          else value.encode() if isinstance(value, str) else value)
                   for name, value in files.items()}
        sha = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest())
                                       for k, v in content.items())).encode()).hexdigest()
        self.repos[(repo_type, repo_id)] = Repo(content, sha, gated)
        return sha

    def downloaded(self, repo_id: str) -> set[str]:
        """The files of ``repo_id`` whose content was requested (GET on ``resolve``)."""
        marker = f"{repo_id}/resolve/"
        found = set()
        for method, path in self.requests:
            if method == "GET" and marker in path:
                found.add(path.split(marker, 1)[1].split("/", 1)[1])
        return found

    # ----------------------------------------------------------------------------------

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def patch(self, monkeypatch) -> None:
        """Point this process's ``huggingface_hub`` at the fake Hub."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.url + "/{repo_id}/resolve/{revision}/{filename}")

    # ----------------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        parts = path.strip("/").split("/")
        repo_type = "model"
        if parts[0] == "api":
            kind = parts[1]
            repo_type = {"models": "model", "datasets": "dataset"}.get(kind, "")
            rest = parts[2:]
            api = True
        else:
            if parts[0] == "datasets":
                repo_type, parts = "dataset", parts[1:]
            rest = parts
            api = False
        if len(rest) < 2:
            return self._error(handler, 404, "RepoNotFound", "Repository not found")
        repo_id = "/".join(rest[:2])
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return self._error(handler, 404, "RepoNotFound",
                               f"Repository Not Found for url: {handler.path}.")
        if repo.gated:
            auth = handler.headers.get("Authorization", "")
            if not auth:
                return self._error(handler, 401, "GatedRepo",
                                   f"Access to model {repo_id} is restricted. You must have "
                                   "access to it and be authenticated to access it.")
            if auth != f"Bearer {GOOD_TOKEN}":
                return self._error(handler, 403, "GatedRepo",
                                   f"Access to model {repo_id} is restricted and you are not in "
                                   "the authorized list.")
        tail = rest[2:]
        if api:
            if not tail or tail[0] == "revision":
                revision = tail[1] if len(tail) > 1 else "main"
                if revision not in ("main", repo.sha):
                    return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
                info = {"id": repo_id, "sha": repo.sha, "private": False,
                        "gated": "auto" if repo.gated else False,
                        "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
                return self._json(handler, info, body)
            if tail[0] == "tree":
                revision = tail[1] if len(tail) > 1 else "main"
                if revision not in ("main", repo.sha):
                    return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
                listing = [{"type": "file", "path": name, "size": len(data), "oid": repo.oid(name)}
                           for name, data in sorted(repo.files.items())]
                return self._json(handler, listing, body)
            return self._error(handler, 404, "", "unknown endpoint")
        if len(tail) < 3 or tail[0] != "resolve":
            return self._error(handler, 404, "", "unknown endpoint")
        revision, name = tail[1], "/".join(tail[2:])
        if revision not in ("main", repo.sha):
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
        if name not in repo.files:
            return self._error(handler, 404, "EntryNotFound", f"{name} does not exist")
        data = repo.files[name]
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("ETag", f'"{repo.oid(name)}"')
        handler.send_header("X-Repo-Commit", repo.sha)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _json(handler: BaseHTTPRequestHandler, value, body: bool) -> None:
        data = json.dumps(value).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _error(handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        handler.send_response(status)
        if code:
            handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
