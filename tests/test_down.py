"""`tpu-launch down`: a run's cloud resources (queued resource, head VM, Ray-token secret) deleted against the cloud
test servers, found from the run's config.yaml alone; a local run's leftover pod stopped; checkpoints kept."""
import fcntl
import json
import os
import subprocess
import time

import pytest

from cluster.gcp import GcpTpuProvider, make_client
from cluster.head_vm import HeadVm, make_compute_client
from cluster.secrets import RunSecret
from compute_api_server import ComputeApiServer
from launcher.config import compose_config, to_yaml
from podutil import explain, tpu_launch as cli
from secret_manager_server import SecretManagerServer
from tpu_api_server import TpuApiServer
from trainer.heartbeat import process_start_time

PROJECT, ZONE, RUN_SA = "test-project", "us-central2-b", "run-sa@test-project.iam.gserviceaccount.com"


def write_config(run_dir: str, *overrides) -> None:
    """The run's config.yaml as a launch writes it: the composed config."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(compose_config([f"run.dir={run_dir}", *overrides])))


@pytest.fixture
def cloud():
    with TpuApiServer(tick_s=0.05) as tpu, ComputeApiServer(tick_s=0.05) as compute, \
            SecretManagerServer(tick_s=0.05) as secrets:
        yield tpu, compute, secrets


def _leave_resources(tpu, compute, secrets, run_name: str) -> None:
    """What a cloud run with its own head leaves when its supervisor dies: made by the code a launch uses."""
    qr = GcpTpuProvider(PROJECT, ZONE, client=make_client(tpu.url), poll_s=0.05, timeout_s=30, progress=lambda m: None)
    qr.ensure(run_name, "v4-8", "tpu-ubuntu2204-base", labels={"team": "ml"})
    qr.wait_active(run_name)
    head = HeadVm(PROJECT, ZONE, client=make_compute_client(compute.url), poll_s=0.05, timeout_s=30,
                  progress=lambda m: None)
    head.ensure(run_name, "#!/bin/bash\ntrue\n")
    head.wait_running(run_name)
    RunSecret(PROJECT, endpoint=secrets.url, progress=lambda m: None).put(run_name, "t0ken", [RUN_SA])
    assert tpu.queued_resources and tpu.nodes and compute.instances and secrets.secrets


def test_down_deletes_the_runs_cloud_resources_and_keeps_its_checkpoints(cloud, tmp_path):
    tpu, compute, secrets = cloud
    run_dir = str(tmp_path / "gone")
    write_config(run_dir, "+cluster=v4-8", "run.name=gone", f"cluster.project={PROJECT}",
                 f"cluster.tpu_api_endpoint={tpu.url}", f"cluster.compute_api_endpoint={compute.url}",
                 f"cluster.secret_manager_endpoint={secrets.url}", f"cluster.service_account={RUN_SA}")
    ckpt = tmp_path / "gone" / "checkpoints" / "4"
    ckpt.mkdir(parents=True)
    (ckpt / "state").write_text("weights")
    auth = tmp_path / "gone" / "auth"
    auth.mkdir()
    (auth / "known_hosts").write_text("[10.0.0.2]:22 ssh-ed25519 AAAA\n")  # the deleted head's pinned key
    (auth / "ray_token").write_text("t0ken")
    _leave_resources(tpu, compute, secrets, "gone")

    refused = cli("down", run_dir)  # no terminal to ask on, no --yes: nothing happens
    assert refused.returncode == 2, explain(refused)
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --yes: not deleting without confirmation")
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "queued resource gone-qr (ACTIVE; TPU nodes: gone READY)" in refused.stdout
    assert "head VM gone-head (RUNNING)" in refused.stdout
    assert f"secret projects/{PROJECT}/secrets/gone-ray-token (the run's Ray token)" in refused.stdout
    assert tpu.queued_resources and compute.instances and secrets.secrets

    proc = cli("down", "gone", "--root", str(tmp_path), "--yes")
    assert proc.returncode == 0, explain(proc)
    assert not tpu.queued_resources and not tpu.nodes and not compute.instances and not secrets.secrets
    assert [line for line in proc.stdout.splitlines() if line.startswith("deleted ")] == [
        "deleted queued resource gone-qr", "deleted head VM gone-head",
        f"deleted secret projects/{PROJECT}/secrets/gone-ray-token"]
    assert (ckpt / "state").read_text() == "weights"  # checkpoints and the run's record stay
    assert (auth / "ray_token").exists() and not (auth / "known_hosts").exists()  # a new head gets a new key

    again = cli("down", run_dir, "--yes")
    assert again.returncode == 0, explain(again)
    assert again.stdout.strip() == (f"nothing to delete: run gone has no queued resource, head VM or Ray-token "
                                    f"secret in project {PROJECT}")


def test_down_of_a_run_on_the_users_cluster_leaves_the_head_alone(cloud, tmp_path):
    """With ray.address the head is the user's: only the run's queued resource and secret are the run's."""
    tpu, compute, secrets = cloud
    run_dir = str(tmp_path / "attached")
    write_config(run_dir, "+cluster=v4-8", "run.name=attached", f"cluster.project={PROJECT}",
                 f"cluster.tpu_api_endpoint={tpu.url}", f"cluster.compute_api_endpoint={compute.url}",
                 f"cluster.secret_manager_endpoint={secrets.url}", "ray.address=10.0.0.2:6379")
    _leave_resources(tpu, compute, secrets, "attached")
    proc = cli("down", run_dir, "--yes")
    assert proc.returncode == 0, explain(proc)
    assert not tpu.queued_resources and not secrets.secrets
    assert list(compute.instances) == [f"projects/{PROJECT}/zones/{ZONE}/instances/attached-head"]


def test_down_of_a_missing_run_is_one_line_exit_2(tmp_path):
    proc = cli("down", "nope", "--root", str(tmp_path), "--yes")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: RUN: no run 'nope'")


def _spare(n: int) -> list:
    return [subprocess.Popen(["sleep", "300"]) for _ in range(n)]


def test_down_stops_the_pod_a_dead_local_launcher_left(tmp_path):
    run_dir = str(tmp_path / "leftover")
    write_config(run_dir, "run.name=leftover")
    pod, reused = _spare(2), _spare(1)[0]
    try:
        # recorded as cluster/local.py records the pod's Ray processes; the last one's pid was reused since
        records = [{"pid": p.pid, "start_time": process_start_time(p.pid)} for p in pod]
        records.append({"pid": reused.pid, "start_time": process_start_time(reused.pid) - 1})
        with open(os.path.join(run_dir, "pod.json"), "w") as f:
            json.dump({"supervisor_pid": 1, "processes": records}, f)
        proc = cli("down", run_dir, "--yes")
        assert proc.returncode == 0, explain(proc)
        assert f"local pod (2 Ray processes: pids {pod[0].pid}, {pod[1].pid})" in proc.stdout
        assert [p.wait(timeout=30) for p in pod] == [-9, -9]
        assert reused.poll() is None  # not the recorded process: left alone
        assert not os.path.exists(os.path.join(run_dir, "pod.json"))
        again = cli("down", run_dir, "--yes")
        assert again.stdout.strip() == "nothing to delete: run leftover has no pod left running"
    finally:
        for p in [*pod, reused]:
            p.kill()
            p.wait()


def test_down_refuses_a_live_launch(tmp_path):
    run_dir = str(tmp_path / "live")
    write_config(run_dir, "run.name=live")
    fd = os.open(os.path.join(run_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": "here", "since": time.time()}).encode(), 0)
    try:
        proc = cli("down", run_dir, "--yes")
    finally:
        os.close(fd)
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.strip() == (f"error: RUN: a launch of run live is live (launcher pid {os.getpid()} on here) "
                                   f"(stop it first: tpu-launch stop {run_dir})")
