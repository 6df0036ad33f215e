"""Test helper: run a generated bash startup script with stub commands on PATH; returns the logged calls."""
import os
import subprocess
import sys


def run_with_stubs(script: str, tmp_path, stubs: dict, env: dict) -> list:
    """Each stub logs to $STUB_LOG (and may exec $REAL_PYTHON); `env` adds the script's own variables.
    Calling it again in the same tmp_path reruns the script (as after a reboot) with a fresh call log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
                "REAL_PYTHON": sys.executable, **env}
    (tmp_path / "script.sh").write_text(script)
    subprocess.run(["bash", str(tmp_path / "script.sh")], env=full_env, check=True, timeout=20)
    return log.read_text().splitlines()
