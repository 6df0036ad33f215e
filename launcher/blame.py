"""Which host a failure is blamed on, from the run directory's files, and what that host's log says about it.

Shared by the supervisor (it orders the hosts' failures by the times their heartbeats recorded) and
`tpu-launch logs --first-error`. The verdict itself is launcher/classify.py's: the evidence is rebuilt from the
files the supervisor wrote (the `failure` record in events.jsonl: its exit codes, and since this module the
blamed host) and the hosts' heartbeats (exit code and reason, last phase, and when each host exited or went
silent), so a run looked at later, or from another terminal, is blamed as its supervisor blamed it.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from launcher.classify import Evidence, classify
from trainer import runfiles

TRACEBACK = "Traceback (most recent call last):"
# Lines that start an error in a host's log: a logged ERROR/CRITICAL record, or a fatal signal (faulthandler).
_ERROR_MARKS = (" ERROR ", " CRITICAL ", "Fatal Python error")


@dataclass
class Blame:
    host: int
    attempt: Optional[int]
    time: Optional[float]  # when the host exited (or last beat, for a host that died without an exit record)
    code: Optional[int]  # its exit code, when known
    cause: str  # the classify cause: user_error, crash, preemption, ...
    detail: str
    failures: int  # failure records of the run in all (this is the latest)


def heartbeats(run_dir: str) -> Dict[int, dict]:
    """Every host's heartbeat (hosts/host-<i>.json) that can be read, by host number."""
    return {i: hb for i in runfiles.host_ids(run_dir, runfiles.HOSTS)
            if isinstance(hb := runfiles.read_json(runfiles.heartbeat_file(run_dir, i)), dict)}


def exit_times(run_dir: str, attempt: int) -> Dict[int, float]:
    """Per host of `attempt`: when it exited (its heartbeat's last write, the exit record's), or for a host that
    died without one (killed) its last beat: the order in which the hosts failed."""
    return {i: float(hb["time"]) for i, hb in heartbeats(run_dir).items()
            if hb.get("attempt") == attempt and isinstance(hb.get("time"), (int, float))}


def evidence(run_dir: str, attempt: int, codes: Dict[int, int]) -> Evidence:
    """The evidence of the supervisor's classify, from the files: exit codes (as the supervisor saw them, else
    the heartbeats'), exit reasons, last phases and failure times of the hosts of `attempt`."""
    ev = Evidence(codes=dict(codes), times=exit_times(run_dir, attempt))
    for i, hb in heartbeats(run_dir).items():
        if hb.get("attempt") != attempt:
            continue
        ev.phases[i] = hb.get("phase") or runfiles.PHASE_INIT
        exit_record = hb.get("exit") or {}
        if exit_record:
            ev.reasons[i] = exit_record.get("reason", "")
            if not codes and isinstance(exit_record.get("code"), int):
                ev.codes[i] = exit_record["code"]
    return ev


def blame(run_dir: str) -> Optional[Blame]:
    """The host the run's latest failure is blamed on, or None if the run has no failure: the latest `failure`
    record of events.jsonl (with no record, the heartbeats of the latest attempt, for a supervisor that died
    before writing one)."""
    events = runfiles.read_jsonl(runfiles.path(run_dir, runfiles.EVENTS))
    failures = [e for e in events if e.get("event") == "failure" and e.get("host") == "launcher"]
    if failures:
        record = failures[-1]
        attempt = record.get("attempt")
        codes = {int(k): int(v) for k, v in (record.get("codes") or {}).items()}
    else:
        attempts = [hb.get("attempt") for hb in heartbeats(run_dir).values() if isinstance(hb.get("attempt"), int)]
        if not attempts:
            return None
        attempt, codes, record = max(attempts), {}, {}
    ev = evidence(run_dir, attempt, codes)
    if not failures and not any(c != 0 for c in ev.codes.values()):
        return None
    verdict = classify(ev)
    host = record.get("blamed", verdict.host)  # the supervisor's own verdict, where it recorded one
    if host is None:  # the whole slice (a TPU node's state): name the host that went first
        failed = sorted(ev.times, key=lambda i: ev.times[i])
        if not failed:
            return None
        host = failed[0]
    return Blame(host=host, attempt=attempt, time=ev.times.get(host), code=ev.codes.get(host),
                 cause=record.get("cause", verdict.cause), detail=record.get("detail", verdict.detail),
                 failures=len(failures))


def first_error(log_text: str) -> Tuple[Optional[str], List[str]]:
    """(first error line, traceback lines) of a host's log: the log's last traceback (a log holds every attempt's
    output; the latest failure is at its end), and the first error line since the output before it: a logged
    ERROR record, a fatal signal, or else the traceback's own last line (the exception)."""
    lines = log_text.splitlines()
    starts = [n for n, line in enumerate(lines) if line.strip() == TRACEBACK]
    traceback: List[str] = []
    since, end = 0, len(lines)
    if starts:
        start = starts[-1]
        since = starts[-2] + 1 if len(starts) > 1 else 0
        end = start + 1
        while end < len(lines) and (lines[end].startswith(" ") or not lines[end].strip()):
            end += 1
        traceback = lines[start:end + 1]  # the frames and the exception line after them
    for line in lines[since:end]:
        if any(mark in line for mark in _ERROR_MARKS):
            return line, traceback
    return (traceback[-1] if traceback else None), traceback
