"""Run-directory sync for hosts that do not share a filesystem with the supervisor (cloud TPU VMs).

Each such host's trainer writes into a host-local run directory; the supervisor pulls what was appended
(whole lines) through the host's Ray actor and appends it to the real run directory, so logs/, events.jsonl,
metrics.jsonl, result.json and tb/ look the same as on a local pod. Host 0's TensorBoard event files (tb/) have
names made when they are created (one per attempt and writer), so each pull first asks host 0 which there are;
they are binary, synced by whole TFRecords instead of whole lines. Files rewritten in place (heartbeats,
result.json) come back whole, and only when changed: their "offset" is a fingerprint of what was synced last.
"""
import hashlib
import logging
import os
from typing import Dict, Iterable, List, Optional, Set, Tuple

import ray

from trainer import runfiles
from trainer.tensorboard import EVENT_FILE, event_files, whole_records

log = logging.getLogger("launcher.runsync")

APPENDED = (runfiles.EVENTS, runfiles.METRICS, runfiles.GOODPUT)
WHOLE = (runfiles.RESULT,)
MAX_EVENT_FILES = 1000  # one per attempt and launch: a host listing more is not believed past this


def host_files(host: int) -> Tuple[str, ...]:
    """What host `host` writes: its log, the appended files, its heartbeat, and (host 0) the result."""
    return (f"logs/host-{host}.log",) + APPENDED + (f"hosts/host-{host}.json",) + (WHOLE if host == 0 else ())


def is_whole(name: str) -> bool:
    """Files rewritten in place (copied whole), as opposed to appended to."""
    return name in WHOLE or name.startswith("hosts/")


def is_event_file(name: str) -> bool:
    """A TensorBoard event file of the run directory's tb/ (a name a host reported)."""
    prefix = runfiles.TB + "/"
    return isinstance(name, str) and name.startswith(prefix) and bool(EVENT_FILE.fullmatch(name[len(prefix):]))


def list_event_files(root: str) -> List[str]:
    """On a host: its TensorBoard event files, as names relative to its run directory."""
    return [f"{runfiles.TB}/{os.path.basename(p)}" for p in event_files(root)]


def fingerprint(data: bytes) -> int:
    """A whole file's content as the "offset" read_new returns for it: never 0 (0 = nothing synced yet)."""
    return 1 + int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def read_new(root: str, offsets: Dict[str, int]) -> Dict[str, Tuple[bytes, int]]:
    """On a host: bytes appended to each file since its offset, up to the last newline (event files: the last
    whole record); whole small files with their fingerprint, only when that differs from the one passed as their
    offset: at 1024 hosts, re-sending and rewriting every unchanged heartbeat cost each poll ~0.3 s."""
    out = {}
    for name, offset in offsets.items():
        path = os.path.join(root, name)
        try:
            with open(path, "rb") as f:
                if is_whole(name):
                    data = f.read()
                    mark = fingerprint(data)
                    if mark != offset:
                        out[name] = (data, mark)
                    continue
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            continue
        cut = whole_records(chunk) if is_event_file(name) else chunk.rfind(b"\n") + 1
        if cut:
            out[name] = (chunk[:cut], offset + cut)
    return out


def apply_chunks(run_dir: str, host: int, expected_names: Iterable[str], chunks,
                 warned: Optional[Set] = None) -> Dict[str, int]:
    """Write what host `host` returned from `read_new` into run_dir. Only the names the supervisor asked that
    host for (`expected_names`) are written, each only inside run_dir; anything else the host sent is ignored
    and logged (once per host and name, with `warned` kept across calls). A whole file whose content is already
    there is not rewritten (its mtime stays). Returns the new offsets of the appended files written, and the
    fingerprints of the whole files (a host that sends 0 gets asked for the whole file again)."""
    warned = set() if warned is None else warned
    expected = set(expected_names)
    offsets = {}

    def _ignore(name, why):
        key = (host, repr(name)[:200])
        if key not in warned:
            warned.add(key)
            log.warning("run sync: ignored %s from host %d: %s", key[1], host, why)

    if not isinstance(chunks, dict):
        _ignore(type(chunks).__name__, "not a {name: (data, offset)} table")
        return offsets
    for name, chunk in chunks.items():
        if name not in expected:
            _ignore(name, "a file the supervisor did not ask for")
            continue
        target = runfiles.inside(run_dir, name)
        if target is None:
            _ignore(name, "not a path inside the run directory")
            continue
        if not (isinstance(chunk, (tuple, list)) and len(chunk) == 2 and isinstance(chunk[0], bytes)
                and isinstance(chunk[1], int)):
            _ignore(name, "not a (bytes, offset) pair")
            continue
        data, offset = chunk
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if is_whole(name):
            if _content(target) != data:
                runfiles.write_atomic(target, data)
            if offset:
                offsets[name] = offset
            continue
        with open(target, "ab") as f:
            f.write(data)
        offsets[name] = offset
    return offsets


def _content(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None  # not there yet (or unreadable): it is written


class RunSync:
    """Pulls every host's new run-directory bytes into the supervisor's run directory."""

    def __init__(self, run_dir: str, actors: List, host_dirs: List[str], start: Optional[List[Dict]] = None):
        """start: per host, {name: size} of its files now (HostActor.prepare): what was already there (an
        earlier attempt's or launch's lines, synced then) is not synced again."""
        self.run_dir, self.actors, self.host_dirs = run_dir, actors, host_dirs
        self.offsets = {i: {name: 0 if is_whole(name) else int((start[i] if start else {}).get(name, 0))
                            for name in host_files(i)} for i in range(len(actors))}
        self._warned: set = set()  # (host, name) of unexpected names already logged

    def pull(self, timeout_s: float = 30.0) -> None:
        self._find_event_files(timeout_s)
        refs = {i: a.pull.remote(self.host_dirs[i], self.offsets[i]) for i, a in enumerate(self.actors)}
        for i, ref in refs.items():
            try:
                chunks = ray.get(ref, timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a dead or busy host: what it wrote last time is kept
                continue
            # only the names asked for (this host's offsets), each inside the run dir: a host is not trusted
            # to say where the supervisor writes
            self.offsets[i].update(apply_chunks(self.run_dir, i, self.offsets[i], chunks, self._warned))

    def _find_event_files(self, timeout_s: float) -> None:
        """Host 0's event files not synced yet join its names. The names come from the host, so each must be a
        plain event-file name in tb/. A file already here (an earlier attempt or launch synced its beginning)
        goes on from its size here."""
        try:
            names = ray.get(self.actors[0].event_files.remote(self.host_dirs[0]), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - a dead or busy host 0: its new files are looked for on the next pull
            return
        known = self.offsets[0]
        for name in names if isinstance(names, list) else []:
            if name in known:
                continue
            target = runfiles.inside(self.run_dir, name) if is_event_file(name) else None
            if target is None or sum(map(is_event_file, known)) >= MAX_EVENT_FILES:
                key = (0, repr(name)[:200])
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("run sync: ignored %s from host 0: not a TensorBoard event file of tb/ (or past "
                                "%d of them)", key[1], MAX_EVENT_FILES)
                continue
            known[name] = os.path.getsize(target) if os.path.exists(target) else 0
