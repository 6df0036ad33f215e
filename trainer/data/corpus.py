"""The embedded default corpus (Python stdlib sources), prepared once into a locked local cache."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import sysconfig
import tempfile

from trainer.cache import cache_dir

from .prepare import DEFAULT_RECORD_LEN, DEFAULT_RECORDS_PER_SHARD, MANIFEST, prepare

CORPUS_NAME = "corpus-stdlib-v1"
DEFAULT_MAX_BYTES = 6_000_000
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def default_cache_dir() -> str:
    """$TPU_LAUNCHER_CACHE/corpus-stdlib-v1, else ~/.cache/tpu-launcher/corpus-stdlib-v1."""
    return cache_dir(CORPUS_NAME)


def stdlib_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[str, bytes]]:
    """(relative path, source bytes) of stdlib .py files, sorted by path, until max_bytes.

    Files are taken in path order and the list stops before the first file that would
    push the total past max_bytes, so the result is a deterministic prefix.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel_dir = os.path.relpath(dirpath, root)
        paths.extend(os.path.normpath(os.path.join(rel_dir, f)).replace(os.sep, "/")
                     for f in filenames if f.endswith(".py"))
    docs, total = [], 0
    for rel in sorted(paths):
        full = os.path.join(root, rel)
        size = os.path.getsize(full)
        if total + size > max_bytes:
            break
        with open(full, "rb") as f:
            docs.append((rel, f.read()))
        total += size
    return docs


def prepare_stdlib(output: str, *, max_bytes: int = DEFAULT_MAX_BYTES, **prepare_kwargs) -> dict:
    """Prepares the stdlib corpus into `output` (local dir or gs://...); returns the manifest."""
    docs = stdlib_documents(max_bytes)
    desc = (f"python{sys.version_info.major}.{sys.version_info.minor} stdlib .py sources "
            f"({len(docs)} files, max_bytes={max_bytes})")
    return prepare(docs, output, source_description=desc, **prepare_kwargs)


def ensure_default_corpus(cache_dir: str | None = None, record_len: int = DEFAULT_RECORD_LEN,
                          records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
                          max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Returns the path of the prepared default corpus, preparing it on first use.

    The shards live in a subdirectory of `cache_dir` (default: default_cache_dir()) named
    after the settings and Python version, so different settings never collide. Preparation
    runs under an fcntl lock, into a temp dir that is renamed into place, so concurrent
    callers (e.g. several processes on one host) prepare it once and never see half of it.
    """
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    key = (f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-r{record_len}"
           f"-s{records_per_shard}-b{max_bytes}")
    final = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(final, MANIFEST)):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, f".{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.isfile(os.path.join(final, MANIFEST)):
                return final
            tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}.tmp-")
            os.chmod(tmp, 0o755)
            try:
                prepare_stdlib(tmp, max_bytes=max_bytes, record_len=record_len,
                               records_per_shard=records_per_shard)
                if os.path.exists(final):  # leftover without a manifest: not a usable copy
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                if os.path.exists(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final
