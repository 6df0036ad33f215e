"""The launcher's handle on a run directory: its lock, and its files (named and written by trainer/runfiles.py).

The lock is an fcntl lock on `${run.dir}/lock` held for the life of the launcher: the kernel drops it when
the process dies, so a stale lock from a dead launcher never blocks the next one.
"""
import fcntl
import json
import os
import socket
import time
from typing import Optional

from launcher.errors import UserError
from trainer import runfiles


class RunLive(UserError):
    """The run's lock is held by a live supervisor: follow that launch instead of starting a second one."""

    def __init__(self, holder: str):
        super().__init__("run.name", f"a launch of this run is already live ({holder or 'unknown holder'})",
                         "wait for it to finish, or choose another run.name")
        self.holder = holder


class RunDir:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._lock_fd: Optional[int] = None
        self.taken_over: Optional[dict] = None

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def host_log(self, host: int) -> str:
        return runfiles.host_log(self.path, host)

    def acquire(self) -> None:
        """Create the directory and take the run lock, or fail with a one-line error if a launch is live."""
        try:
            os.makedirs(self.file(runfiles.LOGS), exist_ok=True)
            fd = os.open(self.file(runfiles.LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError("run.dir", f"cannot create {self.path}: {e.strerror}",
                            "choose a writable run.dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunLive(holder) from None
        stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        try:
            self.taken_over = json.loads(stale) if stale else None  # a holder that died without releasing
        except json.JSONDecodeError:
            self.taken_over = {"holder": stale}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.time()}).encode(), 0)
        self._lock_fd = fd

    def is_locked(self) -> bool:
        """Whether a live process holds the run lock (without taking it)."""
        try:
            fd = os.open(self.file(runfiles.LOCK), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_json(self, name: str, obj: dict) -> None:
        runfiles.write_json(self.file(name), obj)

    def write_text(self, name: str, text: str) -> None:
        runfiles.write_atomic(self.file(name), text)

    def read_json(self, name: str) -> Optional[dict]:
        obj = runfiles.read_json(self.file(name))
        return obj if isinstance(obj, dict) else None

    def event(self, event: str, **fields) -> None:
        runfiles.append_jsonl(self.file(runfiles.EVENTS), {"event": event, "host": "launcher", "time": time.time(),
                                                 **fields})
