"""Append-only JSON-lines writers for the run directory: metrics.jsonl and events.jsonl (timing points)."""
import json
import os
import time
from typing import Any


def append_jsonl(path: str, record: dict) -> None:
    """One O_APPEND write per record, so several processes may append to the same file safely."""
    line = (json.dumps(record, sort_keys=True, default=_default) + "\n").encode()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _default(x: Any):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


class EventLog:
    """Timing points (first step, saves, restores, ...) for one host, in ${run.dir}/events.jsonl."""

    def __init__(self, run_dir: str, host: int, attempt: int = 0):
        self.path = os.path.join(run_dir, "events.jsonl")
        self.host, self.attempt = host, attempt

    def __call__(self, event: str, **fields: Any) -> None:
        append_jsonl(self.path, {"event": event, "host": self.host, "attempt": self.attempt,
                                 "time": time.time(), **fields})
