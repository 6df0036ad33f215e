"""A cloud run's run directory, mirrored to its bucket by the supervisor and pulled back by the laptop's commands.

On a cloud run submitted as a Ray job the run directory lives on the head: the laptop holds only config.yaml, and a
head VM the launcher created is deleted at the end. So the supervisor mirrors the run directory's small files
(`runfiles.mirrored_names`: summary, results, metrics, events, goodput ledger, host heartbeats and logs, tb/ and
report.png; never checkpoints, auth/, the lock, pod.json or config.yaml) to `<cluster.bucket>/runs/<run.name>/rundir/`
every PUSH_EVERY_S while it runs and once at its end, through the one GCS retry policy (trainer/data/storage.py).
`refresh` pulls it back into a local run directory before status, logs, report and the completed-run shortcut read it.

Layout in the bucket: each file as chunks of CHUNK_BYTES (`<name>/<k>`), so a log that grows re-uploads only its last
chunk; and `mirror.json`, written after the chunks: the source (host and directory) and, per file, its size and the
sha256 of each chunk. The puller downloads only the chunks whose hash differs from what it pulled last (its
`mirror.json` in the run directory), accepts only names `runfiles.is_mirrored` knows, each only inside the run
directory, and pulls nothing into the very directory the mirror comes from.
"""
import hashlib
import json
import logging
import os
import socket
import threading
import time
from typing import Dict, List, Optional

from launcher.errors import first_line
from trainer import runfiles

log = logging.getLogger("launcher.mirror")

CHUNK_BYTES = 4 * 1024 * 1024
PUSH_EVERY_S = 30.0
CLOSE_TIMEOUT_S = 45.0  # the last push at the end of a launch
INDEX = runfiles.MIRROR
MAX_CHUNKS = 1024  # 4 GiB: an index claiming a bigger file is not believed
VERSION = 1


def url_for(cfg) -> Optional[str]:
    """Where a run's mirror lives: `<cluster.bucket>/runs/<run.name>/rundir` for a cloud run with a bucket (next to
    the checkpoints launcher/stage.py puts there), else None. `cfg`: the composed config or config.yaml's dict."""
    cluster = cfg.get("cluster") or {}
    bucket, name = cluster.get("bucket"), (cfg.get("run") or {}).get("name")
    if cluster.get("provider", "local") == "local" or not bucket or not name or not str(bucket).startswith("gs://"):
        return None
    return f"{str(bucket).rstrip('/')}/runs/{name}/rundir"


def _source(run_dir: str) -> dict:
    return {"host": socket.gethostname(), "dir": os.path.abspath(run_dir)}


def _hashes(data: bytes) -> List[str]:
    return [hashlib.sha256(data[k:k + CHUNK_BYTES]).hexdigest() for k in range(0, len(data), CHUNK_BYTES)]


def _files(index) -> Dict[str, dict]:
    """The well-formed file entries of an index: {name: {"size", "chunks"}}; anything else is dropped."""
    files = index.get("files") if isinstance(index, dict) else None
    out = {}
    for name, entry in (files.items() if isinstance(files, dict) else ()):
        if not isinstance(entry, dict):
            continue
        size, chunks = entry.get("size"), entry.get("chunks")
        if isinstance(size, int) and not isinstance(size, bool) and size >= 0 and isinstance(chunks, list) \
                and len(chunks) <= MAX_CHUNKS and all(isinstance(c, str) for c in chunks):
            out[name] = {"size": size, "chunks": chunks}
    return out


class Mirror:
    """The supervisor's side: pushes the run directory's mirrored files to the bucket, in a thread every
    PUSH_EVERY_S (`start`) and once more at the end (`close`)."""

    def __init__(self, run_dir: str, url: str, every_s: float = PUSH_EVERY_S):
        from trainer.data.storage import open_store

        self.run_dir, self.url, self.every_s = run_dir, url, every_s
        self.store = open_store(url)
        self.sent: Dict[str, dict] = {}  # name -> {"size", "chunks", "stat"}: what the bucket holds
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failing = False
        self._loaded = self._indexed = False

    def _load_index(self) -> None:
        try:
            index = json.loads(self.store.read_bytes(INDEX))
        except FileNotFoundError:
            return
        except ValueError:  # a garbled index: everything is sent again
            return
        self.sent = {name: {**entry, "stat": None} for name, entry in _files(index).items()
                     if runfiles.is_mirrored(name)}

    def push(self) -> int:
        """Upload the chunks that changed since the last push, then the index. Returns the files uploaded."""
        if not self._loaded:
            self._load_index()  # what an earlier supervisor (another head) sent is not sent again
            self._loaded = True
        changed = 0
        for name in runfiles.mirrored_names(self.run_dir):
            path = os.path.join(self.run_dir, name)
            try:
                st = os.stat(path)
                stat = [st.st_size, st.st_mtime_ns]
                before = self.sent.get(name)
                if before is not None and before.get("stat") == stat:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:  # gone between the listing and the read (e.g. result.json moved aside)
                continue
            chunks = _hashes(data)
            old = (before or {}).get("chunks") or []
            for k, digest in enumerate(chunks):
                if k >= len(old) or old[k] != digest:
                    self.store.write_bytes(f"{name}/{k}", data[k * CHUNK_BYTES:(k + 1) * CHUNK_BYTES])
            if before is None or before.get("size") != len(data) or old != chunks:
                changed += 1
            self.sent[name] = {"size": len(data), "chunks": chunks, "stat": stat}
        if changed or not self._indexed:
            index = {"version": VERSION, "source": _source(self.run_dir), "time": time.time(),
                     "chunk_bytes": CHUNK_BYTES,
                     "files": {n: {"size": e["size"], "chunks": e["chunks"]} for n, e in sorted(self.sent.items())}}
            self.store.write_bytes(INDEX, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
            self._indexed = True
        return changed

    def _push_logged(self, last: bool = False) -> None:
        try:
            self.push()
            if self._failing:
                log.warning("run mirror: %s reachable again", self.url)
            self._failing = False
        except Exception as e:  # noqa: BLE001 - the bucket down past the retries: the run goes on, next time again
            if last or not self._failing:
                again = "its previous push stays" if last else f"trying again every {self.every_s:.0f}s"
                print(f"[launcher] warning: could not mirror the run directory to {self.url}: {first_line(e)} "
                      f"({again})", flush=True)
            self._failing = True

    def start(self) -> "Mirror":
        def loop():
            while not self._stop.wait(self.every_s):
                self._push_logged()
            self._push_logged(last=True)  # what the end of the launch wrote

        self._push_logged()
        self._thread = threading.Thread(target=loop, name="run-mirror", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Push what the end of the launch wrote (summary, report), waiting at most timeout_s: a bucket that hangs
        does not hold the launch's end (nor a Ray job's graceful stop, which allows 60 s past the hosts' grace)."""
        if self._thread is None:
            self._push_logged(last=True)
            return
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            print(f"[launcher] warning: the run directory's last push to {self.url} did not finish within "
                  f"{timeout_s:.0f}s; the bucket holds the one before", flush=True)


def pull(run_dir: str, url: str) -> List[str]:
    """Bring the run directory up to the mirror at `url`: the files whose chunks changed since the last pull, each
    written whole (atomically). Nothing is pulled into the directory the mirror comes from, nor a name the run
    directory contract does not mirror, nor outside run_dir. Returns the names written."""
    from trainer.data.storage import open_store

    store = open_store(url)
    try:
        index = json.loads(store.read_bytes(INDEX))
    except FileNotFoundError:
        return []  # nothing mirrored yet
    if not isinstance(index, dict) or index.get("chunk_bytes", CHUNK_BYTES) != CHUNK_BYTES:
        raise ValueError(f"{url}/{INDEX} is not a run mirror's index this launcher reads")
    if index.get("source") == _source(run_dir):
        return []  # this directory is the mirror's source: it has every file already
    record_file = runfiles.path(run_dir, INDEX)
    had = _files(runfiles.read_json(record_file))
    pulled, record = [], {}
    for name, entry in _files(index).items():
        target = runfiles.inside(run_dir, name) if runfiles.is_mirrored(name) else None
        if target is None:
            log.warning("run mirror: ignored %r in %s: not a file of the run directory's mirror", name[:200], url)
            continue
        mine = had.get(name)
        try:
            local_size = os.path.getsize(target)
        except OSError:
            local_size = None
        if mine is None or local_size != mine["size"]:
            mine = {"size": 0, "chunks": []}  # not pulled here, or changed here since: the whole file again
        first = next((k for k, (a, b) in enumerate(zip(entry["chunks"], mine["chunks"])) if a != b),
                     min(len(entry["chunks"]), len(mine["chunks"])))
        if first == len(entry["chunks"]) == len(mine["chunks"]):
            record[name] = mine
            continue
        keep = b""
        if first:
            with open(target, "rb") as f:
                keep = f.read(first * CHUNK_BYTES)
        new = [store.read_bytes(f"{name}/{k}") for k in range(first, len(entry["chunks"]))]
        data = keep + b"".join(new)
        runfiles.write_atomic(target, data)
        # what arrived, which may be newer than the index read (the supervisor pushes meanwhile): next time compared
        record[name] = {"size": len(data), "chunks": _hashes(data)}
        pulled.append(name)
    if pulled or record.keys() != had.keys():
        runfiles.write_json(record_file, {"version": VERSION, "url": url, "source": index.get("source"),
                                          "time": index.get("time"), "chunk_bytes": CHUNK_BYTES, "files": record})
    return pulled


def pulled_at(run_dir: str) -> Optional[float]:
    """When the head pushed the mirror last pulled into run_dir (its index's time), or None if none was pulled."""
    record = runfiles.read_json(runfiles.path(run_dir, INDEX))
    t = record.get("time") if isinstance(record, dict) else None
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def refresh(run_dir: str, cfg=None) -> Optional[str]:
    """What every laptop-side reader of a run directory calls first: for a cloud run with a bucket (from `cfg`, or
    the run's config.yaml), pull its mirror into run_dir. A local run: nothing, no import. Returns a one-line
    warning if the mirror could not be read (the command goes on with the files here), else None."""
    url = url_for(cfg if cfg is not None else runfiles.read_config(run_dir))
    if url is None:
        return None
    try:
        pull(run_dir, url)
    except Exception as e:  # noqa: BLE001 - no credentials, bucket unreachable past the retries, garbled index
        return f"warning: could not read the run's mirror at {url} ({first_line(e)}); showing the files in {run_dir}"
    return None
