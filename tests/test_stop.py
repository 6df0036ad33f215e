"""`tpu-launch stop`: a live local run stopped from another process checkpoints at one agreed step and resumes there.

(The cloud path, stopping the supervisor's Ray job, is tested in tests/test_tpu_pod.py, on the detached job.)
"""
import fcntl
import json
import os
import time

import pytest

from chaos import Chaos
from podutil import TINY, explain, launch, read_json, tpu_launch as cli

RUN = [*TINY, "trainer.steps=40", "optimizer.decay_steps=40", "optimizer.warmup_steps=4", "checkpoint.every=10",
       "trainer.eval_every=20", "watchdog.heartbeat_s=0.1"]


@pytest.mark.integration
def test_stop_from_another_process_saves_one_step_and_the_command_resumes_there(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "stopme")
    args = ("run.name=stopme", f"run.dir={run_dir}", *RUN)
    chaos = Chaos(run_dir, *args)
    chaos.until(attempt=0, step=6)
    stopped = cli("stop", run_dir)
    assert stopped.returncode == 0, explain(stopped) + chaos.output()[-3000:]
    assert chaos.finish() == 1  # the launcher's own exit code for a stopped run, as after Ctrl-C
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "stopped", summary
    step = summary["stopped_at_step"]
    assert 6 <= step < 40 and f"checkpoint at step {step}:" in summary["error"]
    assert str(step) in os.listdir(os.path.join(run_dir, "checkpoints"))
    assert f"stopped run stopme at step {step}: every host saved a checkpoint there" in stopped.stdout
    assert "terminated (SIGTERM)" in summary["error"]  # what the launcher was sent: no Ctrl-C reached it

    again = cli("stop", "stopme", "--root", str(tmp_path))  # by name: the run is no longer live
    assert again.returncode == 0, explain(again)
    assert again.stdout.strip() == "run stopme is not live (its last launch ended stopped): nothing to stop"

    resumed = launch(*args)
    assert resumed.returncode == 0, explain(resumed)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["final_step"] == 40
    assert summary["resumed_from_step"] == step and summary["lost_steps"] == 0
    assert summary["stopped_at_step"] is None


def test_stop_of_a_finished_run_has_nothing_to_stop(trained_run):
    proc = cli("stop", trained_run)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.strip() == "run trained is not live (its last launch ended completed): nothing to stop"


def test_stop_of_a_missing_run_is_one_line_exit_2(tmp_path):
    proc = cli("stop", "nope", "--root", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: RUN: no run 'nope'")


def _hold_lock(run_dir: str, holder: dict) -> int:
    """Take the run's lock in this process, recording `holder` in it as a launcher does."""
    os.makedirs(run_dir)
    fd = os.open(os.path.join(run_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


@pytest.mark.parametrize("host, expected", [
    ("elsewhere", "is live on host elsewhere (launcher pid {pid}), not on this machine"),
    (None, "but pid {pid} it names is not a launcher"),  # this machine, but the pid is pytest's, not a launcher's
])
def test_stop_signals_only_a_launcher_on_this_machine(tmp_path, host, expected):
    import socket

    run_dir = str(tmp_path / "held")
    fd = _hold_lock(run_dir, {"pid": os.getpid(), "host": host or socket.gethostname(), "since": time.time()})
    try:
        proc = cli("stop", run_dir)
    finally:
        os.close(fd)
    assert proc.returncode == 2, explain(proc)  # and this process, the pid in the lock, got no signal
    assert expected.format(pid=os.getpid()) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_stop_of_a_cloud_run_whose_head_vm_is_gone_has_nothing_to_stop(tmp_path):
    """A cloud run supervised by a Ray job on its own head VM: stop looks for the head (Compute API) before it opens
    a tunnel; no head VM, no live job."""
    from compute_api_server import ComputeApiServer
    from launcher.config import compose_config, to_yaml

    run_dir = str(tmp_path / "headless")
    os.makedirs(run_dir)
    with ComputeApiServer(tick_s=0.05) as compute:
        cfg = compose_config(["+cluster=v4-8", "run.name=headless", f"run.dir={run_dir}", "cluster.project=p",
                              f"cluster.compute_api_endpoint={compute.url}"])
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        proc = cli("stop", run_dir)
        assert compute.count("GET", "instances/headless-head") == 1  # it asked for the run's head VM
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.strip() == "run headless is not live: nothing to stop"
