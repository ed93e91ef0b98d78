"""NCBI's download server on 127.0.0.1: files under a root folder served at their relative
paths (HEAD, GET, ``Range: bytes=N-`` -> 206), a folder URL answered with an HTML listing as
NCBI's Apache gives it. ``cut_once[name] = N`` sends only N bytes of the next GET of that file
and drops the connection; ``served`` counts the body bytes sent per file name."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class NcbiState:
    root: Path
    cut_once: dict[str, int] = field(default_factory=dict)
    served: Counter[str] = field(default_factory=Counter)
    ranges: list[tuple[str, str | None]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    state: NcbiState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        relative = unquote(urlsplit(self.path).path).lstrip("/")
        target = (self.state.root / relative).resolve()
        if not target.is_relative_to(self.state.root.resolve()) or not target.exists():
            self._reply(404, b"<html>404 Not Found</html>", body)
        elif target.is_dir():
            links = "".join(
                f'<a href="{p.name}">{p.name}</a>  2025-01-01 12:00  1K\n'
                for p in sorted(target.iterdir())
            )
            self._reply(200, f"<html><body><pre>{links}</pre></body></html>".encode(), body)
        else:
            self._file(target, body)

    def _file(self, target: Path, body: bool) -> None:
        data = target.read_bytes()
        header = self.headers.get("Range")
        start = int(header.removeprefix("bytes=").split("-")[0]) if header else 0
        if body:
            self.state.ranges.append((target.name, header))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        cut = self.state.cut_once.pop(target.name, None)
        chunk = data[start : start + cut] if cut is not None else data[start:]
        self.wfile.write(chunk)
        self.state.served[target.name] += len(chunk)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True

    def _reply(self, status: int, payload: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)


@contextmanager
def serve_ncbi(state: NcbiState) -> Iterator[str]:
    """Serve ``state.root``; yields the base URL (``http://127.0.0.1:PORT/``)."""
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
