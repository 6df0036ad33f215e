"""Shared pytest fixtures."""

import os

import pytest

# Tests run JAX on CPU; with the tpu extra installed, keep JAX from probing for (and locking) a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _session_ray_token() -> str:
    """Every Ray cluster a test starts in this process (and the CLI attaches to with ray.address) uses one token,
    set before Ray is imported (Ray reads the auth mode once per process). Local pods the CLI starts make their
    own per-run token."""
    import secrets
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="ray-test-auth-"), "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_hex(32).encode())
    os.close(fd)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    os.environ.pop("RAY_AUTH_TOKEN", None)
    return path


SESSION_RAY_TOKEN_FILE = _session_ray_token()


@pytest.fixture(scope="session")
def gcs_emulator():
    """An in-memory GCS emulator for the session, with the env vars clients need pointing at it.

    Yields an object with `.url` (http://127.0.0.1:PORT) and `.bucket` ("test-bucket").
    """
    from gcs_emulator import GCSEmulator

    emulator = GCSEmulator()
    url = emulator.start()
    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_CLOUD_PROJECT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    os.environ["GOOGLE_CLOUD_PROJECT"] = "test"
    try:
        yield emulator
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        emulator.stop()


@pytest.fixture(autouse=True)
def _fresh_gcs_after_each_test(request):
    """The emulator rewrites an index of every object on each write (quadratic as objects pile up): empty it
    after each test that used it, so one test's objects never slow down the next."""
    yield
    if "gcs_emulator" in request.fixturenames:
        request.getfixturevalue("gcs_emulator").wipe()


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A session-wide cache for the embedded corpus, so it is prepared once per test session."""
    path = str(tmp_path_factory.mktemp("corpus-cache"))
    saved = os.environ.get("TPU_LAUNCHER_CACHE")
    os.environ["TPU_LAUNCHER_CACHE"] = path
    yield path
    if saved is None:
        os.environ.pop("TPU_LAUNCHER_CACHE", None)
    else:
        os.environ["TPU_LAUNCHER_CACHE"] = saved


@pytest.fixture(scope="session")
def tpu_slice_cluster():
    """A real local Ray cluster whose 2 worker nodes advertise what the 2 hosts of a TPU slice do.

    Yields (address, slice_name). Launches attach to it with ray.address=... cluster.slice_name=...
    """
    from ray.cluster_utils import Cluster

    from cluster.local import LocalProvider
    from cluster.slice import local_slice

    spec = local_slice("shared", hosts=2, devices_per_host=2, name="tpu-shared-test")
    provider = LocalProvider(spec)
    address = provider.up()
    assert isinstance(provider.cluster, Cluster)
    try:
        yield address, spec.name
    finally:
        provider.down()


@pytest.fixture(scope="session")
def gcs_fault_proxy(gcs_emulator):
    """A fault-injecting proxy (tests/gcs_fault_proxy.py) in front of the session's GCS emulator."""
    from gcs_fault_proxy import GCSFaultProxy

    proxy = GCSFaultProxy(gcs_emulator.url, fault_rate=0.0, seed=0)
    proxy.start()
    proxy.bucket = gcs_emulator.bucket
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def gcs_faulty(gcs_fault_proxy, monkeypatch):
    """GCS through the fault-injecting proxy for one test: clients in this process and in subprocesses
    (STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL) talk to the proxy. Starts with no faults and zeroed
    counts; the test turns faults on with `gcs_faulty.set_faults(rate)` and reads `gcs_faulty.counts`.
    """
    proxy = gcs_fault_proxy
    proxy.set_faults(0.0, kinds=("503", "429", "reset"), seed=0)
    proxy.delay_s = 5.0
    proxy.latency_s = 0.0
    proxy.reset_counts()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.url)
    _clear_gcsfs_cache()  # gcsfs caches filesystems (and their endpoint) per process
    try:
        yield proxy
    finally:
        proxy.set_faults(0.0)
        _clear_gcsfs_cache()


def _clear_gcsfs_cache():
    try:
        import gcsfs
    except ImportError:  # pragma: no cover
        return
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_cache):
    """One completed 2-host local run (model=tiny, 12 steps, checkpoints every 4, evals every 4), trained once per
    session and shared by the tests that only read a finished run (status, logs, report, TensorBoard, the
    completed-run shortcut). Read it only; copy it (shutil.copytree) to change it. Returns its run directory."""
    from podutil import TINY, explain, launch

    run_dir = str(tmp_path_factory.mktemp("trained") / "trained")
    proc = launch("run.name=trained", f"run.dir={run_dir}", *TINY, "trainer.steps=12", "optimizer.decay_steps=12",
                  "optimizer.warmup_steps=3", "checkpoint.every=4")
    assert proc.returncode == 0, explain(proc)
    return run_dir
