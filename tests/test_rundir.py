"""Tests for launcher.rundir.RunDir: the run lock across processes, stale-lock takeover, atomic writes, CLI refusal."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launcher.errors import UserError
from launcher.rundir import RunDir
from podutil import finish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = """
import sys, time
from launcher.rundir import RunDir
r = RunDir(sys.argv[1])
r.acquire()
print("held", flush=True)
time.sleep(120)
"""

CONTENDER = """
import sys
from launcher.errors import UserError
from launcher.rundir import RunDir
try:
    RunDir(sys.argv[1]).acquire()
except UserError as e:
    print(f"error: {e}")
    sys.exit(2)
print("acquired")
"""


def _env():
    return dict(os.environ, PYTHONPATH=REPO)


@pytest.fixture
def holder():
    """Start a process that takes the lock of a run dir and sleeps; yields a starter, kills leftovers."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.strip() == "held", proc.stderr.read() if proc.poll() is not None else line
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def _contend(path):
    return subprocess.run([sys.executable, "-c", CONTENDER, str(path)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)


def test_acquire_creates_dir_logs_and_lock(tmp_path):
    run = RunDir(str(tmp_path / "a" / "run"))
    assert not os.path.exists(run.path)
    run.acquire()
    try:
        assert os.path.isdir(run.file("logs"))
        with open(run.file("lock")) as f:
            holder = json.load(f)
        assert holder["pid"] == os.getpid()
        assert abs(holder["since"] - time.time()) < 60 and holder["host"]
        assert run.host_log(1) == os.path.join(run.path, "logs", "host-1.log")
    finally:
        run.release()
    assert open(run.file("lock")).read() == ""  # release clears the holder
    run.acquire()  # and the lock can be taken again
    run.release()


def test_second_acquire_in_another_process_is_refused(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.acquire()
    try:
        result = _contend(run.path)
        assert result.returncode == 2, result.stderr
        line = result.stdout.strip()
        assert line.startswith("error: run.name: a launch of this run is already live"), line
        assert f'"pid": {os.getpid()}' in line  # names the holder
        assert "\n" not in line
    finally:
        run.release()
    result = _contend(run.path)  # released: another process may take it now
    assert result.returncode == 0 and result.stdout.strip() == "acquired", result.stderr


def test_lock_held_by_another_process_then_stale_after_sigkill(tmp_path, holder):
    path = tmp_path / "run"
    proc = holder(path)
    run = RunDir(str(path))
    with pytest.raises(UserError) as info:
        run.acquire()
    assert info.value.key == "run.name"
    assert "already live" in str(info.value) and f'"pid": {proc.pid}' in str(info.value)
    assert run._lock_fd is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # the dead holder's record is still in the file, but the kernel dropped its lock
    assert str(proc.pid) in open(run.file("lock")).read()
    run.acquire()
    try:
        with open(run.file("lock")) as f:
            assert json.load(f)["pid"] == os.getpid()
    finally:
        run.release()


def test_write_json_is_atomic_and_leaves_no_tmp(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.acquire()
    try:
        run.write_json("summary.json", {"b": 1, "a": [1, 2]})
        assert run.read_json("summary.json") == {"a": [1, 2], "b": 1}
        run.write_json("summary.json", {"status": "ok"})
        assert run.read_json("summary.json") == {"status": "ok"}
        run.write_text("config.yaml", "x: 1\n")
        assert open(run.file("config.yaml")).read() == "x: 1\n"
        assert not [f for f in os.listdir(run.path) if f.endswith(".tmp")]
        # a write that fails half-way never replaces the good file
        with pytest.raises(TypeError):
            run.write_json("summary.json", {"status": "half", "bad": object()})
        assert run.read_json("summary.json") == {"status": "ok"}
        assert run.read_json("missing.json") is None
        with open(run.file("broken.json"), "w") as f:
            f.write("{not json")
        assert run.read_json("broken.json") is None
    finally:
        run.release()


def test_event_appends_jsonl(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.acquire()
    try:
        run.event("command_start", argv=["x"])
        run.event("done", code=0)
        with open(run.file("events.jsonl")) as f:
            events = [json.loads(line) for line in f]
        assert [e["event"] for e in events] == ["command_start", "done"]
        assert events[0]["host"] == "launcher" and events[0]["argv"] == ["x"] and events[1]["code"] == 0
    finally:
        run.release()


def _cli(rundir, tmp_path, **kw):
    env = dict(_env(), TPU_LAUNCHER_CACHE=str(tmp_path / "cache"))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "launcher", "run.name=locked", f"run.dir={rundir}",
                             "model=tiny", "trainer.steps=1", "data.max_bytes=1500000"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_line(proc, text, timeout=60):
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no '{text}' in {seen}")


def test_cli_follows_a_run_dir_locked_by_a_live_launch_and_detaches(tmp_path, holder):
    rundir = tmp_path / "r"
    proc = holder(rundir)
    before = sorted(os.listdir(rundir))
    cli = _cli(rundir, tmp_path)
    seen = _wait_for_line(cli, "is live")
    assert f"supervisor pid {proc.pid}" in seen[-1] and "following it" in seen[-1]
    cli.send_signal(signal.SIGINT)  # Ctrl-C detaches the follower, nothing else
    out, err = finish(cli)
    assert cli.returncode == 0, (out, err)
    assert "detached; the run goes on" in out and "Traceback" not in out + err
    # a second supervisor never started: no config/events written, no Ray, no trainer
    assert sorted(os.listdir(rundir)) == before == ["lock", "logs"]
    assert os.listdir(rundir / "logs") == []
    assert proc.poll() is None  # the live holder is untouched
    with open(rundir / "lock") as f:
        assert json.load(f)["pid"] == proc.pid


def test_cli_follower_reports_a_supervisor_that_died(tmp_path, holder):
    rundir = tmp_path / "r"
    proc = holder(rundir)
    cli = _cli(rundir, tmp_path)
    _wait_for_line(cli, "is live")
    proc.kill()  # the supervisor dies without a summary; the kernel releases its lock
    proc.wait()
    out, err = finish(cli)
    assert cli.returncode == 1, (out, err)
    assert "ended without writing summary.json" in err and "type the same command again" in err


def test_cli_run_dir_that_cannot_be_created_is_one_error_line(tmp_path):
    rundir = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", rundir)
    env = dict(_env(), TPU_LAUNCHER_CACHE=str(tmp_path / "cache"))
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-m", "launcher", "run.name=dangling", f"run.dir={rundir}", "model=tiny",
                             "trainer.steps=1", "data.max_bytes=1500000"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run.dir"), result.stderr
    assert not os.path.exists(tmp_path / "nowhere")
