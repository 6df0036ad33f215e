"""Test helper: an in-memory GCS emulator (gcp-storage-emulator) on a free loopback port."""

from __future__ import annotations

import logging
import socket

DEFAULT_BUCKET = "test-bucket"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload_tree(local_dir: str, url: str) -> int:
    """Copy every file under `local_dir` to gs://BUCKET/PREFIX/<relative path> (as `gsutil cp -r` would); the
    number of objects written. Through the real client (STORAGE_EMULATOR_HOST points it at the emulator)."""
    import os

    from google.cloud import storage

    bucket_name, _, prefix = url[len("gs://"):].partition("/")
    bucket = storage.Client(project="test").bucket(bucket_name)
    count = 0
    for dirpath, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            key = "/".join(p for p in (prefix.strip("/"), os.path.relpath(path, local_dir)) if p)
            bucket.blob(key).upload_from_filename(path)
            count += 1
    return count


class GCSEmulator:
    """Starts/stops the emulator in a background thread; `.url` is what STORAGE_EMULATOR_HOST wants."""

    def __init__(self, bucket: str = DEFAULT_BUCKET):
        self.bucket = bucket
        self.port = None
        self.url = None
        self._server = None

    def start(self) -> str:
        from gcp_storage_emulator.server import create_server

        # The emulator logs every request (and harmless BrokenPipe tracebacks); keep tests quiet.
        logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
        self.port = _free_port()
        self._server = create_server("127.0.0.1", self.port, in_memory=True, default_bucket=self.bucket)
        self._server.start()
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    def wipe(self) -> None:
        """Delete every object (the default bucket stays)."""
        if self._server is not None:
            self._server.wipe(keep_buckets=True)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
