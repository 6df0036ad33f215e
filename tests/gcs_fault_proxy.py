"""Test helper: an HTTP proxy in front of the GCS emulator that injects transient faults.

Every request (any method, path, query, headers and body, chunked bodies included) is forwarded to the
emulator, except that a fraction `fault_rate` of them, drawn from a seeded RNG, gets a transient fault instead:

  "503"     HTTP 503 Service Unavailable (a JSON error body like GCS's), request not forwarded
  "429"     HTTP 429 Too Many Requests, request not forwarded
  "reset"   the request is read, then the connection is reset (RST, no response), not forwarded
  "timeout" the request is read, then nothing is answered for `delay_s` seconds (a client with a shorter
            timeout times out), then the connection is reset; not forwarded

`latency_s` (default 0) delays every request by that many seconds after it is read, before it is forwarded or
faulted: a round trip to a distant bucket (bench/data.py uses 50 ms).

`counts` says how many requests came in, how many were forwarded and how many faults of each kind were
injected, so a test can prove faults really happened. `fault_rate`, `kinds`, `delay_s` and `latency_s` may be
changed while it runs (e.g. 0 while setting data up, 0.1 during a run). The emulator builds resumable-upload
`Location` and `mediaLink` URLs from the Host header, which is forwarded unchanged, so follow-up requests
come back through the proxy.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gcs_emulator import _free_port

KINDS = ("503", "429", "reset", "timeout")
DEFAULT_KINDS = ("503", "429", "reset")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "content-length"}


class GCSFaultProxy:
    def __init__(self, upstream_url: str, fault_rate: float = 0.0, kinds=DEFAULT_KINDS, seed: int = 0,
                 delay_s: float = 5.0, latency_s: float = 0.0):
        host_port = upstream_url.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.upstream = (host, int(port or 80))
        self.fault_rate = float(fault_rate)
        self.kinds = tuple(kinds)
        self.delay_s = float(delay_s)
        self.latency_s = float(latency_s)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.counts = {"requests": 0, "forwarded": 0, **{k: 0 for k in KINDS}}
        self.by_client = {}  # client (from User-Agent) -> {"requests": n, "faults": n}
        self.port = None
        self.url = None
        self._server = None
        self._thread = None

    # ---------------------------------------------------------------- control
    def start(self) -> str:
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown fault kind {kind!r} (known: {KINDS})")
        self.port = _free_port()
        self._server = _QuietServer(("127.0.0.1", self.port), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="gcs-fault-proxy", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def set_faults(self, rate: float, kinds=None, seed=None) -> None:
        with self._lock:
            self.fault_rate = float(rate)
            if kinds is not None:
                self.kinds = tuple(kinds)
            if seed is not None:
                self._rng = random.Random(seed)

    @property
    def faults(self) -> int:
        """Faults injected so far (all kinds)."""
        with self._lock:
            return sum(self.counts[k] for k in KINDS)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts)

    def reset_counts(self) -> None:
        with self._lock:
            for key in self.counts:
                self.counts[key] = 0
            self.by_client.clear()

    # ---------------------------------------------------------------- per request
    def _draw(self, user_agent: str):
        """Counts the request; returns the fault kind to inject, or None to forward it."""
        with self._lock:
            self.counts["requests"] += 1
            per_client = self.by_client.setdefault(_client_name(user_agent), {"requests": 0, "faults": 0})
            per_client["requests"] += 1
            kind = None
            if self.fault_rate > 0 and self.kinds and self._rng.random() < self.fault_rate:
                kind = self.kinds[self._rng.randrange(len(self.kinds))]
                self.counts[kind] += 1
                per_client["faults"] += 1
            else:
                self.counts["forwarded"] += 1
            return kind


def _client_name(user_agent: str) -> str:
    ua = (user_agent or "").lower()
    for marker, name in (("tensorstore", "tensorstore"), ("gcsfs", "gcsfs"), ("gcloud-python", "google-cloud-storage"),
                         ("gccl", "google-cloud-storage")):
        if marker in ua:
            return name
    return ua.split("/", 1)[0] or "unknown"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients drop connections (after their own timeouts, or when we reset them): nothing to report.
        pass


def _make_handler(proxy: GCSFaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as GCS clients expect

        def log_message(self, *args):  # quiet
            pass

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size_line = self.rfile.readline()
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()  # CRLF after each chunk
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reset(self) -> None:
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close_connection = True
            try:
                self.connection.close()
            except OSError:
                pass

        def _error(self, status: int, reason: str) -> None:
            body = json.dumps({"error": {"code": status, "message": f"injected fault: {reason}",
                                         "errors": [{"message": reason, "reason": reason}]}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            if status == 429 or status == 503:
                self.send_header("Retry-After", "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self):
            body = self._read_body()
            if proxy.latency_s > 0:
                proxy._stopping.wait(proxy.latency_s)
            kind = proxy._draw(self.headers.get("User-Agent", ""))
            if kind == "503":
                return self._error(503, "backendError")
            if kind == "429":
                return self._error(429, "rateLimitExceeded")
            if kind == "reset":
                return self._reset()
            if kind == "timeout":
                proxy._stopping.wait(proxy.delay_s)
                return self._reset()
            self._forward(body)

        def _forward(self, body: bytes) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                resp_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                status, reason = resp.status, resp.reason
            except (OSError, http.client.HTTPException):
                # The emulator itself failed: pass that on as a reset (not counted as injected).
                return self._reset()
            finally:
                conn.close()
            self.send_response(status, reason)
            for k, v in resp_headers:
                self.send_header(k, v)
            if self.command == "HEAD":
                length = resp.getheader("Content-Length")
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                return
            if status not in (204, 304) and not 100 <= status < 200:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    return Handler
