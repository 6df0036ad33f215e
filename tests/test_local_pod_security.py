"""Integration: a local pod listens on loopback only, and refuses a Ray client and a job submission without its token.

While a real 2-host pod trains, every listening socket of the launcher's process tree (Ray head, raylets,
agents, dashboard, host actors, trainers and the JAX coordinator) is sampled; a Ray client and an HTTP call to
the job server from a process with no token (another HOME, no RAY_AUTH_* variables) are refused.
"""
import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from podutil import ROOT, TINY, explain, read_json, read_jsonl

pytestmark = pytest.mark.integration

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")

_CLIENT = """
import sys, ray
try:
    ray.init(address=sys.argv[1])
    print("CONNECTED")
except Exception as e:  # the refusal surfaces as a ConnectionError after Ray's retries
    print("REFUSED", type(e).__name__)
"""


def _listeners(root: psutil.Process):
    """(pid, name, ip, port) of every TCP/UDP socket listening in root's process tree."""
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # TCP listen, or bound UDP
                out.append((proc.pid, name, c.laddr.ip, c.laddr.port))
    return out


def _priorities(root: psutil.Process):
    """{"raylet" | "gcs_server" | "trainer": the nice values of its processes' threads} in root's tree, or None
    while no trainer runs yet."""
    out = {}
    for proc in root.children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            kind = "trainer" if "trainer.main" in cmd else proc.name()
            if kind in ("raylet", "gcs_server", "trainer"):
                out.setdefault(kind, set()).update(os.getpriority(os.PRIO_PROCESS, t.id) for t in proc.threads())
        except (psutil.Error, OSError):
            continue
    return out if "trainer" in out else None


def _no_token_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path / "stranger"), PYTHONPATH=ROOT, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    os.makedirs(env["HOME"], exist_ok=True)
    return env


def test_local_pod_is_loopback_only_and_refuses_strangers(tmp_path, corpus_cache):
    run_dir = tmp_path / "locked"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run.name=locked", f"run.dir={run_dir}", *TINY,
                             "trainer.steps=400", "checkpoint.every=200", "ray.dashboard=true"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    seen, address = set(), None
    stranger = job_status = priorities = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            seen.update(_listeners(root))
            priorities = priorities or _priorities(root)
            if address is None and (run_dir / "events.jsonl").exists():
                ready = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "ray_ready"]
                address = ready[0]["address"] if ready else None
            if address and stranger is None and (run_dir / "hosts" / "host-0.json").exists():
                stranger = subprocess.Popen([sys.executable, "-c", _CLIENT, address], env=_no_token_env(tmp_path),
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if stranger is not None and job_status is None:
                job_status = _job_server_status(seen, run_dir / "auth" / "ray_token")
            if stranger is not None and stranger.poll() is not None and job_status is not None and \
                    any(n == "python" or "trainer" in n for _, n, _, _ in seen):
                break
            time.sleep(0.5)
        stranger_out = stranger.communicate(timeout=120)[0] if stranger else ""
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    # Every socket the pod listened on was on loopback; and there were many (GCS, raylets, agents, trainers).
    assert len(seen) >= 10, seen
    public = sorted(s for s in seen if s[2] not in LOOPBACK)
    assert public == [], f"listening beyond loopback: {public}"
    coordinator_pids = {s[0] for s in seen if 20000 <= s[3] < 32768}
    assert coordinator_pids, "the JAX coordinator's listener was not seen"
    # A client without the token is refused by the pod's GCS; the job server answers 401 without it.
    assert stranger_out.strip() == "REFUSED ConnectionError", stranger_out
    assert job_status == (401, 200), job_status
    # The token lives only in the run's record, 0600 in a 0700 directory, and nowhere else in the run dir.
    token_file = run_dir / "auth" / "ray_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((run_dir / "auth").stat().st_mode) == 0o700
    token = token_file.read_text().strip()
    assert len(token) == 64
    leaks = [str(p) for p in run_dir.rglob("*") if p.is_file() and p != token_file and token in
             p.read_text(errors="replace")]
    assert leaks == [] and token not in out
    assert read_json(run_dir / "summary.json")["status"] == "completed"
    # Ray's bookkeeping yields the shared cores to the trainers (cluster/local.py DAEMON_NICE); raylets and the
    # trainers keep their own priorities (0, and Ray's worker niceness)
    assert priorities is not None
    assert priorities["gcs_server"] == {19} and priorities["raylet"] == {0}, priorities
    assert max(priorities["trainer"]) < 19, priorities


def _job_server_status(seen, token_file):
    """(status of a job submission without a token, status of the job list with the run's token) of the pod's job
    server (the dashboard's port)."""
    for pid, name, ip, port in sorted(seen):
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if "dashboard/dashboard.py" not in cmd:
            continue
        statuses = []
        # Without the token: a real job submission (POST); with it: the job list (nothing is submitted).
        submit = json.dumps({"entrypoint": "echo stranger"}).encode()
        for data, headers in ((submit, {"Content-Type": "application/json"}),
                              (None, {"Authorization": f"Bearer {token_file.read_text().strip()}"})):
            try:
                with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/jobs/", data=data,
                                                                   headers=headers), timeout=5) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
            except (urllib.error.URLError, OSError):
                break
        if len(statuses) == 2 and statuses[0] != 404:
            return tuple(statuses)
    return None
