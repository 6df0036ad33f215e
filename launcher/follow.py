"""Reattach to a live local run: the same command typed while its supervisor runs follows it to the end.

Shows host 0's progress (the live bar on a terminal, else its lines from its log) until the supervisor releases the run lock, then the outcome from
summary.json. Ctrl-C detaches this terminal; the run goes on. A supervisor that dies instead leaves no new
summary: the command typed again then takes the run over and resumes it.
"""
import json
import os
import sys
import time

from trainer.runfiles import EXIT_FAILED, EXIT_OK, SUMMARY
from launcher.progress import Progress
from launcher.rundir import RunDir


def _say(msg: str) -> None:
    print(f"[launcher] {msg}", flush=True)


def follow(run: RunDir, holder: str, total_steps: int, poll_s: float = 0.5) -> int:
    """total_steps: this command's trainer.steps, for the progress bar (the live launch has the same run)."""
    try:
        return _follow(run, holder, total_steps, poll_s)
    except KeyboardInterrupt:
        _say("detached; the run goes on. Type the same command again to follow it")
        return EXIT_OK


def _follow(run: RunDir, holder: str, total_steps: int, poll_s: float) -> int:
    try:
        who = json.loads(holder)
        who = f"supervisor pid {who.get('pid')} on {who.get('host')}"
    except (json.JSONDecodeError, AttributeError):
        who = holder or "another launcher"
    _say(f"run {os.path.basename(run.path)} is live ({who}); following it (Ctrl-C detaches; the run goes on)")
    since = time.time()
    tail = Progress(run.path, total_steps).start()
    try:
        while run.is_locked():
            time.sleep(poll_s)
    finally:
        tail.stop()
    try:
        fresh = os.path.getmtime(run.file(SUMMARY)) >= since - 1
    except OSError:
        fresh = False
    summary = run.read_json(SUMMARY) if fresh else None
    if summary is None:
        print("error: the run's supervisor ended without writing summary.json (it died); type the same command "
              "again to take the run over and resume it", flush=True, file=sys.stderr)
        return EXIT_FAILED
    if summary.get("status") == "completed":
        _say(f"completed: step {summary.get('final_step')}; summary: {run.file('summary.json')}")
        return EXIT_OK
    print(f"error: {summary.get('error')}", file=sys.stderr, flush=True)
    return int(summary.get("exit_code", EXIT_FAILED))
