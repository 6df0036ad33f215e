"""Test helpers: run the real CLI (`python -m launcher`) and read a run directory."""
import json
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough that a 2-host x 2-device pod of model=tiny trains a step in well under a second here.
TINY = ["model=tiny", "data.max_bytes=1500000", "trainer.batch_size=8", "trainer.log_every=2",
        "trainer.eval_every=4", "trainer.eval_batches=2"]


def launch(*overrides, env=None, timeout=300, cwd=None):
    """Run `python -m launcher OVERRIDES` to completion; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = ROOT + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "launcher", *overrides], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tpu_launch(*args, cwd=None, timeout=300):
    """`tpu-launch ARGS` (the real console entry, launcher/cli.py) as another terminal or a script runs it: no
    terminal on stdin; returns the CompletedProcess (text output)."""
    env = {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH")
                                              else "")}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def finish(proc, timeout=60):
    """Wait for `proc` to end and return (stdout, stderr) from where the test's readline()s stopped.

    Not proc.communicate(timeout=...): with a timeout it reads the pipes' file descriptors directly, and drops
    what a readline() had already buffered from them (often every line the process had printed so far)."""
    got = {}

    def drain(name):
        pipe = getattr(proc, name)
        got[name] = pipe.read() if pipe else None

    timer = threading.Timer(timeout, proc.kill)  # a process that never ends fails the test, not hangs it
    timer.start()
    readers = [threading.Thread(target=drain, args=(name,)) for name in ("stdout", "stderr")]
    try:
        for t in readers:  # both at once: a process blocked on a full stderr pipe never closes its stdout
            t.start()
        for t in readers:
            t.join()
        proc.wait()
    finally:
        timer.cancel()
    return got["stdout"], got["stderr"]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
