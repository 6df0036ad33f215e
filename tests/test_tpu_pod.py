"""Integration: `+cluster=v4-32` end to end through our Cloud TPU API server, with the real google-cloud-tpu client.

The server provisions the queued resource; when its node turns READY, each host boots as a TPU VM would
(tests/tpu_vm.py): bash runs the node metadata's real `startup-script` (cluster/bootstrap.py), which reads the
head address from a local metadata server, fetches the staged wheel from the bucket (the GCS emulator) and
`ray start`s a local Ray node advertising what a v4-32 TPU VM does; on delete or preemption the host's
processes are killed. The launcher sees only the API and Ray.
"""
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import ray
from google.cloud import storage
from ray.cluster_utils import Cluster

from cluster import catalog
from podutil import ROOT, TINY, explain, launch, read_json, read_jsonl, tpu_launch
from secret_manager_server import SecretManagerServer
from tpu_api_server import TpuApiServer
from tpu_vm import BootedHosts

pytestmark = pytest.mark.integration
RUN_SA = "run-sa@test-project.iam.gserviceaccount.com"


class Cli:
    """The CLI as a subprocess, its output collected by threads, while this (main) thread boots hosts."""

    def __init__(self, hosts: BootedHosts, *overrides):
        self.hosts, self.out, self.err = hosts, [], []
        env = {**os.environ, "PYTHONPATH": ROOT}
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", *overrides], cwd=ROOT, env=env,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.readers = [threading.Thread(target=lambda f=f, buf=buf: buf.extend(iter(f.readline, "")))
                        for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for r in self.readers:
            r.start()

    def pump_until(self, done, timeout=600) -> bool:
        deadline = time.time() + timeout
        while not done() and time.time() < deadline:
            self.hosts.pump()
            time.sleep(0.1)
        self.hosts.pump()
        return done()

    def finish(self, timeout=600) -> subprocess.CompletedProcess:
        if not self.pump_until(lambda: self.proc.poll() is not None, timeout):
            self.proc.kill()
        self.proc.wait()
        for r in self.readers:
            r.join()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, "".join(self.out),
                                           "".join(self.err))


def launch_pumping(hosts: BootedHosts, *overrides, timeout=600):
    """Run the CLI to its end while booting/removing hosts on this (main) thread as the API server asks."""
    return Cli(hosts, *overrides).finish(timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tpu_cloud(gcs_emulator, tmp_path):
    """A Ray head with its job server (the cloud head VM's role), our TPU API server, and booted hosts."""
    port = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "0.0.0.0", "dashboard_port": port,
        "dashboard_agent_listen_port": _free_port(),  # not the default: other heads may run on this machine
        "object_store_memory": 80 * 1024 * 1024})
    cluster.dashboard_port = port
    hosts = BootedHosts(cluster, tmp_path / "tpu-vms")
    server = TpuApiServer(tick_s=0.2, on_ready=hosts.on_ready, on_delete=hosts.on_delete)
    server.start()
    secrets = SecretManagerServer()
    secrets.start()
    # What every launch on it passes: the Secret Manager server that holds the run's Ray token, the run's SA.
    server.secret_args = [f"cluster.secret_manager_endpoint={secrets.url}", f"cluster.service_account={RUN_SA}"]
    server.secrets = secrets
    try:
        yield cluster, server, hosts
    finally:
        server.stop()
        secrets.shutdown()
        hosts.close()
        cluster.shutdown()


def test_v4_32_launch_through_tpu_api(tpu_cloud, tmp_path, corpus_cache, gcs_emulator):
    cluster, server, hosts = tpu_cloud
    run_dir = str(tmp_path / "cloud")
    proc = launch_pumping(hosts, "+cluster=v4-32", "run.name=cloud-v4", f"run.dir={run_dir}", *TINY, "trainer.batch_size=16", "trainer.steps=4",
                  "checkpoint.every=4", "cluster.project=test-project", f"cluster.tpu_api_endpoint={server.url}",
                  f"ray.address={cluster.address}", f"ray.dashboard_port={cluster.dashboard_port}",
                  f"cluster.bucket=gs://{gcs_emulator.bucket}/cloud", f"cluster.host_run_root={tmp_path}/vm-disks",
                  "checkpoint.ocdbt=false", *server.secret_args,
                  "launcher.preflight=false", timeout=600)
    assert proc.returncode == 0, explain(proc) + f"\nboot errors: {hosts.errors}"
    assert not hosts.errors
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["final_step"] == 4
    assert summary["hosts"] == 4 and summary["devices"] == 16 and summary["accelerator_type"] == "v4-32"
    # Provisioned once, through the queued-resources API, labelled with the run, then deleted.
    assert server.count("POST", "queuedResources") == 1
    body = server.create_bodies[0]
    node = body["tpu"]["nodeSpec"][0]["node"]
    assert node["acceleratorType"] == "v4-32"
    assert node["labels"]["launcher-run"] == "cloud-v4"
    assert node["runtimeVersion"] == catalog.lookup("v4-32").default_runtime_version
    assert server.count("DELETE", "queuedResources/cloud-v4-qr") == 1
    assert not server.queued_resources and not hosts.nodes
    # Each TPU VM booted by running the node's startup script (tests/tpu_vm.py): the wheel fetched from the
    # bucket with the VM's token and pip-installed, the TPU host cleaned, `ray start` against the head; on
    # delete every process of the VM went.
    assert len(hosts.booted) == 4 and all(h.proc.returncode == 0 for h in hosts.booted)
    assert [p for h in hosts.booted for p in h.check(cluster.address)] == []
    assert all(h.gone for h in hosts.booted)
    assert "ACTIVE" in proc.stdout
    # TPU VMs share no disk with the supervisor: each wrote a host-local run dir, synced back through Ray.
    for host in range(4):
        assert os.path.getsize(os.path.join(tmp_path, "vm-disks", "cloud-v4", f"host-{host}", "logs",
                                            f"host-{host}.log")) > 0
        synced = open(os.path.join(run_dir, "logs", f"host-{host}.log")).read()
        assert f"[host {host}] step 4/4" in synced
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    assert {e["host"] for e in events if e["event"] == "first_step"} == {0, 1, 2, 3}
    assert [m["step"] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in m][-1] == 4
    # The hosts read the data and wrote checkpoints in the bucket, not on this machine's disk.
    client = storage.Client(project="test")
    names = [b.name for b in client.list_blobs(gcs_emulator.bucket, prefix="cloud/")]
    assert any(n.startswith("cloud/data/") and n.endswith("manifest.json") for n in names)
    assert any(n.startswith("cloud/runs/cloud-v4/checkpoints/4/") for n in names)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    # The supervisor ran as a Ray job on the head; this terminal followed its output.
    assert "submitted the supervisor as Ray job launcher-cloud-v4-" in proc.stdout
    assert "[host 0] step 4/4" in proc.stdout
    # The job on the head provisioned with what this terminal staged (it has no checkout to build from).
    assert "project wheel (staged by the launching terminal) at gs://" in proc.stdout
    # The VMs' startup script installs the wheel the launcher staged in the run's bucket.
    script = node["metadata"]["startup-script"]
    url = next(line for line in script.splitlines() if line.startswith("WHEEL_URL="))
    url = url.split("=", 1)[1].strip("'\"")
    assert url.startswith(f"gs://{gcs_emulator.bucket}/cloud/wheels/") and url.endswith(".whl")
    blob = client.bucket(gcs_emulator.bucket).blob(url.split("/", 3)[3])
    assert blob.exists()
    # The Ray token (the user's, for this ray.address) reached the VMs through Secret Manager only, readable by the
    # run's service account alone; neither it nor the VMs' access token is anywhere else.
    assert_no_leaks(run_dir, tmp_path, server, [session_ray_token(), fake_api_token()],
                    outputs=(proc.stdout, proc.stderr), bucket=gcs_emulator.bucket, prefix="cloud/")
    # The secret was readable by the run's service account alone, and was deleted with the run's resources.
    assert node["metadata"]["ray-token-secret"] == "cloud-v4-ray-token"
    assert any(m == "POST" and p.split("?")[0].endswith("cloud-v4-ray-token:setIamPolicy")
               for m, p, _ in server.secrets.bodies)
    set_policy = [json.loads(b) for m, p, b in server.secrets.bodies if p.split("?")[0].endswith(":setIamPolicy")]
    assert [b["members"] for b in set_policy[-1]["policy"]["bindings"]] == [[f"serviceAccount:{RUN_SA}"]]
    assert not server.secrets.secrets


def session_ray_token() -> str:
    with open(os.environ["RAY_AUTH_TOKEN_PATH"]) as f:
        return f.read().strip()


def fake_api_token() -> str:
    from tpu_vm import FAKE_TOKEN

    return FAKE_TOKEN


def assert_no_leaks(run_dir, tmp_path, api, secrets_, extra_bodies=(), outputs=(), bucket=None, prefix=""):
    """No file of the run dir or of the fake VMs (logs, scripts), no TPU/Compute API request body, no Secret
    Manager request but the token's own addVersion, nothing the launcher printed (`outputs`: its stdout and
    stderr) and no object it left under gs://`bucket`/`prefix` (what it and the VMs uploaded to the GCS emulator:
    data, wheel, lock, checkpoints) holds any of `secrets_`."""
    for text in outputs:
        for s in secrets_:
            assert s not in text, f"{s[:6]}... in the launcher's output"
    if bucket is not None:
        blobs = list(storage.Client(project="test").list_blobs(bucket, prefix=prefix))
        assert blobs, f"nothing under gs://{bucket}/{prefix} to check"
        for blob in blobs:
            data = blob.download_as_bytes()
            for s in secrets_:
                assert s.encode() not in data, f"{s[:6]}... leaked into gs://{bucket}/{blob.name}"
    token_files = {os.path.realpath(p) for p in (os.path.join(run_dir, "auth", "ray_token"),)}
    for root in (run_dir, tmp_path / "vm-disks", tmp_path / "tpu-vms"):
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                if os.path.realpath(path) in token_files or name == "ray_token" or os.path.islink(path):
                    continue  # the token's own 0600 files (run record, each VM's fetched copy)
                with open(path, "rb") as f:
                    data = f.read()
                for s in secrets_:
                    assert s.encode() not in data, f"{s[:6]}... leaked into {path}"
    bodies = [json.dumps(b) for b in api.create_bodies] + [json.dumps(b) for b in extra_bodies]
    for s in secrets_:
        assert not any(s in b for b in bodies), f"{s[:6]}... in an API request body"
        mentions = api.secrets.mentions(s.encode())
        assert all(p.split("?")[0].endswith(":addVersion") for _, p in mentions), mentions
    assert api.secrets.mentions(secrets_[0].encode()), "the Ray token never went to Secret Manager"


def test_detach_and_reattach_to_the_supervisor_job(tpu_cloud, tmp_path, corpus_cache, gcs_emulator):
    """Ctrl-C detaches the terminal but the run goes on as a Ray job; the same command again follows it. Then
    `tpu-launch stop` from another terminal stops that job the graceful way (a checkpoint at one agreed step), and
    the command typed again resumes there."""
    cluster, server, hosts = tpu_cloud
    run_dir = str(tmp_path / "detach")
    args = ["+cluster=v4-8", "run.name=detach", f"run.dir={run_dir}", *TINY, "trainer.steps=100",
            "checkpoint.every=100", "cluster.project=test-project", f"cluster.tpu_api_endpoint={server.url}",
            f"ray.address={cluster.address}", f"ray.dashboard_port={cluster.dashboard_port}",
            # the bucket holds the wheel the TPU VM's startup script installs before it joins the head
            f"cluster.bucket=gs://{gcs_emulator.bucket}/detach", f"cluster.host_run_root={tmp_path}/vm-disks",
            "checkpoint.ocdbt=false", "launcher.preflight=false", *server.secret_args]
    first = Cli(hosts, *args)
    assert first.pump_until(lambda: any("Ctrl-C detaches" in line for line in first.out), timeout=120)
    first.proc.send_signal(signal.SIGINT)
    detached = first.finish(timeout=60)
    assert detached.returncode == 0, explain(detached)
    assert "detached; job launcher-detach-" in detached.stdout
    again = Cli(hosts, *args)
    assert again.pump_until(lambda: any("is live as job launcher-detach-" in line for line in again.out), timeout=120)
    beat = os.path.join(tmp_path, "vm-disks", "detach", "host-0", "hosts", "host-0.json")  # the TPU VM's own disk
    assert again.pump_until(lambda: ((_read_or_none(beat) or {}).get("step") or 0) >= 2, timeout=300)
    stop = subprocess.Popen([sys.executable, "-m", "launcher.cli", "stop", run_dir], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert again.pump_until(lambda: stop.poll() is not None, timeout=300)
    stopped_out = stop.communicate()[0]
    followed = again.finish(timeout=120)
    assert stop.returncode == 0, stopped_out + explain(followed)
    assert server.count("POST", "queuedResources") == 1  # the same job followed, no second submission
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "stopped" and "terminated (SIGTERM)" in summary["error"], summary
    step = summary["stopped_at_step"]
    assert 2 <= step < 100 and f"the hosts saved a checkpoint at step {step}:" in stopped_out
    resumed = launch_pumping(hosts, *args)
    assert resumed.returncode == 0, explain(resumed)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["final_step"] == 100 and summary["hosts"] == 1
    assert summary["resumed_from_step"] == step and summary["lost_steps"] == 0
    assert not hosts.errors


def _read_or_none(path):
    try:
        return read_json(path)
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None


def test_cloud_run_creates_and_deletes_its_ray_head_vm(gcs_emulator, tmp_path, corpus_cache):
    """No ray.address: the launcher creates a Ray head VM (Compute Engine API), puts the run's Ray token in Secret
    Manager, reaches the head's job server (loopback only) through an SSH tunnel with the run's own key, runs the
    supervisor there as a Ray job, provisions the TPU through it, and deletes all of it at the end."""
    from compute_api_server import ComputeApiServer
    from ray._raylet import AuthenticationTokenLoader  # test-only: swap this process's token for the head's

    from cluster.secrets import fetch
    from launcher import auth
    from ssh_server import SshServer

    ray_port, dash_port, ssh_port = _free_port(), _free_port(), _free_port()
    state = {}
    todo = queue.Queue()
    saved_token_path = os.environ["RAY_AUTH_TOKEN_PATH"]

    def start_head(instance):  # what the head VM's startup script does (on the main thread)
        md = {item["key"]: item["value"] for item in instance["metadata"]["items"]}
        # sshd with the run's public key from the `ssh-keys` metadata (as GCE's guest agent installs it)
        state["ssh"] = SshServer(md["ssh-keys"].split(":", 1)[1], port=ssh_port)
        state["ssh"].start()
        # the run's Ray token from Secret Manager, with the secret named in the metadata
        token_file = str(tmp_path / "head-vm" / "ray_token")
        fetch(md["launcher-project"], md["ray-token-secret"], token_file, endpoint=md["secret-manager-endpoint"])
        os.environ["RAY_AUTH_TOKEN_PATH"] = token_file
        AuthenticationTokenLoader.instance().reset_cache()
        # `ray start --head`: Ray's ports on the VM's (internal) address, the job server on loopback only
        state["head"] = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "gcs_server_port": ray_port,
            "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash_port,
            "dashboard_agent_listen_port": _free_port(),
            "object_store_memory": 80 * 1024 * 1024})
        state["hosts"] = BootedHosts(state["head"], tmp_path / "tpu-vms")
        state["server"].on_ready, state["server"].on_delete = state["hosts"].on_ready, state["hosts"].on_delete

    class Pump:  # quacks like BootedHosts for Cli: runs head boots, then host boots, on this thread
        def pump(self):
            while not todo.empty():
                todo.get()()
            if "hosts" in state:
                state["hosts"].pump()

    # The VM's internal IP is this machine's (where Ray's nodes register); its external IP, where this terminal
    # reaches its sshd, is loopback (where the test's sshd listens).
    machine_ip = ray.util.get_node_ip_address()
    compute = ComputeApiServer(on_running=lambda inst: todo.put(lambda: start_head(inst)), ip=machine_ip,
                               external_ip="127.0.0.1")
    state["server"] = TpuApiServer(tick_s=0.2)
    secrets = SecretManagerServer()
    compute.start()
    state["server"].start()
    secrets.start()
    try:
        run_dir = tmp_path / "headless"
        proc = Cli(Pump(), "+cluster=v4-8", "run.name=headless", f"run.dir={run_dir}", *TINY, "trainer.steps=2",
                   "checkpoint.every=2", "checkpoint.ocdbt=false", "cluster.project=test-project",
                   f"cluster.tpu_api_endpoint={state['server'].url}",
                   f"cluster.compute_api_endpoint={compute.url}", f"cluster.bucket=gs://{gcs_emulator.bucket}/hl",
                   f"cluster.secret_manager_endpoint={secrets.url}", f"cluster.head_ssh_port={ssh_port}",
                   f"ray.port={ray_port}", f"ray.dashboard_port={dash_port}", "launcher.preflight=false").finish()
        boot_errors = state["hosts"].errors if "hosts" in state else None
        assert proc.returncode == 0, explain(proc) + f"\nboot errors: {boot_errors}"
        summary = read_json(run_dir / "summary.json")
        assert summary["status"] == "completed" and summary["final_step"] == 2
        # The run directory outlives the head VM in the run's bucket (launcher/mirror.py): a laptop holding only the
        # run's config.yaml reads the run's end, step, loss and host logs from there.
        laptop = tmp_path / "laptop" / "headless"
        laptop.mkdir(parents=True)
        (laptop / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
        seen = tpu_launch("status", "--json", str(laptop))
        assert seen.returncode == 0, explain(seen)
        st = json.loads(seen.stdout)
        assert (st["state"], st["step"], st["cloud"]["state"]) == ("completed", 2, "NOT_FOUND"), st
        assert st["loss"] == [m for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m][-1]["loss"]
        assert "[host 0] step 2/2" in tpu_launch("logs", str(laptop)).stdout
        insert = compute.insert_bodies[0]
        assert insert["labels"]["launcher-run"] == "headless"
        assert compute.count("DELETE", "instances/headless-head") == 1  # the head VM is gone
        assert not compute.instances and not state["server"].queued_resources
        # Unset cluster.service_account: the default compute account reads the secret, with a warning.
        assert "warning: cluster.service_account is unset" in proc.stdout
        # The job server was reached only through the SSH tunnel, with the run's key, to the head's loopback.
        ssh = state["ssh"]
        assert ssh.accepted_auth and not ssh.refused_auth
        assert any(dest[:2] == ("127.0.0.1", dash_port) for dest in ssh.forwarded), ssh.forwarded
        keys = run_dir / "auth"
        assert (keys / "ssh_key").stat().st_mode & 0o077 == 0
        assert ssh.host_public_key.split()[1] in (keys / "known_hosts").read_text()  # the host key is pinned
        md = {item["key"]: item["value"] for item in insert["metadata"]["items"]}
        pub = (keys / "ssh_key.pub").read_text().split()
        assert md["ssh-keys"].startswith(f"tpu-launcher:{pub[0]} {pub[1]}")
        # The head's job server listens on its loopback only and refuses a request without the token; its GCS
        # refuses a client without it.
        with pytest.raises(OSError):
            socket.create_connection((machine_ip, dash_port), timeout=5).close()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(  # a job submission without the token
                f"http://127.0.0.1:{dash_port}/api/jobs/", data=json.dumps({"entrypoint": "id"}).encode(),
                headers={"Content-Type": "application/json"}), timeout=10)
        assert refused.value.code == 401
        assert auth.probe(f"{machine_ip}:{ray_port}", "") == "refused"
        assert auth.probe(f"{machine_ip}:{ray_port}", (keys / "ray_token").read_text().strip()) == "ok"
        # Neither the run's token nor the VMs' access token is in any file, script, metadata or API request body
        # (but the token's own addVersion to Secret Manager); the secret was deleted at the end.
        api = state["server"]
        api.secrets = secrets
        assert_no_leaks(run_dir, tmp_path, api, [(keys / "ray_token").read_text().strip(), fake_api_token()],
                        extra_bodies=compute.insert_bodies, outputs=(proc.stdout, proc.stderr),
                        bucket=gcs_emulator.bucket, prefix="hl/")
        assert not secrets.secrets
    finally:
        state["server"].stop()
        compute.stop()
        secrets.shutdown()
        if "hosts" in state:
            state["hosts"].close()
        if "head" in state:
            state["head"].shutdown()
        if "ssh" in state:
            state["ssh"].stop()
        os.environ["RAY_AUTH_TOKEN_PATH"] = saved_token_path
        AuthenticationTokenLoader.instance().reset_cache()


def test_preempted_tpu_node_is_reprovisioned_and_the_run_resumes_exactly(tpu_cloud, tmp_path, corpus_cache,
                                                                         gcs_emulator):
    """Chaos: the TPU API marks the node PREEMPTED mid-run and its host dies with it. The supervisor sees the
    node state, deletes the preempted resource, provisions a new one, and resumes from the bucket's newest
    checkpoint; the parameters end equal to an uninterrupted run on the same topology."""
    cluster, server, hosts = tpu_cloud
    server.on_preempt = hosts.on_delete  # a preempted VM's host goes away with it
    # Few checkpoints: the in-memory GCS emulator slows down as objects accumulate.
    common = [*TINY, "trainer.steps=24", "optimizer.decay_steps=24", "checkpoint.every=8", "checkpoint.ocdbt=false"]
    ref = launch("+cluster=v4-8", "cluster.provider=local", "run.name=pre-ref", f"run.dir={tmp_path / 'ref'}",
                 *common)
    assert ref.returncode == 0, explain(ref)
    run_dir = tmp_path / "pre"
    cli = Cli(hosts, "+cluster=v4-8", "run.name=pre", f"run.dir={run_dir}", *common,
              "cluster.project=test-project", f"cluster.tpu_api_endpoint={server.url}",
              f"ray.address={cluster.address}", f"ray.dashboard_port={cluster.dashboard_port}",
              f"cluster.bucket=gs://{gcs_emulator.bucket}/pre", f"cluster.host_run_root={tmp_path}/vm-disks",
              "launcher.preflight=false", "supervisor.backoff_s=0.2", "watchdog.heartbeat_s=0.2",
              *server.secret_args)

    client = storage.Client(project="test")

    def saved(step):  # the checkpoint is committed in the bucket: orbax's step-level marker on GCS (each item
        # directory, e.g. state/, gets its own marker earlier; the step is restorable only once this one exists)
        return client.bucket(gcs_emulator.bucket).blob(f"pre/runs/pre/checkpoints/{step}/commit_success.txt").exists()

    assert cli.pump_until(lambda: saved(8) or cli.proc.poll() is not None, timeout=300), "no checkpoint 8"
    assert cli.proc.poll() is None, "the run ended before it could be preempted"
    node = next(iter(server.nodes))
    server.preempt(node)
    proc = cli.finish(timeout=600)
    assert proc.returncode == 0, explain(proc) + f"\nboot errors: {hosts.errors}"
    summary = read_json(run_dir / "summary.json")
    reference = read_json(tmp_path / "ref" / "summary.json")
    assert summary["status"] == "completed" and summary["final_step"] == 24
    assert summary["params_digest"] == reference["params_digest"]
    assert summary["restarts"] == {"preemption": 1, "total": 1}
    assert "PREEMPTED" in summary["failures"][0]["detail"]
    assert summary["resumed_from_step"] >= 8
    assert server.count("POST", "queuedResources") == 2  # provisioned again after the preemption
    assert not server.queued_resources and not hosts.nodes  # and everything deleted at the end
