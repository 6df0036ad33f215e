"""Timing points of one host (first step, saves, restores, ...), appended to ${run.dir}/events.jsonl."""
import os
import time
from typing import Any

from trainer.runfiles import EVENTS, append_jsonl


class EventLog:
    """Timing points (first step, saves, restores, ...) for one host, in ${run.dir}/events.jsonl."""

    def __init__(self, run_dir: str, host: int, attempt: int = 0):
        self.path = os.path.join(run_dir, EVENTS)
        self.host, self.attempt = host, attempt

    def __call__(self, event: str, **fields: Any) -> None:
        append_jsonl(self.path, {"event": event, "host": self.host, "attempt": self.attempt,
                                 "time": time.time(), **fields})
