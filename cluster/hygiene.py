"""Host hygiene before every trainer start: no trainer left over from an earlier attempt, no stale TPU lock.

A trainer that outlived its attempt (its supervisor or actor died, it was stopped with SIGSTOP, ...) would
write checkpoints and hold the TPU while the next attempt starts. Its pid and start time are in the host's
heartbeat file (trainer/heartbeat.py); it is killed only if that pid still has the recorded start time (pids are
reused: a pid plus its start time names one process) and runs `trainer.main`. A heartbeat that records no start
time (an older record) kills nothing, whatever the pid's command line: clean_host says so instead.
The same check guards `kill_recorded`, which stops a dead supervisor's local Ray processes. On a TPU
VM, processes holding the TPU devices are killed and libtpu's lockfile is removed once nothing holds them,
as other launchers' startup scripts do.
"""
import glob
import os
import signal
import time
from typing import Iterable, List, Optional, Tuple

from trainer.heartbeat import process_start_time  # the (pid, start time) identity heartbeats record
from trainer.runfiles import read_json

LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def recorded_processes(pod: dict) -> list:
    """The processes a local pod's record (`pod.json`) names: "processes" ({"pid", "start_time"} each) and
    "ray_pids" (older records, pids without start times, which kill_recorded leaves alone)."""
    return [p for key in ("processes", "ray_pids") for p in (pod.get(key) if isinstance(pod.get(key), list) else [])]


def kill_recorded(processes: Iterable) -> Tuple[List[int], List[dict]]:
    """SIGKILL each recorded process ({"pid": .., "start_time": ..} as written with `process_start_time`)
    that still runs: same pid AND same start time. Returns (killed pids, skipped: [{"pid", "reason"}])."""
    killed, skipped = [], []
    for rec in processes or ():
        pid = rec.get("pid") if isinstance(rec, dict) else rec
        recorded = rec.get("start_time") if isinstance(rec, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            skipped.append({"pid": pid, "reason": "malformed record"})
            continue
        if pid == os.getpid():
            skipped.append({"pid": pid, "reason": "this process"})
            continue
        if not isinstance(recorded, int) or isinstance(recorded, bool):
            skipped.append({"pid": pid, "reason": "no start time recorded"})
            continue
        now = process_start_time(pid)
        if now is None:
            skipped.append({"pid": pid, "reason": "no longer running"})
            continue
        if now != recorded:
            skipped.append({"pid": pid, "reason": f"pid reused: start time {now}, recorded {recorded}"})
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            skipped.append({"pid": pid, "reason": "no longer running"})
        except PermissionError:
            skipped.append({"pid": pid, "reason": "not permitted"})
    return killed, skipped


def _kill(pid: int, wait_s: float = 5.0) -> bool:
    """SIGKILL pid's process group (trainers lead their own session) or, failing that, pid itself."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
    deadline = time.time() + wait_s
    while time.time() < deadline and _cmdline(pid) and not _is_zombie(pid):
        time.sleep(0.05)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _heartbeat_process(heartbeat_file: str) -> Tuple[int, Optional[int]]:
    """(pid, pid_start_time) a heartbeat file records; (0, None) for a missing or torn one."""
    hb = read_json(heartbeat_file)
    try:
        pid = int(hb.get("pid") or 0)
        start_time = hb.get("pid_start_time")
        return pid, None if start_time is None else int(start_time)
    except (ValueError, TypeError, AttributeError):  # torn or not a heartbeat: nothing recorded to kill
        return 0, None


def leftover_trainer(heartbeat_file: str) -> Optional[int]:
    """The pid in a heartbeat file, if that process is alive, started when the heartbeat's process did (its
    recorded `pid_start_time`: that process, not a reused pid) and is a trainer. A heartbeat without a start time
    names no process: None, whatever runs under its pid."""
    pid, start_time = _heartbeat_process(heartbeat_file)
    if pid <= 0 or pid == os.getpid() or start_time is None or _is_zombie(pid):
        return None
    if process_start_time(pid) != start_time:
        return None
    return pid if "trainer.main" in _cmdline(pid) else None


def unrecorded_trainer_pid(heartbeat_file: str) -> Optional[int]:
    """The pid of a heartbeat that records no start time (an older record) while some process runs under it: one
    that leftover_trainer will not kill (the pid may have been reused), to be mentioned, not killed."""
    pid, start_time = _heartbeat_process(heartbeat_file)
    if pid <= 0 or pid == os.getpid() or start_time is not None or _is_zombie(pid):
        return None
    return pid


def _tpu_holders(devices: List[str]) -> List[int]:
    holders = []
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        pid = int(fd_dir.split("/")[2])
        if pid == os.getpid():
            continue
        try:
            targets = {os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)}
        except OSError:
            continue
        if targets & set(devices):
            holders.append(pid)
    return holders


def clean_host(heartbeat_file: Optional[str] = None, lockfile: str = LIBTPU_LOCKFILE,
               devices: Optional[List[str]] = None) -> List[str]:
    """Make the host ready for a trainer; returns what was done, one line per action.

    `devices`: the TPU device files (default: those present). A host without any (a local CPU host) has no
    TPU to free, and its libtpu lockfile, if any, belongs to someone else (e.g. a pre-flight compile).
    """
    actions = []
    if heartbeat_file:
        pid = leftover_trainer(heartbeat_file)
        if pid is not None and _kill(pid):
            actions.append(f"killed leftover trainer pid {pid}")
        unrecorded = unrecorded_trainer_pid(heartbeat_file)
        if unrecorded is not None:
            actions.append(f"left pid {unrecorded} alone: its heartbeat {heartbeat_file} records no start time "
                           "(an older record), so it may be another process now; stop a leftover trainer yourself")
    if devices is None:
        devices = [d for pattern in TPU_DEVICE_GLOBS for d in glob.glob(pattern)]
    if not devices:
        return actions
    for pid in _tpu_holders(devices):
        desc = _cmdline(pid)[:80]
        if _kill(pid):
            actions.append(f"killed pid {pid} holding the TPU ({desc})")
    if os.path.exists(lockfile) and not _tpu_holders(devices):
        try:
            os.remove(lockfile)
            actions.append(f"removed stale {lockfile}")
        except OSError:
            pass
    return actions
