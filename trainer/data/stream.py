"""Per-host streaming reader of token shards: shuffled, resumable training batches and eval batches."""

from __future__ import annotations

import json
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from .errors import DataError
from .prepare import FORMAT, MANIFEST
from .storage import is_gcs, is_transient_failure, open_store

# Ranged reads of one batch issued concurrently for remote (GCS) stores, where each is a round trip.
REMOTE_READ_THREADS = 8


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def read_manifest(path: str) -> dict:
    """Reads and checks `path`/manifest.json; raises DataError (one line) if missing or invalid."""
    path = str(path)
    if not is_gcs(path) and not os.path.isdir(os.path.expanduser(path)):
        raise DataError(f"dataset path does not exist or is not a directory: {path}")
    try:
        raw = open_store(path).read_bytes(MANIFEST)
    except FileNotFoundError:
        raise DataError(f"no {MANIFEST} in {path}: not a prepared dataset "
                        f"(create one with `python -m trainer.data prepare --input CORPUS --output {path}`)") from None
    except Exception as exc:  # noqa: BLE001 - storage errors become one-line DataErrors
        if is_transient_failure(exc):  # GCS kept failing past its retries: not a problem with the data
            raise
        raise DataError(f"cannot read {path}/{MANIFEST}: {_one_line(exc)}") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{path}/{MANIFEST} is not valid JSON: {_one_line(exc)}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}/{MANIFEST} is invalid: {problem}")
    return manifest


def _manifest_problem(m) -> str | None:
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format") != FORMAT:
        return f"format is {m.get('format')!r}, expected {FORMAT!r}"
    if m.get("dtype") != "uint16":
        return f"dtype is {m.get('dtype')!r}, expected 'uint16'"
    if not isinstance(m.get("record_len"), int) or m["record_len"] < 2:
        return f"bad record_len {m.get('record_len')!r}"
    if not isinstance(m.get("fingerprint"), str):
        return "no fingerprint"
    splits = m.get("splits")
    if not isinstance(splits, dict):
        return "no 'splits' table"
    n_shards = 0
    for name, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("records"), int)
                for s in shards):
            return f"split {name!r} has a bad 'shards' list"
        for s in shards:
            bad = _bad_shard_name(s["name"])
            if bad:
                return f"split {name!r} has a bad shard name {s['name']!r} ({bad}): shard names must be plain " \
                       f"file names inside the dataset directory"
        n_shards += len(shards)
    if n_shards == 0:
        return "it lists no shards"
    return None


def _bad_shard_name(name: str) -> str | None:
    """Why `name` is not a plain relative file name inside the data root (None if it is). Shard names come from
    the manifest, which is untrusted input: a name must not reach outside the directory or bucket prefix."""
    if not name:
        return "empty"
    if "\0" in name:
        return "contains NUL"
    if name.startswith(("/", "\\")) or os.path.isabs(name) or os.path.splitdrive(name)[0]:
        return "an absolute path"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name in (".", ".."):
        return "not a file name"
    return None


class _ShardReader:
    """Reads records of one split by global record index, coalescing adjacent ones per shard."""

    def __init__(self, path: str, manifest: dict, split: str):
        info = manifest["splits"].get(split)
        if info is None:
            raise DataError(f"dataset {path} has no split {split!r} (has: {', '.join(sorted(manifest['splits']))})")
        self.store = open_store(path)
        self.names = [s["name"] for s in info["shards"]]
        self.starts = np.cumsum([0] + [s["records"] for s in info["shards"]])
        self.num_records = int(self.starts[-1])
        if self.num_records == 0:
            raise DataError(f"split {split!r} of dataset {path} has no records (corpus too small for it?)")
        self.record_len = manifest["record_len"]
        self.record_bytes = 2 * self.record_len
        self.bytes_read = 0
        self.records_read = 0
        self.reads = 0
        self._remote = is_gcs(path)
        self._pool = None

    def _read_run(self, shard: int, first: int, n: int) -> bytes:
        start = (first - int(self.starts[shard])) * self.record_bytes
        data = self.store.read_range(self.names[shard], start, start + n * self.record_bytes)
        if len(data) != n * self.record_bytes:
            raise DataError(f"shard {self.names[shard]} is shorter than its manifest says "
                            f"(wanted bytes {start}..{start + n * self.record_bytes}, got {len(data)})")
        return data

    def read(self, records: np.ndarray) -> np.ndarray:
        """Returns uint16[len(records), record_len]; each distinct record is read once."""
        uniq, inverse = np.unique(np.asarray(records, dtype=np.int64), return_inverse=True)
        out = np.empty((len(uniq), self.record_len), dtype=np.uint16)
        shard = np.searchsorted(self.starts, uniq, side="right") - 1
        breaks = np.flatnonzero((np.diff(uniq) != 1) | (np.diff(shard) != 0)) + 1
        runs = [(int(lo), int(hi)) for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(uniq)])]
        args = [(int(shard[lo]), int(uniq[lo]), hi - lo) for lo, hi in runs]
        if self._remote and len(runs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(REMOTE_READ_THREADS, thread_name_prefix="shard-read")
            chunks = list(self._pool.map(lambda a: self._read_run(*a), args))
        else:
            chunks = [self._read_run(*a) for a in args]
        for (lo, hi), data in zip(runs, chunks):
            out[lo:hi] = np.frombuffer(data, dtype="<u2").reshape(hi - lo, self.record_len)
            self.bytes_read += len(data)
        self.reads += len(runs)
        self.records_read += len(uniq)
        return out[inverse.reshape(-1)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _check_args(manifest: dict, global_batch: int, seq_len: int, process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"bad process_index/process_count: {process_index}/{process_count}")
    if global_batch < 1 or global_batch % process_count:
        raise DataError(f"global_batch {global_batch} must be a positive multiple of process_count {process_count}")
    if not 1 <= seq_len <= manifest["record_len"] - 1:
        raise DataError(f"seq_len {seq_len} does not fit records of {manifest['record_len']} tokens "
                        f"(need 1 <= seq_len <= {manifest['record_len'] - 1}; re-prepare with a larger --record-len)")


def _to_batch(rows: np.ndarray, seq_len: int) -> dict:
    rows = rows.astype(np.int32)
    return {"inputs": np.ascontiguousarray(rows[:, :seq_len]),
            "targets": np.ascontiguousarray(rows[:, 1:seq_len + 1])}


class BatchStream:
    """Endless shuffled batches of one split for one host (process) of a data-parallel job.

    Sample i of the global order is record perm_e[i % N] of epoch e = i // N, with
    perm_e = np.random.default_rng([seed, e]).permutation(N); step s is samples
    s*global_batch .. (s+1)*global_batch-1, and process p gets rows
    p*local_batch .. (p+1)*local_batch-1 of it (and reads only those records); p is the host's data shard
    (trainer.sharding.batch_shard), which on a TPU mesh need not be its process index.
    """

    def __init__(self, path, split, global_batch, seq_len, process_index, process_count, seed,
                 prefetch=2, manifest=None):
        self.path = str(path)
        self.split = split
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        _check_args(self.manifest, global_batch, seq_len, process_index, process_count)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.global_batch = int(global_batch)
        self.seq_len = int(seq_len)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.local_batch = self.global_batch // self.process_count
        self.seed = int(seed)
        self.prefetch = int(prefetch)
        self.fingerprint = self.manifest["fingerprint"]
        self._reader = _ShardReader(self.path, self.manifest, split)
        self.num_records = self._reader.num_records
        self._samples_seen = 0
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._thread = None
        self._queue = None
        self._stop = None
        self._error = None
        self._closed = False

    # -- order

    def _perm(self, epoch: int) -> np.ndarray:
        key = (self.seed, epoch)
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    def _records(self, samples: np.ndarray) -> np.ndarray:
        epochs = samples // self.num_records
        out = np.empty_like(samples)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))[samples[mask] % self.num_records]
        return out

    def _make_batch(self, first_sample: int) -> dict:
        samples = first_sample + self.process_index * self.local_batch + np.arange(self.local_batch, dtype=np.int64)
        return _to_batch(self._reader.read(self._records(samples)), self.seq_len)

    # -- prefetch thread

    def _produce(self, first_sample: int, q: queue.Queue, stop: threading.Event) -> None:
        position = first_sample
        while not stop.is_set():
            try:
                item = (position, self._make_batch(position), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                item = (position, None, exc)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            position += self.global_batch

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._samples_seen, self._queue, self._stop),
                                        name=f"BatchStream-{self.split}", daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = self._stop = None

    # -- public API

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise DataError("BatchStream is closed")
        if self._error is not None:
            raise self._error
        if self.prefetch <= 0:
            batch = self._make_batch(self._samples_seen)
        else:
            if self._thread is None:
                self._start()
            position, batch, error = self._queue.get()
            if error is not None:
                self._error = error
                raise error
            assert position == self._samples_seen, (position, self._samples_seen)
        self._samples_seen += self.global_batch
        return batch

    def state(self) -> dict:
        """Position of the next batch __next__ returns (prefetched batches don't count)."""
        return {"samples_seen": self._samples_seen, "seed": self.seed,
                "fingerprint": self.fingerprint, "split": self.split}

    def restore(self, state: dict) -> None:
        """Continues from `state` (its seed is adopted); DataError if it is for another dataset/split."""
        if not isinstance(state, dict) or not {"samples_seen", "seed", "fingerprint", "split"} <= set(state):
            raise DataError(f"invalid data stream state: {state!r}")
        if state["fingerprint"] != self.fingerprint:
            raise DataError(f"data stream state belongs to another dataset (fingerprint {str(state['fingerprint'])[:12]}, "
                            f"but {self.path} has {self.fingerprint[:12]})")
        if state["split"] != self.split:
            raise DataError(f"data stream state is for split {state['split']!r}, not {self.split!r}")
        samples_seen, seed = state["samples_seen"], state["seed"]
        if not isinstance(samples_seen, int) or samples_seen < 0 or not isinstance(seed, int) or seed < 0:
            raise DataError(f"invalid data stream state: {state!r}")
        self._stop_thread()
        self._samples_seen = samples_seen
        self.seed = seed
        self._error = None

    def close(self) -> None:
        self._stop_thread()
        self._reader.close()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def stats(self) -> dict:
        """Read counters of this host: records, bytes and ranged reads issued so far."""
        r = self._reader
        return {"records_read": r.records_read, "bytes_read": r.bytes_read, "reads": r.reads}


def eval_batches(path, split, global_batch, seq_len, process_index, process_count, max_batches,
                 manifest=None) -> Iterator[dict]:
    """Unshuffled batches over records 0, 1, 2, ... of `split`: only full global batches,
    at most `max_batches` of them (None: all); this process gets its rows of each."""
    path = str(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    _check_args(manifest, global_batch, seq_len, process_index, process_count)
    reader = _ShardReader(path, manifest, split)
    local_batch = global_batch // process_count
    n_batches = reader.num_records // global_batch
    if max_batches is not None:
        n_batches = min(n_batches, max(0, int(max_batches)))

    def _gen():
        try:
            for b in range(n_batches):
                first = b * global_batch + process_index * local_batch
                yield _to_batch(reader.read(np.arange(first, first + local_batch)), seq_len)
        finally:
            reader.close()

    return _gen()
