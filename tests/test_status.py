"""`tpu-launch status`: a live run (then its launcher SIGKILLed: supervisor lost), a completed one, --json, --watch,
a cloud run's queued resource and cost against the TPU API test server, and that status imports no jax or ray.
(The failed run's status is in tests/test_logs.py, which shares its one failed run with --first-error.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chaos import Chaos
from cluster.hygiene import kill_recorded
from podutil import ROOT, TINY, explain, finish, read_json, tpu_launch
from trainer import runfiles


def status(*args) -> list:
    proc = tpu_launch("status", "--json", *args)
    assert proc.returncode == 0, explain(proc)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _running(pid: int) -> bool:
    """Whether pid runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_completed_run_and_the_table(trained_run):
    [st] = status(trained_run)
    assert (st["name"], st["state"], st["step"], st["total"], st["hosts"], st["hosts_alive"]) == \
        ("trained", "completed", 12, 12, 2, 0)
    summary = read_json(os.path.join(trained_run, "summary.json"))
    last = [m for m in runfiles.read_jsonl(os.path.join(trained_run, "metrics.jsonl")) if "split" not in m][-1]
    assert (st["loss"], st["tokens_per_s"], st["mfu"]) == (last["loss"], last["tokens_per_s"], last.get("mfu"))
    assert st["goodput"] == summary["goodput"] and st["restarts"] == {} and st["eta_s"] is None
    assert st["cloud"] is None
    # by name under --root, as a table: a header and one row
    proc = tpu_launch("status", "--root", os.path.dirname(trained_run))
    assert proc.returncode == 0, explain(proc)
    header, row = proc.stdout.splitlines()
    assert header.split()[:3] == ["RUN", "STATE", "STEP"]
    assert row.split()[:4] == ["trained", "completed", "12/12", f"{last['loss']:.4f}"]
    assert "0/2" in row


def test_status_imports_neither_jax_nor_ray(trained_run):
    code = ("import sys; from launcher.cli import main; assert main(['status', sys.argv[1]]) == 0; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'ray', 'flax', 'orbax')); "
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code, trained_run], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.splitlines()[-1] == "HEAVY []"


def test_watch_prints_again_when_not_a_terminal(trained_run):
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "status", trained_run, "--watch", "0.2"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]  # header, row, header, row
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0
    assert lines[0] == lines[2] and lines[0].startswith("RUN") and "\033[" not in "".join(lines)
    assert lines[1].split()[:2] == lines[3].split()[:2] == ["trained", "completed"]


def test_live_run_then_its_launcher_killed_is_supervisor_lost(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "live")
    chaos = Chaos(run_dir, "run.name=live", f"run.dir={run_dir}", *TINY, "trainer.steps=2000",
                  "checkpoint.every=1000")
    pod, trainers = {}, []
    try:
        for host in (0, 1):
            chaos.until(0, step=2, phase=runfiles.PHASE_TRAIN, host=host)
        pod = read_json(os.path.join(run_dir, "pod.json"))
        trainers = [chaos.beat(i)["pid"] for i in (0, 1)]
        [first] = status(run_dir)
        assert (first["state"], first["total"], first["hosts"], first["hosts_alive"]) == ("running", 2000, 2, 2)
        assert first["step"] >= 2 and first["heartbeat_age_s"] is not None
        chaos.until(0, step=first["step"] + 4)
        [second] = status(run_dir)
        assert second["state"] == "running" and second["step"] > first["step"]
        assert second["eta_s"] is not None and second["eta_s"] > 0 and second["goodput"] is not None
        row = tpu_launch("status", run_dir).stdout.splitlines()[1]
        assert row.split()[:2] == ["live", "running"] and "2/2 (" in row
        follow = subprocess.Popen([sys.executable, "-m", "launcher.cli", "logs", run_dir, "--follow"], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True)
        assert follow.stdout.readline().startswith("[")  # host 0's log so far, then its new lines

        os.kill(chaos.proc.pid, signal.SIGKILL)  # the supervisor dies; its pod and trainers are left behind
        chaos.proc.wait(timeout=30)
        followed, _ = finish(follow)  # --follow ends once no launcher holds the run
        assert follow.returncode == 0 and "[host 0] step" in followed
        [lost] = status(run_dir)
        assert lost["state"] == "supervisor lost", lost
        assert "supervisor lost" in tpu_launch("status", run_dir).stdout
    finally:
        if chaos.proc.poll() is None:
            chaos.proc.kill()
            chaos.proc.wait()
        # What the next launch's takeover does (launcher/supervisor.py _take_over): stop the recorded Ray
        # processes; the trainers exit with their actors (trainer/distributed.py watch_parent). Ray's agents are
        # not recorded: they are in the launcher's process group (Chaos starts it in its own session).
        kill_recorded(pod.get("processes") or [])
        _kill_group(chaos.proc.pid)
        deadline = time.time() + 60
        while time.time() < deadline and (any(_running(p) for p in trainers) or _group(chaos.proc.pid)):
            time.sleep(0.2)
        left = [p for p in trainers if _running(p)] + _group(chaos.proc.pid)
        for p in left:
            os.kill(p, signal.SIGKILL)
    assert not left, f"processes {left} outlived the run's Ray processes"


def _group(pgid: int) -> list:
    """The running processes of process group `pgid`."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or it just ended
        if fields[2] == str(pgid) and fields[0] != "Z":
            found.append(int(name))
    return found


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing of the group is left


PROJECT, ZONE = "proj", "us-central2-b"


def _cloud_run(run_dir, endpoint, ended, bucket):
    """A cloud run of run "cloudy" as the laptop has it: only its config.yaml here. Its supervisor, a Ray job on the
    head, wrote a launch that began two hours ago (and, `ended`, lasted one hour) into the head's run directory and
    mirrored it to the run's bucket (launcher/mirror.py), which status reads."""
    from launcher import mirror

    cfg = {"run": {"name": "cloudy", "dir": run_dir}, "trainer": {"steps": 100}, "watchdog": {"heartbeat_s": 1.0},
           "cluster": {"provider": "gcp", "accelerator_type": "v4-8", "num_slices": 1, "hosts": None,
                       "project": PROJECT, "zone": ZONE, "capacity": "on_demand", "price_on_demand": None,
                       "price_spot": None, "tpu_api_endpoint": endpoint, "bucket": bucket}}
    runfiles.write_atomic(os.path.join(run_dir, runfiles.CONFIG), json.dumps(cfg))  # JSON is YAML
    head = run_dir + "-on-the-head"
    start = time.time() - 7200
    events = os.path.join(head, runfiles.EVENTS)
    runfiles.append_jsonl(events, {"event": "command_start", "host": "launcher", "time": start})
    if ended:
        runfiles.append_jsonl(events, {"event": "command_end", "host": "launcher", "time": start + 3600,
                                       "status": "completed"})
        runfiles.write_json(os.path.join(head, runfiles.SUMMARY), {"status": "completed"})
    mirror.Mirror(head, mirror.url_for(cfg)).push()
    return run_dir


def test_cloud_run_queued_resource_state_and_cost(tmp_path, gcs_emulator):
    from cluster.gcp import GcpTpuProvider, make_client
    from tpu_api_server import TpuApiServer

    with TpuApiServer(tick_s=0.05) as server:
        provider = GcpTpuProvider(PROJECT, ZONE, client=make_client(server.url), poll_s=0.01, timeout_s=10,
                                  progress=lambda _: None)
        provider.ensure("cloudy", "v4-8", "tpu-ubuntu2204-base")
        provider.wait_active("cloudy")
        ended = _cloud_run(str(tmp_path / "ended"), server.url, True, f"gs://{gcs_emulator.bucket}/ended")
        live = _cloud_run(str(tmp_path / "live"), server.url, False, f"gs://{gcs_emulator.bucket}/live")
        assert sorted(os.listdir(live)) == [runfiles.CONFIG]
        [st] = status(ended)
        cloud = st["cloud"]
        assert (st["state"], cloud["queued_resource"], cloud["state"]) == ("completed", "cloudy-qr", "ACTIVE")
        assert cloud["nodes"] == {"cloudy": "READY"}
        # v4-8: 4 chips at the catalog's on-demand list price, for the launch's hour
        assert cloud["price_per_hour_usd"] == pytest.approx(4 * 3.22) and cloud["cost_usd"] == 12.88
        # a launch with no end and no lock here, whose queued resource is live: a supervisor in a Ray job on the head
        [st] = status(live)
        assert (st["state"], st["cloud"]["state"]) == ("running", "ACTIVE") and st["cloud"]["cost_usd"] > 25
        row = tpu_launch("status", live).stdout.splitlines()[1]
        assert row.split()[-3:-1] == ["cloudy-qr", "ACTIVE"] and row.split()[-1].startswith("$")
    # the API is gone: the state says why it is unknown, in one line, and status still works
    [st] = status(live)
    assert st["cloud"]["state"].startswith("unknown (") and "\n" not in st["cloud"]["state"]
    assert st["state"] == "supervisor lost"
    proc = tpu_launch("status", live)
    assert proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr and "unknown (" in proc.stdout


def test_restarting_until_the_hosts_train_again(tmp_path):
    """A live launcher (the lock, held here) whose attempt 0 failed: `restarting` while attempt 1's hosts start
    up, `running` once they all train."""
    from launcher.rundir import RunDir

    run_dir = str(tmp_path / "restart")
    run = RunDir(run_dir)
    run.acquire()
    try:
        runfiles.write_atomic(os.path.join(run_dir, runfiles.CONFIG), json.dumps(
            {"run": {"name": "restart"}, "trainer": {"steps": 50}, "cluster": {"provider": "local", "hosts": 2}}))
        now = time.time()
        events, ledger = os.path.join(run_dir, runfiles.EVENTS), os.path.join(run_dir, runfiles.GOODPUT)
        runfiles.append_jsonl(events, {"event": "command_start", "host": "launcher", "time": now - 60})
        runfiles.append_jsonl(events, {"event": "failure", "host": "launcher", "time": now - 20, "attempt": 0,
                                       "cause": "crash", "blamed": 1, "codes": {"1": 137}})
        for record in ({"kind": "launch", "time": now - 60}, {"kind": "attempt_start", "attempt": 0, "time": now - 59},
                       {"kind": "failure", "attempt": 0, "time": now - 20, "cause": "crash", "last_step": 7},
                       {"kind": "attempt_start", "attempt": 1, "time": now - 10}):
            runfiles.append_jsonl(ledger, record)

        def beat(phase):
            for i in (0, 1):
                runfiles.write_json(runfiles.heartbeat_file(run_dir, i), {"attempt": 1, "phase": phase, "step": 4,
                                                                           "time": time.time(), "exit": None})

        beat(runfiles.PHASE_COMPILE)
        [st] = status(run_dir)
        assert (st["state"], st["restarts"], st["hosts_alive"]) == ("restarting", {"crash": 1}, 2)
        beat(runfiles.PHASE_TRAIN)
        assert status(run_dir)[0]["state"] == "running"
    finally:
        run.release()
    assert status(run_dir)[0]["state"] == "supervisor lost"  # no end recorded, and nothing holds the lock now
