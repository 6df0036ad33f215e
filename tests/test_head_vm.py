"""Head VM tests: the real google-cloud-compute client against the local Compute Engine API server."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import time

import pytest
from google.api_core import exceptions as gexc

from cluster.gcp import CREDENTIALS_HINT, ProvisionError, tpu_name
from cluster.head_vm import HeadVm, head_startup_script, make_compute_client
from launcher.wheel import Staged
from compute_api_server import ComputeApiServer
from script_stubs import run_with_stubs

PROJECT, ZONE = "proj", "us-central2-b"
INSTANCES = f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances"
TICK = 0.05
WHEEL = "gs://run-bucket/wheels/abc123/tpu_pod_launcher-0.1.0-py3-none-any.whl"
WHEEL_BYTES = b"PK\x03\x04 the head's wheel"
LOCK_BYTES = b"ray==2.60.0 --hash=sha256:" + b"cd" * 32 + b"\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


STAGED = Staged(WHEEL, _sha(WHEEL_BYTES), "gs://run-bucket/wheels/fedcba987654/requirements.lock", _sha(LOCK_BYTES))


class Recorder:
    """Collects the server's instance callbacks."""

    def __init__(self) -> None:
        self.running: list[dict] = []
        self.deleted: list[dict] = []


@pytest.fixture
def events() -> Recorder:
    return Recorder()


@pytest.fixture
def server(events: Recorder):
    with ComputeApiServer(tick_s=TICK, on_running=events.running.append, on_delete=events.deleted.append) as srv:
        yield srv


def head_for(srv: ComputeApiServer, lines: list[str] | None = None, **kwargs) -> HeadVm:
    out = lines if lines is not None else []
    return HeadVm(PROJECT, ZONE, client=make_compute_client(srv.url), poll_s=0.01, timeout_s=10,
                  progress=out.append, **kwargs)


def eventually(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_create_wait_address_delete(server: ComputeApiServer, events: Recorder) -> None:
    lines: list[str] = []
    head = head_for(server, lines)
    info = head.ensure("run-a", head_startup_script(STAGED))
    assert info["name"] == "run-a-head" and info["status"] in ("PROVISIONING", "STAGING", "RUNNING")
    running = head.wait_running("run-a")
    assert running == {"name": "run-a-head", "status": "RUNNING", "internal_ip": "127.0.0.1",
                       "external_ip": "127.0.0.1"}
    assert head.address("run-a") == "127.0.0.1:6379" and head.address("run-a", 7000) == "127.0.0.1:7000"
    assert any("creating head VM run-a-head" in line for line in lines)
    assert any(line.startswith("head: run-a-head: RUNNING 127.0.0.1") for line in lines)
    assert [i["name"] for i in events.running] == ["run-a-head"]
    # the insert's operation was polled through zoneOperations on this server, not compute.googleapis.com
    assert any(m == "GET" and p.startswith(f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/operations/")
               for m, p in server.requests)
    assert head.status("run-a") == "RUNNING"
    head.delete("run-a")
    assert head.status("run-a") == "NOT_FOUND" and not server.instances
    assert any("deleting head VM run-a-head" in line for line in lines)
    assert [i["name"] for i in events.deleted] == ["run-a-head"]
    head.delete("run-a")  # idempotent: NotFound is fine
    with pytest.raises(gexc.NotFound):
        head.client.get(project=PROJECT, zone=ZONE, instance="run-a-head")
    with pytest.raises(ProvisionError, match="does not exist"):
        head.address("run-a")


def test_insert_body(server: ComputeApiServer) -> None:
    script = head_startup_script(STAGED)
    head = head_for(server, service_account="head@proj.iam.gserviceaccount.com", subnetwork="tpu-subnet",
                    machine_type="e2-standard-2")
    head.ensure("My_Run.2", script, labels={"team": "ml"})
    body = server.insert_bodies[0]
    name = f"{tpu_name('My_Run.2')}-head"
    assert body["name"] == name and len(name) <= 63
    assert body["labels"] == {"team": "ml", "launcher-run": tpu_name("My_Run.2"), "launcher-role": "head"}
    assert body["metadata"]["items"] == [{"key": "startup-script", "value": script}]
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/e2-standard-2"
    disk = body["disks"][0]
    assert disk["boot"] and disk["autoDelete"]
    assert disk["initializeParams"]["sourceImage"] == "projects/debian-cloud/global/images/family/debian-12"
    nic = body["networkInterfaces"][0]
    assert nic["network"] == "global/networks/default"
    assert nic["subnetwork"] == "regions/us-central2/subnetworks/tpu-subnet"
    assert nic["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
    assert body["serviceAccounts"] == [{"email": "head@proj.iam.gserviceaccount.com",
                                        "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]
    head_for(server, external_ip=False).ensure("internal-only", script,
                                               metadata={"ssh-keys": "tpu-launcher:ssh-ed25519 AAAA tpu-launcher",
                                                         "ray-token-secret": "internal-only-ray-token"})
    assert "accessConfigs" not in server.insert_bodies[1]["networkInterfaces"][0]
    assert server.insert_bodies[1]["serviceAccounts"][0]["email"] == "default"
    # the run's public SSH key and the token secret's name (never a secret) ride along in the metadata
    assert server.insert_bodies[1]["metadata"]["items"] == [
        {"key": "startup-script", "value": script},
        {"key": "ray-token-secret", "value": "internal-only-ray-token"},
        {"key": "ssh-keys", "value": "tpu-launcher:ssh-ed25519 AAAA tpu-launcher"}]


def test_default_service_account_from_the_project(server: ComputeApiServer) -> None:
    from cluster.head_vm import default_service_account
    from compute_api_server import DEFAULT_SERVICE_ACCOUNT

    assert default_service_account(PROJECT, server.url) == DEFAULT_SERVICE_ACCOUNT


def test_ensure_is_idempotent(server: ComputeApiServer) -> None:
    lines: list[str] = []
    head = head_for(server, lines)
    script = head_startup_script(STAGED)
    head.ensure("idem", script)
    assert head.ensure("idem", script)["name"] == "idem-head"  # while still provisioning
    head.wait_running("idem")
    assert head.ensure("idem", script)["status"] == "RUNNING"
    assert server.count("POST", INSTANCES) == 1
    assert sum("reusing head VM idem-head" in line for line in lines) == 2
    assert not any("differs" in line for line in lines)
    newer = dataclasses.replace(STAGED, wheel_url=WHEEL.replace("abc123", "def456"))
    head.ensure("idem", head_startup_script(newer))  # new wheel: warn, reuse
    assert server.count("POST", INSTANCES) == 1 and "differs" in lines[-1]


def test_terminated_instance_is_deleted_and_recreated(server: ComputeApiServer, events: Recorder) -> None:
    lines: list[str] = []
    head = head_for(server, lines)
    head.ensure("pre", head_startup_script(STAGED))
    head.wait_running("pre")
    server.stop("pre-head")  # preempted / stopped
    assert head.status("pre") == "TERMINATED"
    with pytest.raises(ProvisionError, match="pre-head is TERMINATED"):
        head.wait_running("pre")
    info = head.ensure("pre", head_startup_script(STAGED))
    assert any("pre-head is TERMINATED; deleting it to re-create" in line for line in lines)
    assert [i["name"] for i in events.deleted] == ["pre-head"]
    assert server.count("POST", INSTANCES) == 2 and server.count("DELETE", "/instances/pre-head") == 1
    assert info["status"] != "TERMINATED"
    assert head.wait_running("pre")["internal_ip"] == "127.0.0.1"


def test_insert_operation_error(server: ComputeApiServer) -> None:
    head = head_for(server)
    server.fail_next_insert()
    with pytest.raises(ProvisionError, match="could not create head VM nocap-head: ZONE_RESOURCE_POOL_EXHAUSTED"):
        head.ensure("nocap", head_startup_script(STAGED))
    assert head.status("nocap") == "NOT_FOUND"
    with pytest.raises(ProvisionError, match="nocap-head does not exist"):
        head.wait_running("nocap")
    with pytest.raises(ProvisionError, match="could not create head VM bad-labels-head: .*labels"):
        head.ensure("bad-labels", "#!/bin/bash\n", labels={"Bad Key": "x"})


def test_wait_timeout() -> None:
    with ComputeApiServer(tick_s=5.0, op_ticks=0) as srv:
        head = HeadVm(PROJECT, ZONE, client=make_compute_client(srv.url), poll_s=0.01, timeout_s=0.2,
                      progress=lambda line: None)
        head.ensure("slow", "#!/bin/bash\n")
        with pytest.raises(ProvisionError, match=r"timed out after .* \(PROVISIONING\)"):
            head.wait_running("slow")
        with pytest.raises(ProvisionError, match="no internal IP yet"):
            head.address("slow")


def test_server_errors_and_list(server: ComputeApiServer) -> None:
    head = head_for(server)
    client = head.client
    with pytest.raises(gexc.NotFound):
        client.get(project=PROJECT, zone=ZONE, instance="none")
    head.ensure("ls", "#!/bin/bash\n")
    with pytest.raises(gexc.Conflict):
        client.insert(project=PROJECT, zone=ZONE, instance_resource=head._instance("ls", "#!/bin/bash\n", None))
    assert [i.name for i in client.list(project=PROJECT, zone=ZONE)] == ["ls-head"]
    assert list(client.list(project=PROJECT, zone="other-zone-a")) == []


# startup script --------------------------------------------------------------------------------------

def headers(tmp_path) -> str:
    """The headers the stub curl was given from files (-H @FILE): not on any command line."""
    path = tmp_path / "calls.log.headers"
    return path.read_text() if path.exists() else ""


STUBS = {  # fake commands on PATH: each logs its arguments to $STUB_LOG
    "curl": r"""
echo "curl $*" >>"$STUB_LOG"
for a in "$@"; do case "$a" in @*) cat "${a#@}" >>"$STUB_LOG.headers" ;; esac; done  # headers from files
case "$*" in
  *attributes/ray-token-secret*) printf r1-ray-token ;;
  *attributes/launcher-project*) printf proj ;;
  *network-interfaces/0/ip*) case "${STUB_NO_IP:-}" in missing) exit 22 ;; empty) exit 0 ;; esac
                             printf 10.0.0.9 ;;
  *attributes/*) exit 22 ;;
  *service-accounts/default/token*) printf '{"access_token": "tok", "expires_in": 60}' ;;
  *) out= url=  # an object: served from $STUB_OBJECTS/<its name>, or empty
     while [ $# -gt 0 ]; do case "$1" in -o) out="$2"; shift ;; -*) ;; *) url="$1" ;; esac; shift; done
     name="${url%%\?*}"; name="${name##*%2F}"; name="${name##*/}"
     if [ -z "$out" ]; then :
     elif [ -f "${STUB_OBJECTS:-/nonexistent}/$name" ]; then cp "$STUB_OBJECTS/$name" "$out"; else : >"$out"; fi ;;
esac""",
    "apt-get": 'echo "apt-get $*" >>"$STUB_LOG"',
    "ray": 'echo "system-ray $*" >>"$STUB_LOG"',
    "python3": r"""
if [ "$1" = -c ] && [ "$2" = "import ensurepip" ]; then exit 1; fi  # Debian without python3-venv
if [ "$1" = -m ] && [ "$2" = venv ]; then
  echo "python3 $*" >>"$STUB_LOG"
  mkdir -p "$3/bin"
  printf '#!/bin/bash\necho "venv-python $*" >>"$STUB_LOG"\n' >"$3/bin/python"
  printf '#!/bin/bash\necho "venv-ray $*" >>"$STUB_LOG"\n' >"$3/bin/ray"
  chmod +x "$3/bin/python" "$3/bin/ray"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
""",
}


def test_head_script_is_valid_bash_without_secrets(tmp_path) -> None:
    script = head_startup_script(STAGED, ray_port=6380, dashboard_port=8266)
    path = tmp_path / "head.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert script.startswith("#!/bin/bash\n")
    assert "Metadata-Flavor: Google" in script and "metadata.google.internal/computeMetadata/v1" in script
    assert ('ray start --head --port=6380 --node-ip-address="$INTERNAL_IP" \\\n'
            "  --dashboard-host=127.0.0.1 --dashboard-port=8266 \\\n"
            "  --include-dashboard=true --num-cpus=0") in script
    assert "0.0.0.0" not in script
    for secret in ("BEGIN PRIVATE KEY", "private_key", "client_secret", "refresh_token", "ya29.", "AIza",
                   "GOOGLE_APPLICATION_CREDENTIALS", "gcloud"):
        assert secret not in script
    assert "--num-cpus=2" in head_startup_script(STAGED, num_cpus=2)
    quoted = head_startup_script(dataclasses.replace(STAGED, wheel_url="gs://b/w w'; rm -rf x.whl"))
    subprocess.run(["bash", "-n", "-c", quoted], check=True)
    assert "WHEEL_URL='gs://b/w w'\"'\"'; rm -rf x.whl'" in quoted


def bucket_objects(tmp_path, wheel: bytes = WHEEL_BYTES, lock: bytes = LOCK_BYTES) -> dict:
    """The script's env, with what the stub curl serves (by object name): the bucket's wheel and lock."""
    objects = tmp_path / "objects"
    objects.mkdir(exist_ok=True)
    (objects / "tpu_pod_launcher-0.1.0-py3-none-any.whl").write_bytes(wheel)
    (objects / "requirements.lock").write_bytes(lock)
    return {"STUB_OBJECTS": str(objects), "TPU_LAUNCHER_HEAD_LOG": str(tmp_path / "head.log"),
            "TPU_LAUNCHER_WORKDIR": str(tmp_path / "work")}


def test_head_script_runs_with_stubs(tmp_path) -> None:
    script_env = bucket_objects(tmp_path)
    calls = run_with_stubs(head_startup_script(STAGED), tmp_path, STUBS, script_env)
    work = tmp_path / "work"
    wheel, lock = work / "tpu_pod_launcher-0.1.0-py3-none-any.whl", work / "requirements.lock"
    assert wheel.read_bytes() == WHEEL_BYTES and lock.read_bytes() == LOCK_BYTES
    assert "apt-get install -y -qq python3-venv python3-pip" in calls
    assert f"python3 -m venv {work / 'venv'}" in calls
    assert "Authorization: Bearer tok" in headers(tmp_path) and any("-H @/dev/fd/" in c and "/storage/v1/b/run-bucket/o/wheels%2Fabc123%2Ftpu_pod_launcher"
               in c for c in calls)
    assert "Authorization: Bearer tok" in headers(tmp_path) and any("-H @/dev/fd/" in c and "/o/wheels%2Ffedcba987654%2Frequirements.lock" in c for c in calls)
    # exactly the lock (hash-checked, nothing resolved), then the wheel alone, into the venv
    assert [c for c in calls if " -m pip" in c] == [
        f"venv-python -m pip install --quiet --require-hashes --no-deps -r {lock}",
        f"venv-python -m pip install --quiet --no-deps --force-reinstall {wheel}"]
    start = ("venv-ray start --head --port=6379 --node-ip-address=10.0.0.9 --dashboard-host=127.0.0.1 "
             "--dashboard-port=8265 --include-dashboard=true --num-cpus=0 --disable-usage-stats")
    fetch = (f"venv-python -m cluster.secrets fetch --project proj --secret r1-ray-token --out {work / 'ray_token'} "
             "--wait-s 300")
    assert fetch in calls and calls.index(fetch) < calls.index(start)
    assert start in calls and calls.index("venv-ray stop --force") < calls.index(start)
    assert not any(c.startswith("system-ray") for c in calls)
    assert "Bearer tok" not in (tmp_path / "head.log").read_text()
    # a reboot reuses the venv: no apt-get, no second venv
    calls = run_with_stubs(head_startup_script(STAGED), tmp_path, STUBS, script_env)
    assert not any(c.startswith(("apt-get", "python3 -m venv")) for c in calls) and start in calls


@pytest.mark.parametrize("answer", ["missing", "empty"])
def test_head_script_refuses_to_start_ray_without_an_internal_ip(tmp_path, answer) -> None:
    """The metadata server gives no internal IP (an error, or an empty answer): Ray would listen on its default
    address, so the script says so in its log and exits 1 before any `ray start`."""
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_with_stubs(head_startup_script(STAGED), tmp_path, STUBS, {**bucket_objects(tmp_path), "STUB_NO_IP": answer})
    assert err.value.returncode == 1
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert not any(c.startswith(("venv-ray start", "system-ray start")) for c in calls), calls
    log = (tmp_path / "head.log").read_text().splitlines()
    assert log[-1] == ("[head] refusing to start Ray: no internal IP from the metadata server "
                       "(http://metadata.google.internal/computeMetadata/v1/instance/network-interfaces/0/ip)"), log


@pytest.mark.parametrize("tampered", ["wheel", "lock"])
def test_head_script_refuses_a_tampered_wheel_or_lock(tmp_path, tampered) -> None:
    """The bucket's object is not what was staged (same name, same size, other bytes): nothing is installed."""
    good = {"wheel": WHEEL_BYTES, "lock": LOCK_BYTES}
    bad = good[tampered][:-1] + bytes([good[tampered][-1] ^ 1])
    assert len(bad) == len(good[tampered]) and bad != good[tampered]
    served = {**good, tampered: bad}
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_with_stubs(head_startup_script(STAGED), tmp_path, STUBS,
                       bucket_objects(tmp_path, served["wheel"], served["lock"]))
    assert err.value.returncode == 1
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert not any(" -m pip" in c or "ray " in c for c in calls)  # pip never ran, nor did Ray
    url = STAGED.wheel_url if tampered == "wheel" else STAGED.lock_url
    line = f"[head] refusing {url}: sha256 {_sha(bad)} does not match the staged {_sha(good[tampered])}"
    log = (tmp_path / "head.log").read_text().splitlines()
    assert line in log and log[-1] == line
    name = "tpu_pod_launcher-0.1.0-py3-none-any.whl" if tampered == "wheel" else "requirements.lock"
    assert not (tmp_path / "work" / name).exists()  # not left behind for a later install


# credentials -----------------------------------------------------------------------------------------

@pytest.fixture
def no_adc(monkeypatch: pytest.MonkeyPatch, tmp_path):
    from google.auth.compute_engine import _metadata

    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud ADC file there
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setattr(_metadata, "_NO_GCE_CHECK", True)  # read at import time; skip the metadata probe
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return monkeypatch


def test_no_credentials(no_adc: pytest.MonkeyPatch, tmp_path) -> None:
    with pytest.raises(ProvisionError) as err:
        make_compute_client()
    assert str(err.value) == CREDENTIALS_HINT and "\n" not in CREDENTIALS_HINT
    no_adc.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "nope.json"))
    with pytest.raises(ProvisionError, match="gcloud auth application-default login"):
        HeadVm(PROJECT, ZONE)
