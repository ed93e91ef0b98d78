"""A local HTTP server that records every request it gets and answers ``{}``: the stand-in
for LangSmith (or any endpoint a regression might send data to), so a leak is captured here
and never sent anywhere.

In-process: ``CaptureServer()`` (a context manager; ``.url``, ``.requests``). As a process:
``python -m tests.capture_server LOG`` serves on 127.0.0.1, prints its URL on one line, and
appends one line per request to LOG (method, path, body size)."""

from __future__ import annotations

import http.server
import sys
import threading
from pathlib import Path
from typing import Any, Self


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.record(f"{self.command} {self.path} {len(body)}")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_GET(self) -> None:
        self._record()

    def do_POST(self) -> None:
        self._record()

    def do_PATCH(self) -> None:
        self._record()

    def do_PUT(self) -> None:
        self._record()

    def log_message(self, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self, log: Path | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.log = log
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def record(self, line: str) -> None:
        with self.lock:
            self.requests.append(line)
            if self.log is not None:
                with self.log.open("a", encoding="utf-8") as handle:
                    handle.write(line + "\n")


class CaptureServer:
    def __init__(self, log: Path | None = None) -> None:
        self.server = _Server(log)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def requests(self) -> list[str]:
        return self.server.requests

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    capture = _Server(Path(sys.argv[1]))
    print(f"http://127.0.0.1:{capture.server_port}", flush=True)
    capture.serve_forever()
