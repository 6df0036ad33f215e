"""Host hygiene: leftover trainers from earlier attempts and processes holding the TPU are killed."""
import json
import os
import subprocess
import sys
import time

from cluster.hygiene import clean_host, leftover_trainer
from trainer.heartbeat import process_start_time


def _spawn(code: str, *args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)
    deadline = time.time() + 30  # right after fork the child still shows the parent's command line
    while code not in open(f"/proc/{proc.pid}/cmdline").read().replace("\0", " "):
        assert time.time() < deadline, f"process {proc.pid} never exec'd"
        time.sleep(0.01)
    return proc


def _write_hb(path, pid, start_time=True):
    """A heartbeat as the trainer writes it (pid and its start time); start_time=False: an older record."""
    beat = {"pid": pid, "step": 3}
    if start_time:
        beat["pid_start_time"] = process_start_time(pid)
    with open(path, "w") as f:
        json.dump(beat, f)


def test_leftover_trainer_is_killed(tmp_path):
    # argv carries "trainer.main", as a real trainer's does
    proc = _spawn("import time; time.sleep(60)", "-m", "trainer.main")
    hb = tmp_path / "host-0.json"
    _write_hb(hb, proc.pid)
    assert leftover_trainer(str(hb)) == proc.pid
    actions = clean_host(str(hb), devices=[])
    assert actions == [f"killed leftover trainer pid {proc.pid}"]
    assert proc.wait(timeout=10) == -9


def test_a_reused_pid_that_is_not_a_trainer_is_left_alone(tmp_path):
    proc = _spawn("import time; time.sleep(60)")
    try:
        hb = tmp_path / "host-0.json"
        _write_hb(hb, proc.pid)
        assert clean_host(str(hb), devices=[]) == []
        time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_heartbeat_without_a_start_time_kills_nothing_and_says_so(tmp_path):
    """An older heartbeat (pid, no pid_start_time) names no process: even one whose command line says trainer.main
    is left alone, since the pid may have been reused; the hygiene line says why."""
    proc = _spawn("import time; time.sleep(60)", "-m", "trainer.main")
    try:
        hb = tmp_path / "host-0.json"
        _write_hb(hb, proc.pid, start_time=False)
        assert leftover_trainer(str(hb)) is None
        assert clean_host(str(hb), devices=[]) == [
            f"left pid {proc.pid} alone: its heartbeat {hb} records no start time (an older record), so it may be "
            "another process now; stop a leftover trainer yourself"]
        time.sleep(0.2)
        assert proc.poll() is None
        gone = tmp_path / "gone.json"  # an older record whose pid runs nothing: nothing to say
        _write_hb(gone, 2 ** 22 + 1, start_time=False)
        assert clean_host(str(gone), devices=[]) == []
    finally:
        proc.kill()
        proc.wait()


def test_missing_or_torn_heartbeat_is_harmless(tmp_path):
    assert clean_host(str(tmp_path / "none.json"), devices=[]) == []
    torn = tmp_path / "torn.json"
    torn.write_text('{"pid": 12')
    assert clean_host(str(torn), devices=[]) == []


def test_tpu_holder_killed_and_stale_lockfile_removed(tmp_path):
    device = tmp_path / "accel0"
    device.write_text("")
    lock = tmp_path / "libtpu_lockfile"
    lock.write_text("")
    ready = tmp_path / "ready"
    holder = _spawn("import sys, time; f = open(sys.argv[1]); open(sys.argv[2], 'w').close(); time.sleep(60)",
                    str(device), str(ready))
    deadline = time.time() + 10
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    actions = clean_host(None, lockfile=str(lock), devices=[str(device)])
    assert any(f"killed pid {holder.pid} holding the TPU" in a for a in actions), actions
    assert f"removed stale {lock}" in actions
    assert holder.wait(timeout=10) == -9
    assert not lock.exists()


def test_lockfile_kept_on_a_host_without_tpu(tmp_path):
    lock = tmp_path / "libtpu_lockfile"
    lock.write_text("")
    assert clean_host(None, lockfile=str(lock), devices=[]) == []
    assert lock.exists()
