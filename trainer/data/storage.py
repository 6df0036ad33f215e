"""Tiny storage layer for a dataset location: a local directory or gs://bucket/prefix."""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time

GCS_SCHEME = "gs://"
# Every GCS request of ours is retried on transient errors (see `_is_transient`): up to RETRIES more attempts,
# waiting BACKOFF_S * 2**attempt * (1 + jitter in [0, 1)), at most MAX_BACKOFF_S, in between (about 1 min in all).
RETRIES = 8
BACKOFF_S = 0.25
MAX_BACKOFF_S = 16.0
TIMEOUT_S = 60.0  # per HTTP request (connect and each read); a request that hangs longer is retried


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


_RETRY_CODES = (408, 429, 500, 502, 503, 504)


def _is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: HTTP 408, 429, 500, 502, 503, 504, connection errors (refused, reset,
    closed mid-response), timeouts, and a download whose checksum did not match (a truncated body).

    Built on public classes only (the storage client's own predicate is private): the same list it retries.
    """
    import http.client

    import requests
    import urllib3
    from google.api_core import exceptions as gexc
    from google.api_core.retry import if_transient_error
    from google.auth import exceptions as auth_exc
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

    if isinstance(exc, gexc.GoogleAPICallError):
        return exc.code in _RETRY_CODES
    if isinstance(exc, InvalidResponse):  # a raw (resumable-media) response with an HTTP error status
        return getattr(getattr(exc, "response", None), "status_code", None) in _RETRY_CODES
    if isinstance(exc, (ConnectionError, TimeoutError)):  # includes ConnectionResetError, RemoteDisconnected
        return True
    if isinstance(exc, DataCorruption):  # checksum mismatch: a truncated or garbled download
        return True
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        requests.exceptions.ChunkedEncodingError, http.client.IncompleteRead,
                        http.client.BadStatusLine, http.client.ResponseNotReady,
                        urllib3.exceptions.PoolError, urllib3.exceptions.ProtocolError,
                        urllib3.exceptions.SSLError, urllib3.exceptions.TimeoutError)):
        return True
    if isinstance(exc, auth_exc.TransportError):  # token refresh could not reach the metadata server
        return True
    return bool(if_transient_error(exc))


def is_transient_failure(exc: BaseException) -> bool:
    """True if `exc`, or an exception it came from, is a transient storage error that outlasted the retries
    of the client that raised it: ours (`_is_transient`), gcsfs (its own retriable list) or tensorstore
    ("All N retry attempts failed"). Such a failure says nothing about the data or checkpoint it was reading."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _is_transient(exc) or "retry attempts failed" in str(exc):
            return True
        try:
            from gcsfs.retry import is_retriable

            if is_retriable(exc):
                return True
        except ImportError:  # pragma: no cover
            pass
        exc = exc.__cause__ or exc.__context__
    return False


def _retry(fn, *args, **kwargs):
    """fn(*args, **kwargs), retried with exponential backoff while it fails with a transient error.

    The client's own retries are turned off where we call it (retry=None), so this is the one policy.
    """
    for attempt in range(RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - filtered by _is_transient
            if attempt == RETRIES or not _is_transient(exc):
                raise
            time.sleep(min(BACKOFF_S * (2 ** attempt) * (1 + random.random()), MAX_BACKOFF_S))


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
        return bool(_retry(lambda: self._blob(name).exists(retry=None, timeout=TIMEOUT_S)))

    def list(self) -> list[str]:
        start = f"{self.prefix}/" if self.prefix else ""

        def _list():  # all pages in one attempt: a failed page lists again from the start
            blobs = gcs_client().list_blobs(self.bucket_name, prefix=start, delimiter="/",
                                            retry=None, timeout=TIMEOUT_S)
            return [b.name[len(start):] for b in blobs]

        return sorted(n for n in _retry(_list) if n)

    def read_bytes(self, name: str) -> bytes:
        try:
            return _retry(lambda: self._blob(name).download_as_bytes(retry=None, timeout=TIMEOUT_S))
        except Exception as exc:
            if _not_found(exc):
                raise FileNotFoundError(f"{self.url}/{name}") from exc
            raise

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object (GCS's own `end` is inclusive)."""
        if end <= start:
            return b""
        try:
            data = _retry(lambda: self._blob(name).download_as_bytes(start=start, end=end - 1, retry=None,
                                                                     timeout=TIMEOUT_S))
        except Exception as exc:
            if _not_found(exc):
                raise FileNotFoundError(f"{self.url}/{name}") from exc
            raise
        return data

    def write_bytes(self, name: str, data: bytes) -> None:
        """Writes the whole object in one upload (a retry uploads it whole again)."""
        _retry(lambda: self._blob(name).upload_from_string(data, content_type="application/octet-stream",
                                                           retry=None, timeout=TIMEOUT_S))

    def size(self, name: str) -> int:
        blob = _retry(lambda: gcs_client().bucket(self.bucket_name).get_blob(self._key(name), retry=None,
                                                                             timeout=TIMEOUT_S))
        if blob is None:
            raise FileNotFoundError(f"{self.url}/{name}")
        return int(blob.size)


def _split_gcs(url: str):
    bucket, _, key = str(url)[len(GCS_SCHEME):].partition("/")
    if not is_gcs(url) or not bucket:
        raise ValueError(f"bad GCS path: {url!r}")
    return bucket, key.strip("/")


def move_tree(src: str, dst: str) -> int:
    """Moves every object under gs://B/src/ to gs://B2/dst/ (server-side rewrite, then delete the original).

    Each request is retried on transient errors like the rest of this module, and so is the whole move safe
    to repeat: objects already moved are no longer listed under src, and a delete that finds its object gone
    (its first attempt went through but the answer was lost) counts as done. Returns the number moved.
    """
    from google.api_core import exceptions as gexc

    src_bucket, src_key = _split_gcs(src)
    dst_bucket, dst_key = _split_gcs(dst)
    client = gcs_client()
    prefix = f"{src_key}/" if src_key else ""
    names = _retry(lambda: [b.name for b in client.list_blobs(src_bucket, prefix=prefix, retry=None,
                                                                timeout=TIMEOUT_S)])
    for name in names:
        source = client.bucket(src_bucket).blob(name)
        target = client.bucket(dst_bucket).blob(f"{dst_key}/{name[len(prefix):]}" if dst_key else name[len(prefix):])

        def _rewrite():
            token = None
            while True:  # large objects take several rewrite calls
                token, _, _ = target.rewrite(source, token=token, retry=None, timeout=TIMEOUT_S)
                if token is None:
                    return

        _retry(_rewrite)

        def _delete():
            try:
                source.delete(retry=None, timeout=TIMEOUT_S)
            except gexc.NotFound:
                pass

        _retry(_delete)
    return len(names)
