"""Goodput ledger writer: appends timing records to ${run.dir}/goodput.jsonl (trainer host 0 and the supervisor).

Each record is one JSON line `{"kind": ..., "time": <unix seconds>, "attempt": N?, ...fields}`, written with a
single O_APPEND write, so the supervisor and trainer host 0 can append to the same file. The record kinds and
how they add up to goodput and badput are described in launcher/goodput.py, which reads them.
"""
import os
import time
from typing import Any, Optional

from trainer.runfiles import GOODPUT, append_jsonl


class GoodputLog:
    """Appends goodput records for one run (and, for trainer records, one attempt)."""

    def __init__(self, run_dir: str, attempt: Optional[int] = None):
        self.path = os.path.join(run_dir, GOODPUT)
        self.attempt = attempt

    def __call__(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "time": time.time()}
        if self.attempt is not None:
            record["attempt"] = self.attempt
        record.update(fields)
        append_jsonl(self.path, record)
