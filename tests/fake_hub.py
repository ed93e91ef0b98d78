"""A Hugging Face Hub stand-in on 127.0.0.1 speaking the file API that ``snapshot_download``
uses (huggingface_hub's hf_api.py and file_download.py):

- ``GET /api/models/{repo}/revision/{rev}``: ``{"id", "sha", "siblings"}``;
- ``GET /api/models/{repo}/tree/{rev}?recursive=...``: ``[{"type", "path", "size", "oid"}]``;
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag``,
  ``Content-Length``, ``Accept-Ranges``; ``Range: bytes=N-`` gives ``206``.

Faults for resume tests: ``cut_once[path] = N`` sends the first GET of that file's full length
header but only N bytes and closes the connection; ``broken`` paths answer 500 until removed.
Every request is logged as (method, url path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_once: dict[str, int] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)

    def add_folder(self, repo_id: str, folder: Path, commit: str, **extra: bytes) -> None:
        files = {
            str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
        self.repos[repo_id] = Repo(commit, files | extra)

    def gets(self, suffix: str) -> list[str | None]:
        """The Range headers of every GET of a file whose URL ends with ``suffix``."""
        return [rng for method, path, rng in self.log if method == "GET" and path.endswith(suffix)]


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.state.log.append((self.command, path, self.headers.get("Range")))
        if path.startswith("/api/models/"):
            recursive = parse_qs(url.query).get("recursive", ["False"])[0].lower() == "true"
            self._api(path.removeprefix("/api/models/"), recursive)
        elif "/resolve/" in path:
            self._file(path.lstrip("/"), body)
        else:
            self._send_json({"error": "not found"}, 404)

    def _api(self, rest: str, recursive: bool) -> None:
        for marker in ("/revision/", "/tree/"):
            if marker in rest:
                repo_id, _, _revision = rest.partition(marker)
                repo = self.state.repos.get(repo_id)
                if repo is None:
                    self._send_json(
                        {"error": "Repository not found"}, 404, error_code="RepoNotFound"
                    )
                elif marker == "/revision/":
                    siblings = [{"rfilename": name} for name in repo.files]
                    self._send_json({"id": repo_id, "sha": repo.commit, "siblings": siblings})
                else:
                    self._send_json(_tree(repo, recursive))
                return
        self._send_json({"error": "not found"}, 404)

    def _file(self, rest: str, body: bool) -> None:
        repo_id, _, tail = rest.partition("/resolve/")
        _revision, _, name = tail.partition("/")
        repo = self.state.repos.get(repo_id)
        if repo is None or name not in repo.files:
            self._send_json({"error": "Entry not found"}, 404, error_code="EntryNotFound")
            return
        if name in self.state.broken:
            self._send_json({"error": "server error"}, 500)
            return
        data = repo.files[name]
        start = _range_start(self.headers.get("Range"))
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        cut = self.state.cut_once.pop(name, None) if self.command == "GET" else None
        if cut is not None:
            self.wfile.write(data[start : start + cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def _send_json(self, payload: object, status: int = 200, error_code: str = "") -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)


def _tree(repo: Repo, recursive: bool) -> list[dict[str, object]]:
    """Files (all, or the top level and its folders, as the hub lists them)."""
    if recursive:
        return [_tree_entry(name, data) for name, data in repo.files.items()]
    top = [_tree_entry(name, data) for name, data in repo.files.items() if "/" not in name]
    folders = sorted({name.split("/")[0] for name in repo.files if "/" in name})
    return top + [{"type": "directory", "path": name, "oid": "0" * 40} for name in folders]


def _tree_entry(name: str, data: bytes) -> dict[str, object]:
    return {
        "type": "file",
        "path": name,
        "size": len(data),
        "oid": hashlib.sha1(data).hexdigest(),  # git's blob id shape; not checked by clients
    }


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header.removeprefix("bytes=").split("-")[0] or 0)


@contextmanager
def serve_hub(state: HubState) -> Iterator[str]:
    """Serve ``state`` on a free loopback port; yields the endpoint URL."""
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
