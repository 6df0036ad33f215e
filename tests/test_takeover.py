"""Takeover after a dead supervisor kills only the recorded Ray processes: same pid AND same start time."""
import json
import os
import subprocess
import sys
import time

from cluster.hygiene import kill_recorded, leftover_trainer, process_start_time
from launcher.rundir import RunDir
from launcher.supervisor import _take_over

# argv contains "ray", as the old name check looked for
SLEEPER = "import time; time.sleep(60)"


def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLEEPER, *args])


def _events(run):
    with open(run.file("events.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_process_start_time_is_fixed_and_differs_between_processes():
    a = _spawn("ray")
    try:
        t = process_start_time(a.pid)
        assert isinstance(t, int) and t == process_start_time(a.pid)
        assert process_start_time(os.getpid()) is not None and process_start_time(os.getpid()) <= t
    finally:
        a.kill()
        a.wait()
    assert process_start_time(a.pid) is None  # reaped: gone


def test_takeover_kills_only_processes_whose_pid_and_start_time_match(tmp_path, capsys):
    ours = _spawn("raylet")          # the dead supervisor's Ray process, as recorded
    stranger = _spawn("ray-unrelated")  # a later process that got a recorded pid (recorded start time differs)
    try:
        run = RunDir(str(tmp_path / "run"))
        os.makedirs(run.path, exist_ok=True)
        run.taken_over = {"pid": 999999, "host": "h"}
        run.write_json("pod.json", {"supervisor_pid": 999999, "processes": [
            {"pid": ours.pid, "start_time": process_start_time(ours.pid)},
            {"pid": stranger.pid, "start_time": process_start_time(stranger.pid) - 1},
        ]})
        _take_over(run)
        assert ours.wait(timeout=10) == -9
        time.sleep(0.2)
        assert stranger.poll() is None, "a process whose start time differs from the record was killed"
        out = capsys.readouterr().out
        assert f"{stranger.pid}: pid reused" in out
        ev = [e for e in _events(run) if e.get("event") == "lock_taken_over"][-1]
        assert ev["killed_ray_pids"] == [ours.pid]
        assert [s["pid"] for s in ev["skipped_ray_pids"]] == [stranger.pid]
        assert not os.path.exists(run.file("pod.json"))
    finally:
        for p in (ours, stranger):
            p.kill()
            p.wait()


def test_records_without_start_time_or_of_dead_processes_are_skipped():
    stranger = _spawn("ray")
    gone = _spawn("ray")
    gone_start = process_start_time(gone.pid)
    gone.kill()
    gone.wait()
    try:
        killed, skipped = kill_recorded([stranger.pid, {"pid": stranger.pid}, {"pid": "x", "start_time": 1},
                                         {"pid": gone.pid, "start_time": gone_start}])
        assert killed == []
        assert [s["reason"] for s in skipped] == ["no start time recorded", "no start time recorded",
                                                  "malformed record", "no longer running"]
        time.sleep(0.2)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_legacy_pod_json_with_bare_pids_kills_nothing(tmp_path):
    stranger = _spawn("ray")
    try:
        run = RunDir(str(tmp_path / "run"))
        os.makedirs(run.path, exist_ok=True)
        run.write_json("pod.json", {"supervisor_pid": 1, "ray_pids": [stranger.pid]})
        _take_over(run)
        time.sleep(0.2)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def _until_exec(pid: int, marker: str, timeout: float = 30) -> None:
    """Right after fork the child still shows the parent's command line: wait until it has exec'd."""
    deadline = time.time() + timeout
    while marker not in open(f"/proc/{pid}/cmdline").read().replace("\0", " "):
        assert time.time() < deadline, f"process {pid} never showed {marker} in its command line"
        time.sleep(0.01)


def test_leftover_trainer_requires_the_heartbeats_start_time(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, "-m", "trainer.main"], start_new_session=True)
    try:
        _until_exec(proc.pid, "trainer.main")
        hb = tmp_path / "host-0.json"
        hb.write_text(json.dumps({"pid": proc.pid, "pid_start_time": process_start_time(proc.pid) - 1}))
        assert leftover_trainer(str(hb)) is None  # same pid and cmdline, but a different process
        hb.write_text(json.dumps({"pid": proc.pid, "pid_start_time": process_start_time(proc.pid)}))
        assert leftover_trainer(str(hb)) == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_heartbeat_records_its_start_time(tmp_path):
    from trainer.heartbeat import Heartbeat, read_heartbeat

    Heartbeat(str(tmp_path), 0, attempt=0, interval_s=60).start().finish(0, "done")
    beat = read_heartbeat(str(tmp_path), 0)
    assert beat["pid"] == os.getpid() and beat["pid_start_time"] == process_start_time(os.getpid())


def test_a_local_pods_record_holds_the_raylets_agents_so_a_takeover_leaves_no_orphans():
    """The raylets' dashboard and runtime-env agents are children Ray does not list: the pod's record must hold
    them, or killing the recorded processes after a dead supervisor leaves them running."""
    import psutil

    from cluster.local import LocalProvider
    from cluster.slice import local_slice

    provider = LocalProvider(local_slice("agents", hosts=1, devices_per_host=1, name="tpu-agents-test"))
    provider.up()
    try:
        deadline = time.time() + 60
        while True:
            recorded = {p["pid"] for p in provider.processes()}
            tree = {c.pid: " ".join(c.cmdline()) for pid in recorded if psutil.pid_exists(pid)
                    for c in psutil.Process(pid).children(recursive=True)}
            agents = {pid for pid, cmd in tree.items() if "agent" in cmd.lower()}
            if agents or time.time() > deadline:
                break
            time.sleep(0.5)
        assert agents, f"no agent process under the pod's Ray processes: {tree}"
        assert agents <= recorded
        killed, _ = kill_recorded(provider.processes())
        assert set(killed) >= agents
        deadline = time.time() + 30
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in agents):
            assert time.time() < deadline, "an agent outlived the takeover's kill"
            time.sleep(0.2)
    finally:
        provider.down()
