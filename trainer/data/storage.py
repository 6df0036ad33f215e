"""Tiny storage layer for a dataset location: a local directory or gs://bucket/prefix."""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time

GCS_SCHEME = "gs://"
RETRIES = 4  # attempts after the first one
BACKOFF_S = 0.25


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS_SCHEME)


def open_store(path: str):
    """Returns a LocalStore or GCSStore for `path` (nothing is created or checked yet)."""
    path = str(path)
    if is_gcs(path):
        rest = path[len(GCS_SCHEME):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"bad GCS path (no bucket): {path!r}")
        return GCSStore(bucket, prefix.strip("/"))
    return LocalStore(path)


class LocalStore:
    """Files directly under a local directory."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def list(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root) if os.path.isfile(self._path(n)))

    def read_bytes(self, name: str) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read()

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file."""
        if end <= start:
            return b""
        with open(self._path(name), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Writes atomically (temp file + rename) so readers never see half a file."""
        os.makedirs(self.root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(name))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def size(self, name: str) -> int:
        return os.path.getsize(self._path(name))


# ---------------------------------------------------------------- GCS

_client_lock = threading.Lock()
_client_cache: dict = {}


def gcs_client():
    """One google.cloud.storage.Client per process (and per emulator setting)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    key = (os.getpid(), emulator)
    with _client_lock:
        client = _client_cache.get(key)
        if client is None:
            from google.cloud import storage

            if emulator:
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(
                    project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
                    credentials=AnonymousCredentials(),
                )
            else:
                client = storage.Client()
            _client_cache.clear()
            _client_cache[key] = client
        return client


def _is_transient(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    if isinstance(exc, (gexc.ServiceUnavailable, gexc.TooManyRequests, gexc.InternalServerError,
                        gexc.BadGateway, gexc.GatewayTimeout, gexc.DeadlineExceeded)):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):  # includes ConnectionResetError
        return True
    try:
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            requests.exceptions.ChunkedEncodingError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


def _retry(fn, *args, **kwargs):
    for attempt in range(RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - filtered by _is_transient
            if attempt == RETRIES or not _is_transient(exc):
                raise
            time.sleep(BACKOFF_S * (2 ** attempt) * (1 + random.random()))


def _not_found(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    return isinstance(exc, gexc.NotFound)


class GCSStore:
    """Objects directly under gs://bucket/prefix/ (names never contain '/')."""

    def __init__(self, bucket: str, prefix: str):
        self.bucket_name = bucket
        self.prefix = prefix
        self.url = f"{GCS_SCHEME}{bucket}/{prefix}" if prefix else f"{GCS_SCHEME}{bucket}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _blob(self, name: str):
        return gcs_client().bucket(self.bucket_name).blob(self._key(name))

    def exists(self, name: str) -> bool:
        return bool(_retry(self._blob(name).exists))

    def list(self) -> list[str]:
        start = f"{self.prefix}/" if self.prefix else ""

        def _list():
            blobs = gcs_client().list_blobs(self.bucket_name, prefix=start, delimiter="/")
            return [b.name[len(start):] for b in blobs]

        return sorted(n for n in _retry(_list) if n)

    def read_bytes(self, name: str) -> bytes:
        try:
            return _retry(self._blob(name).download_as_bytes)
        except Exception as exc:
            if _not_found(exc):
                raise FileNotFoundError(f"{self.url}/{name}") from exc
            raise

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object (GCS's own `end` is inclusive)."""
        if end <= start:
            return b""
        try:
            data = _retry(self._blob(name).download_as_bytes, start=start, end=end - 1)
        except Exception as exc:
            if _not_found(exc):
                raise FileNotFoundError(f"{self.url}/{name}") from exc
            raise
        return data

    def write_bytes(self, name: str, data: bytes) -> None:
        _retry(self._blob(name).upload_from_string, data, content_type="application/octet-stream")

    def size(self, name: str) -> int:
        blob = _retry(gcs_client().bucket(self.bucket_name).get_blob, self._key(name))
        if blob is None:
            raise FileNotFoundError(f"{self.url}/{name}")
        return int(blob.size)
