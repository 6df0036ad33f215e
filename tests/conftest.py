"""Shared pytest fixtures."""

import os

import pytest

# Tests run JAX on CPU; with the tpu extra installed, keep JAX from probing for (and locking) a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
