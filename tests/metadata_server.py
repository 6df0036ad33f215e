"""Test helper: a GCE metadata server stand-in serving instance/maintenance-event and instance/preempted."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MetadataServer:
    def __init__(self):
        self.values = {"maintenance-event": "NONE", "preempted": "FALSE"}
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.requests += 1
                key = self.path.split("?")[0].rsplit("/", 1)[-1]
                if self.headers.get("Metadata-Flavor") != "Google" or key not in server.values:
                    self.send_response(403 if key in server.values else 404)
                    self.end_headers()
                    return
                body = server.values[key].encode()
                self.send_response(200)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
