"""GCP provider tests: the real google-cloud-tpu client against the local Cloud TPU API server."""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest
from google.api_core import exceptions as gexc

from cluster.gcp import CREDENTIALS_HINT, GcpTpuProvider, ProvisionError, make_client, tpu_name
from tpu_api_server import TpuApiServer

PROJECT, ZONE = "proj", "us-central2-b"
QR_PATH = f"/v2/projects/{PROJECT}/locations/{ZONE}/queuedResources"
TICK = 0.05


class Recorder:
    """Collects the server's node callbacks."""

    def __init__(self) -> None:
        self.ready: list[dict] = []
        self.deleted: list[dict] = []
        self.preempted: list[dict] = []


@pytest.fixture
def events() -> Recorder:
    return Recorder()


@pytest.fixture
def server(events: Recorder):
    with TpuApiServer(tick_s=TICK, on_ready=events.ready.append, on_delete=events.deleted.append,
                      on_preempt=events.preempted.append) as srv:
        yield srv


def provider_for(srv: TpuApiServer, lines: list[str] | None = None) -> GcpTpuProvider:
    out = lines if lines is not None else []
    return GcpTpuProvider(PROJECT, ZONE, client=make_client(srv.url), poll_s=0.01, timeout_s=10,
                          progress=out.append)


def eventually(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def node_body(srv: TpuApiServer, index: int = -1) -> dict:
    return srv.create_bodies[index]["tpu"]["nodeSpec"][0]["node"]


def test_create_wait_endpoints_delete(server: TpuApiServer, events: Recorder) -> None:
    lines: list[str] = []
    provider = provider_for(server, lines)
    name = provider.ensure("run-a", "v4-32", "tpu-ubuntu2204-base")
    assert name == f"projects/{PROJECT}/locations/{ZONE}/queuedResources/run-a-qr"
    nodes = provider.wait_active("run-a")
    assert [n["name"] for n in nodes] == ["run-a"] and nodes[0]["state"] == "READY"
    assert any("creating queued resource run-a-qr" in line for line in lines)
    assert any(line.startswith("gcp: run-a-qr: ACTIVE") for line in lines)
    assert provider.endpoints("run-a") == [["127.0.0.1"] * 4]  # v4-32: 4 hosts
    assert provider.node_states("run-a") == {"run-a": "READY"}
    assert [len(n["networkEndpoints"]) for n in events.ready] == [4]
    body = server.create_bodies[0]["tpu"]["nodeSpec"][0]
    assert body["nodeId"] == "run-a" and "multisliceParams" not in body
    provider.delete("run-a")
    assert provider.node_states("run-a") == {} and not server.nodes and not server.queued_resources
    assert [n["name"].rsplit("/", 1)[-1] for n in events.deleted] == ["run-a"]
    provider.delete("run-a")  # idempotent: NotFound is fine
    with pytest.raises(gexc.NotFound):
        provider.client.get_queued_resource(name=name)


def test_multislice(server: TpuApiServer, events: Recorder) -> None:
    provider = provider_for(server)
    provider.ensure("ms", "v4-32", "rt", num_slices=2)
    nodes = provider.wait_active("ms")
    assert [n["name"] for n in nodes] == ["ms-0", "ms-1"]
    assert provider.endpoints("ms") == [["127.0.0.1"] * 4, ["127.0.0.1"] * 4]
    spec = server.create_bodies[0]["tpu"]["nodeSpec"][0]
    assert spec["multisliceParams"] == {"nodeCount": 2, "nodeIdPrefix": "ms"} and "nodeId" not in spec
    assert len(events.ready) == 2 and all(n["multisliceNode"] for n in events.ready)
    provider.delete("ms")
    assert not server.nodes


def test_create_waits_for_a_slow_operation() -> None:
    with TpuApiServer(tick_s=TICK, create_op_ticks=2) as srv:
        provider = provider_for(srv)
        provider.ensure("op", "v4-8", "rt")
        polls = [p for m, p in srv.requests if m == "GET" and "/operations/" in p]
        assert len(polls) >= 2 and len(set(polls)) == 1  # the create operation, polled until done
        assert provider.wait_active("op")[0]["state"] == "READY"


def test_ensure_is_idempotent(server: TpuApiServer) -> None:
    lines: list[str] = []
    provider = provider_for(server, lines)
    first = provider.ensure("idem", "v4-8", "rt")
    second = provider.ensure("idem", "v4-8", "rt")  # still pending: reuse
    provider.wait_active("idem")
    third = provider.ensure("idem", "v4-8", "rt")  # active: reuse
    assert first == second == third
    assert server.count("POST", "/queuedResources") == 1 and server.count("DELETE", "-qr") == 0
    assert sum("reusing" in line for line in lines) == 2


def test_shape_change_is_refused(server: TpuApiServer) -> None:
    provider = provider_for(server)
    provider.ensure("shape", "v4-8", "rt")
    with pytest.raises(ProvisionError, match="already exists with 1 x v4-8"):
        provider.ensure("shape", "v4-32", "rt")
    assert server.count("POST", "/queuedResources") == 1


@pytest.mark.parametrize("how", ["preempt-suspend", "preempt-active", "terminated"])
def test_dead_resource_is_deleted_then_recreated(how: str, events: Recorder) -> None:
    with TpuApiServer(tick_s=TICK, suspend_on_preempt=(how == "preempt-suspend"), on_ready=events.ready.append,
                      on_delete=events.deleted.append, on_preempt=events.preempted.append) as srv:
        provider = provider_for(srv)
        provider.ensure("pre", "v4-8", "rt", capacity="spot")
        provider.wait_active("pre")
        if how == "terminated":
            srv.set_node_state("pre", "TERMINATED")
        else:
            srv.preempt("pre")
            assert [n["name"].rsplit("/", 1)[-1] for n in events.preempted] == ["pre"]
        expected_qr = "SUSPENDED" if how == "preempt-suspend" else "ACTIVE"
        eventually(lambda: srv.queued_resources[provider.qr_name("pre")]["state"] == expected_qr)
        assert provider.node_states("pre") == {"pre": "TERMINATED" if how == "terminated" else "PREEMPTED"}
        with pytest.raises(ProvisionError):
            provider.wait_active("pre")
        provider.ensure("pre", "v4-8", "rt", capacity="spot")
        assert srv.count("DELETE", "/queuedResources/pre-qr") == 1
        assert srv.count("POST", "/queuedResources") == 2
        assert len(events.deleted) == 1  # the dead node went (quota freed) before re-creating
        provider.wait_active("pre")
        assert provider.node_states("pre") == {"pre": "READY"} and len(events.ready) == 2


def test_failed_create_raises(server: TpuApiServer) -> None:
    server.fail_next_create(message="no capacity for v4-32")
    provider = provider_for(server)
    provider.ensure("fail", "v4-32", "rt")
    with pytest.raises(ProvisionError, match="FAILED: no capacity for v4-32"):
        provider.wait_active("fail")
    provider.ensure("fail", "v4-32", "rt")  # FAILED is dead: delete and re-create
    assert server.count("POST", "/queuedResources") == 2
    assert provider.wait_active("fail")[0]["state"] == "READY"


def test_wait_timeout_and_missing() -> None:
    with TpuApiServer(tick_s=30) as slow_server:  # stays ACCEPTED for the whole test
        provider = provider_for(slow_server)
        with pytest.raises(ProvisionError, match="does not exist"):
            provider.wait_active("nothing")
        provider.ensure("slow", "v4-8", "rt")
        provider.timeout_s = 0.05
        with pytest.raises(ProvisionError, match=r"timed out after .* \(ACCEPTED\)"):
            provider.wait_active("slow")


def test_capacity_fields(server: TpuApiServer) -> None:
    provider = provider_for(server)
    provider.ensure("spot", "v4-8", "rt", capacity="spot")
    assert server.create_bodies[-1]["spot"] == {} and "schedulingConfig" not in node_body(server)
    provider.ensure("od", "v4-8", "rt", capacity="on_demand")
    body = server.create_bodies[-1]
    assert not {"spot", "guaranteed", "reservationName"} & body.keys()
    assert "schedulingConfig" not in node_body(server)
    reservation = f"projects/{PROJECT}/locations/{ZONE}/reservations/res1"
    provider.ensure("res", "v4-8", "rt", capacity="reserved", reservation=reservation)
    body = server.create_bodies[-1]
    assert node_body(server)["schedulingConfig"] == {"reserved": True}
    assert body["reservationName"] == reservation and "spot" not in body
    with pytest.raises(ProvisionError, match="Unknown accelerator type 'v9-7'"):
        provider.ensure("bad", "v9-7", "rt")
    with pytest.raises(ProvisionError, match="capacity must be one of"):
        provider.ensure("bad", "v4-8", "rt", capacity="cheap")


def test_labels_metadata_network(server: TpuApiServer) -> None:
    provider = provider_for(server)
    script = "#!/bin/bash\necho hello\n"
    provider.ensure("lab", "v4-8", "rt", labels={"team": "ml"}, metadata={"startup-script": script},
                    network="net1", subnetwork="sub1", service_account="sa@proj.iam.gserviceaccount.com")
    node = node_body(server)
    assert node["labels"] == {"team": "ml", "launcher-run": "lab"}
    assert node["metadata"] == {"startup-script": script}
    assert node["networkConfig"] == {"network": "net1", "subnetwork": "sub1"}
    assert node["serviceAccount"]["email"] == "sa@proj.iam.gserviceaccount.com"
    ready = provider.wait_active("lab")[0]
    assert ready["labels"]["launcher-run"] == "lab" and ready["metadata"]["startup-script"] == script


def test_tpu_names() -> None:
    assert tpu_name("run-1") == "run-1"
    for raw in ("My_Run.2", "9lives", "x" * 80, "--"):
        name = tpu_name(raw)
        assert name[0].isalpha() and len(name) <= 40 and name == name.lower()
        assert all(c.isalnum() or c == "-" for c in name) and not name.endswith("-")
    assert tpu_name("a_b") != tpu_name("a.b")


def test_server_errors_map_to_client_exceptions(server: TpuApiServer) -> None:
    provider = provider_for(server)
    with pytest.raises(gexc.NotFound):
        provider.client.get_node(name=f"projects/{PROJECT}/locations/{ZONE}/nodes/none")
    provider.ensure("nf", "v4-8", "rt")
    provider.wait_active("nf")
    with pytest.raises(gexc.BadRequest, match="use force"):  # FAILED_PRECONDITION is HTTP 400 over REST
        provider.client.delete_queued_resource(name=provider.qr_name("nf"))
    listed = provider.client.list_queued_resources(parent=provider.parent)
    assert [qr.name for qr in listed] == [provider.qr_name("nf")]
    assert [n.name.rsplit("/", 1)[-1] for n in provider.client.list_nodes(parent=provider.parent)] == ["nf"]


@pytest.fixture
def no_adc(monkeypatch: pytest.MonkeyPatch, tmp_path):
    from google.auth.compute_engine import _metadata

    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud ADC file there
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setattr(_metadata, "_NO_GCE_CHECK", True)  # read at import time; skip the metadata probe
    return monkeypatch


def test_missing_credentials_file(no_adc: pytest.MonkeyPatch, tmp_path) -> None:
    no_adc.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "nope.json"))
    with pytest.raises(ProvisionError) as err:
        make_client()
    assert str(err.value) == CREDENTIALS_HINT and "\n" not in CREDENTIALS_HINT
    assert "gcloud auth application-default login" in CREDENTIALS_HINT
    assert "GOOGLE_APPLICATION_CREDENTIALS" in CREDENTIALS_HINT


def test_no_adc(no_adc: pytest.MonkeyPatch) -> None:
    no_adc.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises(ProvisionError, match="gcloud auth application-default login"):
        GcpTpuProvider(PROJECT, ZONE)


# bootstrap (startup script) ------------------------------------------------------------------------

def headers(tmp_path) -> str:
    """The headers the stub curl was given from files (-H @FILE): not on any command line."""
    path = tmp_path / "calls.log.headers"
    return path.read_text() if path.exists() else ""


STUBS = {  # fake commands on PATH: each logs its arguments to $STUB_LOG
    "curl": r"""
echo "curl $*" >>"$STUB_LOG"
for a in "$@"; do case "$a" in @*) cat "${a#@}" >>"$STUB_LOG.headers" ;; esac; done  # headers from files
case "$*" in
  *attributes/ray-head-address*) printf 10.0.0.5 ;;
  *attributes/ray-token-secret*) [ -n "${STUB_NO_SECRET:-}" ] && exit 22; printf r1-ray-token ;;
  *attributes/launcher-project*) printf proj ;;
  *network-interfaces/0/ip*) case "${STUB_NO_IP:-}" in missing) exit 22 ;; empty) exit 0 ;; esac
                             printf 10.0.0.7 ;;
  *attributes/*) exit 22 ;;  # attribute not set: the script falls back to the baked-in value
  *service-accounts/default/token*) printf '{"access_token": "tok", "expires_in": 60}' ;;
  *) out= url=  # an object: served from $STUB_OBJECTS/<its name>, or empty
     while [ $# -gt 0 ]; do case "$1" in -o) out="$2"; shift ;; -*) ;; *) url="$1" ;; esac; shift; done
     name="${url%%\?*}"; name="${name##*%2F}"; name="${name##*/}"
     if [ -z "$out" ]; then :
     elif [ -f "${STUB_OBJECTS:-/nonexistent}/$name" ]; then cp "$STUB_OBJECTS/$name" "$out"; else : >"$out"; fi ;;
esac""",
    "ray": 'echo "ray $*" >>"$STUB_LOG"',
    "rm": 'echo "rm $*" >>"$STUB_LOG"',
    "fuser": 'echo "fuser $*" >>"$STUB_LOG"',
    "python3": 'if [ "$1" = -m ]; then echo "python3 $*" >>"$STUB_LOG"; else exec "$REAL_PYTHON" "$@"; fi',
}


WHEEL_NAME = "tpu_pod_launcher-0.1.0-py3-none-any.whl"
WHEEL_BYTES = b"PK\x03\x04 the staged wheel's bytes"
LOCK_BYTES = b"numpy==2.4.6 --hash=sha256:" + b"ab" * 32 + b"\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staged():
    from launcher.wheel import Staged

    return Staged(f"gs://run-bucket/runs/r 1/{WHEEL_NAME}", _sha(WHEEL_BYTES),
                  "gs://run-bucket/wheels/0123456789ab/requirements.lock", _sha(LOCK_BYTES))


def bucket_objects(tmp_path, wheel: bytes = WHEEL_BYTES, lock: bytes = LOCK_BYTES) -> dict:
    """What the stub curl serves (by object name): the bucket's wheel and lock, maybe not what was staged."""
    objects = tmp_path / "objects"
    objects.mkdir(exist_ok=True)
    (objects / WHEEL_NAME).write_bytes(wheel)
    (objects / "requirements.lock").write_bytes(lock)
    return {"STUB_OBJECTS": str(objects), "TPU_LAUNCHER_BOOTSTRAP_LOG": str(tmp_path / "boot.log"),
            "TPU_LAUNCHER_WORKDIR": str(tmp_path / "work")}


def bootstrap_script() -> str:
    from cluster.bootstrap import startup_script

    return startup_script(staged(), "10.0.0.2", 6379, '{"launcher-host": 1}', '{"launcher-run": "r1"}')


def test_bootstrap_script_is_valid_bash_without_secrets(tmp_path) -> None:
    import subprocess

    script = bootstrap_script()
    path = tmp_path / "startup.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert script.startswith("#!/bin/bash\n")
    assert "Metadata-Flavor: Google" in script and "metadata.google.internal/computeMetadata/v1" in script
    assert "rm -f /tmp/libtpu_lockfile" in script and "/dev/accel*" in script and "/dev/vfio/*" in script
    for secret in ("BEGIN PRIVATE KEY", "private_key", "client_secret", "refresh_token", "ya29.", "AIza",
                   "GOOGLE_APPLICATION_CREDENTIALS", "gcloud"):
        assert secret not in script
    from cluster.bootstrap import startup_script

    with pytest.raises(ValueError):
        startup_script(staged(), "h", 1, "{}", '{"a": "x,y"}')
    from types import SimpleNamespace

    for bad in ("", "ab" * 31, "AB" * 32, "'; rm -rf / #" + "a" * 51):  # a sha256 is 64 lowercase hex digits
        with pytest.raises(ValueError, match="sha256"):
            startup_script(SimpleNamespace(wheel_url="gs://b/w.whl", wheel_sha256=bad, lock_url="gs://b/l",
                                           lock_sha256="a" * 64), "h", 1, "{}", "{}")
    assert f"WHEEL_SHA256={_sha(WHEEL_BYTES)}" in script and f"LOCK_SHA256={_sha(LOCK_BYTES)}" in script


def test_bootstrap_script_runs_with_stubs(tmp_path) -> None:
    from script_stubs import run_with_stubs

    calls = run_with_stubs(bootstrap_script(), tmp_path, STUBS, bucket_objects(tmp_path))
    work = tmp_path / "work"
    wheel, lock = work / WHEEL_NAME, work / "requirements.lock"
    assert wheel.read_bytes() == WHEEL_BYTES and lock.read_bytes() == LOCK_BYTES
    assert "Authorization: Bearer tok" in headers(tmp_path) and any("-H @/dev/fd/" in c and "/storage/v1/b/run-bucket/o/runs%2Fr%201%2Ftpu_pod_launcher"
               in c for c in calls)
    assert "Authorization: Bearer tok" in headers(tmp_path) and any("-H @/dev/fd/" in c and "/o/wheels%2F0123456789ab%2Frequirements.lock" in c for c in calls)
    # exactly the lock (every distribution hash-checked, none resolved), then the wheel alone: nothing else
    pips = [c for c in calls if c.startswith("python3 -m pip")]
    assert pips == [f"python3 -m pip install --quiet --require-hashes --no-deps -r {lock}",
                    f"python3 -m pip install --quiet --no-deps --force-reinstall {wheel}"]
    log = (tmp_path / "boot.log").read_text()
    assert f"[bootstrap] fetched gs://run-bucket/runs/r 1/{WHEEL_NAME} (sha256 {_sha(WHEEL_BYTES)})" in log
    assert "Bearer tok" not in log
    assert "rm -f /tmp/libtpu_lockfile" in calls
    starts = [c for c in calls if c.startswith("ray start")]
    # head address from metadata; port not in metadata: the baked-in 6379
    assert starts == ['ray start --address=10.0.0.5:6379 --node-ip-address=10.0.0.7 '
                      '--resources={"launcher-host":1} --labels=launcher-run=r1']
    assert calls.index("ray stop --force") < calls.index(starts[0])
    # the run's Ray token from Secret Manager (the secret named in the metadata) before Ray starts
    fetch = f"python3 -m cluster.secrets fetch --project proj --secret r1-ray-token --out {work / 'ray_token'} --wait-s 300"
    assert fetch in calls and calls.index(fetch) < calls.index(starts[0])


def test_bootstrap_refuses_to_start_ray_without_the_token_secret(tmp_path) -> None:
    from script_stubs import run_with_stubs

    with pytest.raises(subprocess.CalledProcessError):
        run_with_stubs(bootstrap_script(), tmp_path, STUBS, {**bucket_objects(tmp_path), "STUB_NO_SECRET": "1"})
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert not any(c.startswith("ray start") for c in calls)
    assert "[bootstrap] refusing to start Ray: no ray-token-secret in this VM's metadata" in \
        (tmp_path / "boot.log").read_text()


@pytest.mark.parametrize("answer", ["missing", "empty"])
def test_bootstrap_refuses_to_start_ray_without_an_internal_ip(tmp_path, answer) -> None:
    """The metadata server gives no internal IP (an error, or an empty answer): Ray would listen on its default
    address, so the script says so in its log and exits 1 before any `ray start`."""
    from script_stubs import run_with_stubs

    with pytest.raises(subprocess.CalledProcessError) as err:
        run_with_stubs(bootstrap_script(), tmp_path, STUBS, {**bucket_objects(tmp_path), "STUB_NO_IP": answer})
    assert err.value.returncode == 1
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert not any(c.startswith("ray start") for c in calls), calls
    log = (tmp_path / "boot.log").read_text().splitlines()
    assert log[-1] == ("[bootstrap] refusing to start Ray: no internal IP from the metadata server "
                       "(http://metadata.google.internal/computeMetadata/v1/instance/network-interfaces/0/ip)"), log


@pytest.mark.parametrize("tampered", ["wheel", "lock"])
def test_bootstrap_refuses_a_tampered_wheel_or_lock(tmp_path, tampered) -> None:
    """The bucket's object is not what was staged (same name, same size, other bytes): nothing is installed."""
    from script_stubs import run_with_stubs

    good = {"wheel": WHEEL_BYTES, "lock": LOCK_BYTES}
    bad = bytes([good[tampered][0] ^ 1]) + good[tampered][1:]
    assert len(bad) == len(good[tampered]) and bad != good[tampered]
    served = {**good, tampered: bad}
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_with_stubs(bootstrap_script(), tmp_path, STUBS, bucket_objects(tmp_path, served["wheel"], served["lock"]))
    assert err.value.returncode == 1
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert not any(c.startswith("python3 -m pip") for c in calls)  # pip never ran
    assert not any(c.startswith(("ray ", "fuser")) for c in calls) and "rm -f /tmp/libtpu_lockfile" not in calls
    url = staged().wheel_url if tampered == "wheel" else staged().lock_url
    line = f"[bootstrap] refusing {url}: sha256 {_sha(bad)} does not match the staged {_sha(good[tampered])}"
    log = (tmp_path / "boot.log").read_text().splitlines()
    assert line in log and log[-1] == line
    name = WHEEL_NAME if tampered == "wheel" else "requirements.lock"
    assert f"rm -f {tmp_path / 'work' / name}" in calls  # the refused file is not left to be installed later
