"""The trainer's own exit paths, without Ray: a jax.distributed join that times out is restartable (exit 42)."""
import json
import os
import subprocess
import sys

from launcher.hosts import coordinator_port
from podutil import ROOT


def test_distributed_init_timeout_exits_42_with_its_reason(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        f"run:\n  dir: {run_dir}\ntrainer:\n  init_timeout_s: 3\nwatchdog:\n  heartbeat_s: 0.2\n")
    # Process 1 of 2: the coordinator (process 0) never comes up.
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "trainer.main", "--config", str(run_dir / "config.yaml"),
                           "--process-id", "1", "--num-processes", "2", "--coordinator",
                           f"127.0.0.1:{coordinator_port()}", "--devices", "1", "--attempt", "3"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 42, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "could not join jax.distributed" in proc.stdout
    beat = json.loads((run_dir / "hosts" / "host-1.json").read_text())
    assert beat["exit"] == {"code": 42, "reason": "init_failed"} and beat["attempt"] == 3 and beat["step"] is None
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["process_start", "error"] and events[1]["kind"] == "init"
