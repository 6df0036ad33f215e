"""Transient GCS faults (503, 429, connection resets, timeouts) injected by a proxy in front of the emulator:
the storage layer, the checkpoint move and orbax checkpoints on gs:// retry them and come out right."""
import http.client
import os
import uuid

import numpy as np
import pytest

from trainer.data import storage


@pytest.fixture
def fast_backoff(monkeypatch):
    """Same retry policy (attempts, doubling), shorter waits: these tests are about outcomes, not timing."""
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


def _store(gcs_faulty, name):
    return storage.open_store(f"gs://{gcs_faulty.bucket}/faults-{name}-{uuid.uuid4().hex[:8]}")


def _payloads(n, seed=0):
    rng = np.random.default_rng(seed)
    return {f"obj-{i:02d}": rng.integers(0, 256, size=int(rng.integers(1, 50_000)), dtype=np.uint8).tobytes()
            for i in range(n)}


# ---------------------------------------------------------------- the proxy itself

def test_proxy_forwards_and_injects_each_kind(gcs_faulty, monkeypatch):
    """Without retries every injected fault reaches the caller as the transient error it stands for."""
    store = _store(gcs_faulty, "proxy")
    store.write_bytes("a", b"payload")
    assert store.read_bytes("a") == b"payload" and gcs_faulty.counts["forwarded"] >= 2
    monkeypatch.setattr(storage, "RETRIES", 0)
    monkeypatch.setattr(storage, "TIMEOUT_S", 0.5)
    gcs_faulty.delay_s = 3.0
    for kind in ("503", "429", "reset", "timeout"):
        gcs_faulty.set_faults(1.0, kinds=(kind,))
        with pytest.raises(Exception) as info:
            store.read_bytes("a")
        assert storage._is_transient(info.value), (kind, repr(info.value))
        assert gcs_faulty.counts[kind] == 1
    gcs_faulty.set_faults(0.0)
    # A chunked request body is forwarded whole (tensorstore and other clients may send one).
    conn = http.client.HTTPConnection("127.0.0.1", gcs_faulty.port, timeout=10)
    key = store._key("chunked")
    conn.request("POST", f"/upload/storage/v1/b/{gcs_faulty.bucket}/o?uploadType=media&name={key}",
                 body=iter([b"chun", b"ked ", b"body"]), headers={"Content-Type": "application/octet-stream"},
                 encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200, response.read()
    conn.close()
    assert store.read_bytes("chunked") == b"chunked body"


# ---------------------------------------------------------------- storage layer (google-cloud-storage)

def test_storage_survives_30_percent_faults(gcs_faulty, fast_backoff):
    """Write, list, stat, read whole and ranged through 30% injected 503/429/resets, incl. a resumable upload."""
    store = _store(gcs_faulty, "store")
    data = _payloads(12)
    data["big"] = os.urandom(9 * 1024 * 1024)  # above the client's 8 MiB multipart limit: a resumable upload
    gcs_faulty.set_faults(0.3, seed=1)
    for name, payload in data.items():
        store.write_bytes(name, payload)
    assert store.list() == sorted(data)
    for name, payload in data.items():
        assert store.exists(name)
        assert store.size(name) == len(payload)
        assert store.read_bytes(name) == payload
        mid = len(payload) // 2
        assert store.read_range(name, mid, mid + 100) == payload[mid:mid + 100]
    assert not store.exists("missing")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing")
    counts = gcs_faulty.snapshot()
    assert counts["503"] > 0 and counts["429"] > 0 and counts["reset"] > 0, counts
    assert gcs_faulty.faults > 0.15 * counts["requests"], counts


def test_storage_retries_timeouts(gcs_faulty, fast_backoff, monkeypatch):
    """Requests that hang past the client timeout are retried."""
    monkeypatch.setattr(storage, "TIMEOUT_S", 0.5)
    gcs_faulty.delay_s = 2.0
    store = _store(gcs_faulty, "timeout")
    data = _payloads(4, seed=2)
    gcs_faulty.set_faults(0.3, kinds=("timeout",), seed=3)
    for name, payload in data.items():
        store.write_bytes(name, payload)
        assert store.read_bytes(name) == payload
    assert store.list() == sorted(data)
    assert gcs_faulty.counts["timeout"] > 0, gcs_faulty.snapshot()


def test_storage_gives_up_on_persistent_faults(gcs_faulty, fast_backoff, monkeypatch):
    """A fault that never clears is raised after RETRIES more attempts (no endless loop); 404 is not retried."""
    monkeypatch.setattr(storage, "RETRIES", 3)
    store = _store(gcs_faulty, "persistent")
    store.write_bytes("a", b"x")
    gcs_faulty.set_faults(1.0, kinds=("503",))
    before = gcs_faulty.counts["requests"]
    with pytest.raises(Exception) as info:
        store.read_bytes("a")
    assert storage._is_transient(info.value)
    assert gcs_faulty.counts["requests"] - before == 4
    gcs_faulty.set_faults(0.0)
    before = gcs_faulty.counts["requests"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing")
    assert gcs_faulty.counts["requests"] - before == 1


def test_checkpoint_move_survives_faults(gcs_faulty, fast_backoff):
    """Setting an unreadable checkpoint aside on gs:// (trainer.checkpoint._move) through 30% faults."""
    from trainer.checkpoint import _move

    root = f"gs://{gcs_faulty.bucket}/faults-move-{uuid.uuid4().hex[:8]}"
    data = {f"5/state/{name}": payload for name, payload in _payloads(10, seed=4).items()}
    data["50/state/keep"] = b"a different step that shares the prefix '5'"
    for name, payload in data.items():
        storage.open_store(f"{root}/ckpt/{os.path.dirname(name)}").write_bytes(os.path.basename(name), payload)
    gcs_faulty.set_faults(0.3, seed=5)
    _move(f"{root}/ckpt/5", f"{root}/ckpt.unreadable/5-x")
    assert gcs_faulty.faults > 0
    gcs_faulty.set_faults(0.0)
    assert storage.open_store(f"{root}/ckpt/5/state").list() == []
    moved = storage.open_store(f"{root}/ckpt.unreadable/5-x/state")
    assert moved.list() == sorted(os.path.basename(n) for n in data if n.startswith("5/"))
    for name, payload in data.items():
        if name.startswith("5/"):
            assert moved.read_bytes(os.path.basename(name)) == payload
    assert storage.open_store(f"{root}/ckpt/50/state").read_bytes("keep") == data["50/state/keep"]


# ---------------------------------------------------------------- failures that outlast every retry

def _transient_failures():
    import aiohttp
    from google.api_core import exceptions as gexc
    from gcsfs.retry import HttpError

    wrapped = RuntimeError("orbax could not restore")
    wrapped.__cause__ = HttpError({"code": 503, "message": "backendError"})
    return [gexc.ServiceUnavailable("503"), gexc.TooManyRequests("429"), ConnectionResetError(104, "reset"),
            HttpError({"code": 429, "message": "rateLimitExceeded"}), aiohttp.ClientOSError(104, "reset"),
            ValueError('ABORTED: Error reading gs://b/c/1/state/w/.zarray: All 32 retry attempts failed: '
                       'CURL error Failure when receiving data from the peer'), wrapped]


def test_transient_failures_are_told_apart_from_bad_data():
    for exc in _transient_failures():
        assert storage.is_transient_failure(exc), repr(exc)
    from google.api_core import exceptions as gexc
    from gcsfs.retry import HttpError

    for exc in (FileNotFoundError("gs://b/x"), gexc.NotFound("404"), gexc.Forbidden("403"), HttpError({"code": 404}),
                ValueError("DATA_LOSS: Error decoding chunk"), ValueError("not valid JSON")):
        assert not storage.is_transient_failure(exc), repr(exc)


def test_manifest_read_outage_is_not_a_data_error(monkeypatch):
    """Bad data stops a run for good (exit 2); GCS failing past its retries must not be reported as bad data."""
    from google.api_core import exceptions as gexc

    from trainer.data import DataError, read_manifest

    def outage(self, name):
        raise gexc.ServiceUnavailable("503 backendError")

    monkeypatch.setattr(storage.GCSStore, "read_bytes", outage)
    with pytest.raises(gexc.ServiceUnavailable):
        read_manifest("gs://some-bucket/data")

    def forbidden(self, name):
        raise gexc.Forbidden("403")

    monkeypatch.setattr(storage.GCSStore, "read_bytes", forbidden)
    with pytest.raises(DataError, match="cannot read"):
        read_manifest("gs://some-bucket/data")


def _tiny_state(scale=1.0):
    import jax.numpy as jnp

    return {"w": jnp.arange(60, dtype=jnp.float32).reshape(6, 10) * scale, "step": jnp.int32(int(scale))}


def test_restore_does_not_set_aside_a_checkpoint_on_storage_outage(tmp_path, monkeypatch):
    """A restore that fails because storage kept failing raises (the run stops or restarts) instead of taking
    the checkpoint for unreadable and moving it aside; a genuinely corrupt one still falls back to an older one."""
    import jax

    from trainer.checkpoint import Checkpointer

    directory = str(tmp_path / "ckpt")
    saver = Checkpointer(directory, keep=3, ocdbt=False)
    for step in (1, 2):
        saver.save(step, _tiny_state(step), {"samples_seen": step})
    saver.wait()
    saver.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _tiny_state())
    for exc in _transient_failures():
        restorer = Checkpointer(directory, keep=3, ocdbt=False)

        def failing(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(restorer.manager, "restore", failing)
        with pytest.raises(type(exc)):
            restorer.restore_latest(abstract)
        restorer.close()
        assert sorted(os.listdir(directory)) == ["1", "2"] and not os.path.exists(directory + ".unreadable")
    for root, _, files in os.walk(os.path.join(directory, "2", "state")):  # corrupt step 2 for real
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    restorer = Checkpointer(directory, keep=3, ocdbt=False)
    try:
        step, _, data_state = restorer.restore_latest(abstract)
    finally:
        restorer.close()
    assert step == 1 and data_state == {"samples_seen": 1}
    assert len(os.listdir(directory + ".unreadable")) == 1


# ---------------------------------------------------------------- orbax checkpoints (gcsfs + tensorstore)

def test_orbax_checkpoint_round_trip_through_faults(gcs_faulty):
    """Async saves and a restore on gs:// while 10% of requests fail: metadata goes through gcsfs (etils
    epath), arrays through tensorstore's gcs driver; both must see faults and retry them."""
    import jax
    import jax.numpy as jnp

    from trainer.checkpoint import Checkpointer

    directory = f"gs://{gcs_faulty.bucket}/faults-ckpt-{uuid.uuid4().hex[:8]}"
    state = {f"w{i}": jnp.arange(400 * (i + 1), dtype=jnp.float32).reshape(-1, 20) for i in range(8)}
    state["step"] = jnp.int32(2)
    gcs_faulty.set_faults(0.1, seed=6)
    saver = Checkpointer(directory, keep=2, ocdbt=False)
    for step in (1, 2):
        saver.save(step, jax.tree.map(lambda x, s=step: x * s, state), {"samples_seen": 8 * step})
    saver.wait()
    saver.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restorer = Checkpointer(directory, keep=2, ocdbt=False)
    try:
        assert restorer.steps() == [1, 2]
        step, restored, data_state = restorer.restore_latest(abstract)
    finally:
        restorer.close()
    assert step == 2 and data_state == {"samples_seen": 16}
    for key in state:
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key] * 2))
    clients = gcs_faulty.by_client
    assert clients.get("gcsfs", {}).get("faults", 0) > 0, clients
    assert clients.get("tensorstore", {}).get("faults", 0) > 0, clients


# ---------------------------------------------------------------- a real pod run

@pytest.mark.integration
def test_pod_run_through_10_percent_faults(gcs_faulty, corpus_cache, tmp_path):
    """A 2-host pod with data and checkpoints on gs://, stopped at step 3 and resumed to 6 while 10% of all
    GCS requests fail: completes with no restart and the same parameters as the run without faults."""
    from podutil import TINY, explain, launch, read_json
    from trainer.data.corpus import prepare_stdlib

    root = f"gs://{gcs_faulty.bucket}/faults-pod-{uuid.uuid4().hex[:8]}"
    data = f"{root}/shards"
    prepare_stdlib(data, max_bytes=1_500_000)

    def overrides(name):
        return [f"run.name={name}", f"run.dir={tmp_path / name}", *TINY, "data=shards", f"data.path={data}",
                f"checkpoint.dir={root}/{name}/checkpoints", "checkpoint.ocdbt=false", "checkpoint.every=3",
                "optimizer.decay_steps=6"]

    def summary_of(name, proc, step):
        assert proc.returncode == 0, explain(proc)
        summary = read_json(str(tmp_path / name / "summary.json"))
        assert summary["status"] == "completed" and summary["final_step"] == step, summary
        assert summary["restarts"] == {"total": 0} and not summary["failures"], summary  # retried, not restarted
        return summary

    clean = summary_of("clean", launch(*overrides("clean"), "trainer.steps=6"), 6)
    assert gcs_faulty.faults == 0

    gcs_faulty.set_faults(0.1, seed=7)
    summary_of("faulty", launch(*overrides("faulty"), "trainer.steps=3"), 3)
    faulty = summary_of("faulty", launch(*overrides("faulty"), "trainer.steps=6"), 6)
    gcs_faulty.set_faults(0.0)
    assert faulty["resumed_from_step"] == 3
    assert faulty["params_digest"] == clean["params_digest"]
    counts, clients = gcs_faulty.snapshot(), gcs_faulty.by_client
    assert counts["503"] > 0 and counts["429"] > 0 and counts["reset"] > 0, counts
    for client in ("google-cloud-storage", "gcsfs", "tensorstore"):  # data reads; orbax metadata; orbax arrays
        assert clients.get(client, {}).get("faults", 0) > 0, clients
