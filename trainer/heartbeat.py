"""Per-host heartbeat: `${run.dir}/hosts/host-<i>.json` with pid, step, phase and times, for the watchdog.

`pid_start_time` (the process's start time, `process_start_time`) lets host hygiene (cluster/hygiene.py) tell
this trainer from a later process that reused its pid.

A background thread rewrites the file every `interval_s` (atomically), so a frozen process (SIGSTOP, a
deadlocked runtime) shows as a stale `time`, and a live process whose main loop is stuck (a hung collective)
shows as a stale `progress_time`: the time `step` or `phase` last changed. The supervisor reads these files
and restarts the slice when a host stops making progress (launcher/watch.py).
"""
import json
import os
import threading
import time
from typing import Optional

from trainer.runfiles import PHASE_EXITED, PHASE_INIT, heartbeat_file, read_json, write_atomic


def process_start_time(pid: int) -> Optional[int]:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22), or None if there is
    no such process. Exact and fixed for the process's life, so (pid, start time) names one process: a pid
    reused by a later process has a later start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Heartbeat:
    def __init__(self, run_dir: str, host: int, attempt: int, interval_s: float = 1.0):
        self.path = heartbeat_file(run_dir, host)
        self.interval_s = float(interval_s)
        self._lock = threading.Lock()  # guards _state: beat() runs every step and never waits for the disk
        self._write_lock = threading.Lock()  # one write at a time, in the order their snapshots were taken
        now = time.time()
        self._state = {"pid": os.getpid(), "pid_start_time": process_start_time(os.getpid()), "host": host,
                       "attempt": attempt, "step": None, "phase": PHASE_INIT, "started": now, "progress_time": now,
                       "time": now, "exit": None}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Heartbeat":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: Optional[int] = None, phase: Optional[str] = None) -> None:
        """Record progress (cheap: called every step). Only a change of step or phase counts as progress."""
        with self._lock:
            changed = False
            if step is not None and step != self._state["step"]:
                self._state["step"], changed = int(step), True
            if phase is not None and phase != self._state["phase"]:
                self._state["phase"], changed = phase, True
            if changed:
                self._state["progress_time"] = time.time()

    def finish(self, code: int, reason: str) -> None:
        """Write the exit code and its reason (e.g. 42 'preemption') before the process exits."""
        with self._lock:
            self._state["exit"] = {"code": int(code), "reason": reason}
            self._state["phase"] = PHASE_EXITED
        self._stop.set()
        self._write()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    def _write(self) -> None:
        # The snapshot is taken under the write lock: a beat the thread took before finish() must not land after
        # finish()'s exit record and hide it from the supervisor (which then cannot tell a preempted host's save).
        with self._write_lock:
            with self._lock:
                self._state["time"] = time.time()
                data = json.dumps(self._state, sort_keys=True)
            try:
                write_atomic(self.path, data)
            except OSError:  # a full or vanished run dir must not kill training; the watchdog will notice
                pass


def read_heartbeat(run_dir: str, host: int) -> Optional[dict]:
    beat = read_json(heartbeat_file(run_dir, host))
    return beat if isinstance(beat, dict) else None
