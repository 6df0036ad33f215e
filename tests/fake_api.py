"""Test helper: the scaffolding our fake Google REST APIs share (threaded HTTP server, tick thread, request log).

A subclass implements `respond(method, path, query, body) -> (status, payload)`, `error_body(code, message)`
(the API's JSON error shape) and `advance()` (one step of its state machine, called every tick).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit


class FakeApiError(Exception):
    """An error the handler turns into the API's JSON error response (`code` is the HTTP status)."""

    code: int

    def body(self) -> dict:
        raise NotImplementedError


class FakeApiServer:
    """`start()` returns the base URL (http://127.0.0.1:PORT); `shutdown()`; a context manager."""

    thread_name = "fake-api-server"

    def __init__(self, tick_s: float):
        self.tick_s = tick_s
        self.requests: list[tuple[str, str]] = []  # (method, path without query), in arrival order
        self.url = ""
        self._lock = threading.RLock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # to implement --------------------------------------------------------------------------------
    def respond(self, method: str, path: str, query: dict[str, str], body: dict) -> tuple[int, dict]:
        raise NotImplementedError

    def error_body(self, code: int, message: str) -> dict:
        raise NotImplementedError

    def advance(self) -> None:
        raise NotImplementedError

    # lifecycle -----------------------------------------------------------------------------------
    def start(self) -> str:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        serve = lambda: self._httpd.serve_forever(poll_interval=0.02)  # noqa: E731 (fast stop())
        for target in (serve, self._tick_loop):
            thread = threading.Thread(target=target, daemon=True, name=self.thread_name)
            thread.start()
            self._threads.append(thread)
        return self.url

    def shutdown(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def count(self, method: str, suffix: str) -> int:
        """How many logged requests had this method and a path ending with `suffix`."""
        return sum(1 for m, p in list(self.requests) if m == method and p.endswith(suffix))

    def _tick_loop(self) -> None:
        while not self._stop.wait(min(0.02, self.tick_s / 4)):
            self.advance()


def _make_handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else keep-alive + delayed ACKs cost ~40 ms per request

        def _serve(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            api.requests.append((self.command, url.path))
            try:
                body = json.loads(raw) if raw.strip() else {}
                status, payload = api.respond(self.command, url.path, query, body)
            except FakeApiError as exc:
                status, payload = exc.code, exc.body()
            except json.JSONDecodeError as exc:
                status, payload = 400, api.error_body(400, str(exc))
            except Exception as exc:  # a server bug: answer 500 rather than drop the connection
                status, payload = 500, api.error_body(500, repr(exc))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler
