"""Test helper for chaos tests: run the real CLI in the background and hurt it at chosen steps.

`Chaos` starts `python -m launcher ...` and follows the hosts' heartbeats (`${run.dir}/hosts/host-<i>.json`);
`until(attempt, step)` waits until a host of that attempt reached the step (or `phase` prefix), then the test
sends real signals to real processes: a host's trainer (pid from its heartbeat) or the supervisor itself.
"""
import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from podutil import ROOT


class Chaos:
    def __init__(self, run_dir: str, *overrides, env=None, hosts: int = 2):
        self.run_dir, self.hosts = run_dir, hosts
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = ROOT + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
        self.out_path = os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".out")
        self.out = open(self.out_path, "w")
        # Its own process group, as a command typed in a terminal: Ctrl-C is SIGINT to that whole group.
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", *overrides], cwd=ROOT, env=full_env,
                                     stdout=self.out, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def beat(self, host: int) -> Optional[dict]:
        try:
            with open(os.path.join(self.run_dir, "hosts", f"host-{host}.json")) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def until(self, attempt: int, step: int = 0, phase: str = "", host: int = 0, timeout: float = 240) -> dict:
        """Wait until `host` of `attempt` has reached `step` (and is in a phase starting with `phase`)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            b = self.beat(host)
            if (b and b.get("attempt") == attempt and b.get("exit") is None and (b.get("step") or 0) >= step
                    and str(b.get("phase", "")).startswith(phase)):
                return b
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited ({self.proc.returncode}) before attempt {attempt} "
                                     f"reached step {step}:\n{self.output()[-3000:]}")
            time.sleep(0.01)
        raise AssertionError(f"attempt {attempt} did not reach step {step} phase '{phase}' on host {host} "
                             f"in {timeout}s:\n{self.output()[-3000:]}")

    def signal_host(self, host: int, sig: int, attempt: int, **until) -> dict:
        b = self.until(attempt, host=host, **until)
        os.kill(b["pid"], sig)
        return b

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float = 400) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=60)
            raise AssertionError(f"launcher did not finish in {timeout}s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.out.flush()
        with open(self.out_path) as f:
            return f.read()
