"""The launcher builds a reproducible project wheel, locks its runtime dependencies by hash for the VMs, and stages
both once, content-addressed, in a GCS bucket."""
import dataclasses
import hashlib
import os
import re
import sys
import time
import uuid
import zipfile

import pytest

from launcher import wheel
from launcher.errors import UserError
from podutil import ROOT


def _blobs(bucket, prefix):
    from trainer.data.storage import gcs_client

    return list(gcs_client().list_blobs(bucket, prefix=prefix))


def _generation(bucket, key):
    from trainer.data.storage import gcs_client

    return gcs_client().bucket(bucket).get_blob(key).generation


@pytest.fixture
def prefix():
    return f"wheel-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def lock_text():
    """The VMs' lock of this checkout's runtime requirements: resolved from the package index once (cached in
    $TPU_LAUNCHER_CACHE/locks or ~/.cache/tpu-launcher/locks), as stage_wheel does."""
    return wheel.lock_requirements(wheel.runtime_requirements())


def test_project_root_is_this_checkout():
    assert wheel.project_root() == ROOT


def test_project_root_refuses_an_installed_copy(tmp_path, monkeypatch):
    (tmp_path / "launcher").mkdir()
    monkeypatch.setattr(wheel, "__file__", str(tmp_path / "launcher" / "wheel.py"))
    with pytest.raises(wheel.WheelError) as err:
        wheel.project_root()
    msg = str(err.value)
    assert msg.startswith("cluster.bucket: cannot build a wheel from an installed copy")
    assert "cluster.wheel_url" in msg and "\n" not in msg



def test_stage_uploads_once_and_is_reproducible(gcs_emulator, prefix, tmp_path, caplog, lock_text):
    caplog.set_level("INFO", logger="launcher.wheel")
    bucket = f"gs://{gcs_emulator.bucket}/{prefix}/"
    staged = wheel.stage_wheel(bucket, cache_dir=str(tmp_path / "a"))
    assert isinstance(staged, wheel.Staged)
    with pytest.raises(dataclasses.FrozenInstanceError):
        staged.wheel_sha256 = "0" * 64

    built = list((tmp_path / "a").glob("*.whl"))
    assert len(built) == 1
    data = built[0].read_bytes()
    assert staged.wheel_sha256 == hashlib.sha256(data).hexdigest()
    key = f"{prefix}/wheels/{staged.wheel_sha256[:12]}/{built[0].name}"
    assert staged.wheel_url == f"gs://{gcs_emulator.bucket}/{key}"
    # the lock, content-addressed by its own hash, next to the wheel
    lock_bytes = lock_text.encode()
    assert staged.lock_sha256 == hashlib.sha256(lock_bytes).hexdigest()
    lock_key = f"{prefix}/wheels/{staged.lock_sha256[:12]}/requirements.lock"
    assert staged.lock_url == f"gs://{gcs_emulator.bucket}/{lock_key}"
    blobs = {b.name: b for b in _blobs(gcs_emulator.bucket, f"{prefix}/")}
    assert sorted(blobs) == sorted([key, lock_key])
    assert blobs[key].download_as_bytes() == data and blobs[lock_key].download_as_bytes() == lock_bytes
    generation = _generation(gcs_emulator.bucket, key)
    assert generation

    with zipfile.ZipFile(built[0]) as zf:
        names = set(zf.namelist())
    assert {"conf/config.yaml", "conf/model/tiny.yaml", "launcher/__main__.py", "launcher/wheel.py",
            "trainer/data/storage.py", "cluster/bootstrap.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") or n.startswith("tests/") for n in names)
    assert any(r.message.startswith("wheel: built ") for r in caplog.records)
    assert any(r.message.startswith("wheel: uploaded ") for r in caplog.records)

    # Same sources, a fresh build: byte-identical wheel, same URLs, nothing uploaded again.
    caplog.clear()
    again = wheel.stage_wheel(bucket, cache_dir=str(tmp_path / "b"))
    assert (tmp_path / "b" / built[0].name).read_bytes() == data
    assert again == staged
    assert sorted(b.name for b in _blobs(gcs_emulator.bucket, f"{prefix}/")) == sorted([key, lock_key])
    assert _generation(gcs_emulator.bucket, key) == generation
    assert sum("already staged (md5Hash matches" in r.message for r in caplog.records) == 2  # wheel and lock
    assert not any(" uploaded " in r.message for r in caplog.records)

    # Other bytes of the same size at the wheel's address (torn or tampered): staging uploads it again.
    from trainer.data.storage import gcs_client

    forged = bytes([data[0] ^ 1]) + data[1:]
    gcs_client().bucket(gcs_emulator.bucket).blob(key).upload_from_string(forged)
    assert _blobs(gcs_emulator.bucket, key)[0].size == len(data)
    caplog.clear()
    assert wheel.stage_wheel(bucket, cache_dir=str(tmp_path / "c")) == staged
    assert gcs_client().bucket(gcs_emulator.bucket).blob(key).download_as_bytes() == data
    assert any(r.message.startswith("wheel: uploaded ") for r in caplog.records)
    assert any("holds other bytes (md5Hash differs)" in r.message for r in caplog.records)


def test_upload_is_content_addressed(gcs_emulator, prefix, tmp_path):
    bucket = f"gs://{gcs_emulator.bucket}/{prefix}"
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    whl.write_bytes(b"first")
    first = wheel.upload_wheel(str(whl), bucket)
    whl.write_bytes(b"second")
    second = wheel.upload_wheel(str(whl), bucket)
    assert first != second and first.endswith("/pkg-1.0-py3-none-any.whl")
    assert len(_blobs(gcs_emulator.bucket, f"{prefix}/wheels/")) == 2

    # An object of the wrong size under the address (a torn earlier attempt) is replaced...
    from trainer.data.storage import gcs_client

    key = second[len(f"gs://{gcs_emulator.bucket}/"):]
    blob = gcs_client().bucket(gcs_emulator.bucket).blob(key)
    blob.upload_from_string(b"sec")
    assert wheel.upload_wheel(str(whl), bucket) == second
    assert blob.download_as_bytes() == b"second"
    # ...and so is one of the right size with other bytes: the content hash decides, never the size.
    blob.upload_from_string(b"secunD")
    generation = _generation(gcs_emulator.bucket, key)
    assert wheel.upload_wheel(str(whl), bucket) == second
    assert blob.download_as_bytes() == b"second" and _generation(gcs_emulator.bucket, key) != generation
    generation = _generation(gcs_emulator.bucket, key)
    assert wheel.upload_wheel(str(whl), bucket) == second  # the right bytes: left alone
    assert _generation(gcs_emulator.bucket, key) == generation


def test_same_object_without_md5_compares_crc32c_then_bytes(monkeypatch):
    class Blob:
        size, md5_hash, crc32c = 6, None, None

    class Store:
        bucket_name, prefix = "b", "p"

        def read_bytes(self, name):
            return b"second"

    blob = Blob()

    class Client:
        def bucket(self, name):
            return type("B", (), {"get_blob": lambda self, key, timeout=None: blob})()

    import trainer.data.storage as storage

    monkeypatch.setattr(storage, "gcs_client", lambda: Client())
    import base64

    import google_crc32c

    blob.crc32c = base64.b64encode(google_crc32c.Checksum(b"second").digest()).decode()
    assert wheel._same_object(Store(), "x", b"second") == (True, "crc32c")
    assert wheel._same_object(Store(), "x", b"secunD") == (False, "crc32c")
    blob.crc32c = None
    assert wheel._same_object(Store(), "x", b"second") == (True, "bytes")
    assert wheel._same_object(Store(), "x", b"secunD") == (False, "bytes")
    assert wheel._same_object(Store(), "x", b"longer bytes") == (False, "size")


def test_lock_pins_every_runtime_dependency_by_hash(lock_text, tmp_path):
    lines = lock_text.splitlines()
    assert lines and all("==" in ln and "--hash=sha256:" in ln for ln in lines)
    assert all(wheel.LOCK_LINE.match(ln) for ln in lines)
    pins = {re.sub(r"[-_.]+", "-", ln.split("==")[0]).lower(): ln.split("==")[1].split()[0] for ln in lines}
    assert len(pins) == len(lines)  # one line per distribution
    assert {"jax", "jaxlib", "ray", "numpy", "gcsfs", "libtpu", "flax", "hydra-core"} <= set(pins)
    # the pyproject pins, and the transitive closure (ray[default]'s extras, hydra's sdist-only antlr4 runtime)
    assert pins["jax"] == "0.10.2" and pins["ray"] == "2.60.0" and pins["numpy"] == "2.4.6"
    assert pins["gcsfs"] == "2026.10.1"
    assert {"aiohttp", "grpcio", "protobuf", "antlr4-python3-runtime", "omegaconf"} <= set(pins)
    assert "jax[tpu]==0.10.2" in wheel.runtime_requirements()
    # cached: the same requirements resolve once (a relaunch, the rest of the suite)
    reqs = wheel.runtime_requirements()
    path = os.path.join(wheel.lock_cache_dir(), f"{wheel.lock_key(reqs, '%d.%d' % sys.version_info[:2])}.txt")
    assert open(path).read() == lock_text
    t0 = time.perf_counter()
    assert wheel.lock_requirements(list(reversed(reqs))) == lock_text  # any order: the same key
    assert time.perf_counter() - t0 < 1.0
    assert wheel.lock_key(reqs, "3.11") != wheel.lock_key(reqs, "3.12")
    assert wheel.lock_key(reqs, "3.11") != wheel.lock_key(reqs + ["six==1.17.0"], "3.11")


def test_failed_resolution_is_one_line(tmp_path, monkeypatch):
    index = tmp_path / "simple"
    index.mkdir()
    monkeypatch.setenv("PIP_INDEX_URL", index.as_uri())  # an index with nothing on it
    with pytest.raises(wheel.WheelError) as err:
        wheel.lock_requirements(["tpu-launcher-no-such-dist==1.0"], cache_dir=str(tmp_path / "cache"))
    msg = str(err.value)
    assert msg.startswith("cluster.bucket: resolving the VMs' dependencies failed: ") and "\n" not in msg
    assert "tpu-launcher-no-such-dist==1.0" in msg
    assert isinstance(err.value, UserError)  # the CLI prints it as one line and exits 2
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")  # nothing cached


def test_staged_holds_sha256s():
    ok = "a" * 64
    assert wheel.Staged("gs://b/w.whl", ok, "gs://b/l", ok).lock_sha256 == ok
    for bad in ("", "A" * 64, "a" * 63, "g" * 64):
        with pytest.raises(ValueError):
            wheel.Staged("gs://b/w.whl", bad, "gs://b/l", ok)


@pytest.mark.parametrize("bad", ["my-bucket", "s3://my-bucket/x", "/tmp/wheels", "gs://", "gs:///x",
                                 "gs://Bad_Bucket!/x", ""])
def test_bad_bucket_is_one_line_before_any_build(bad, monkeypatch):
    monkeypatch.setattr(wheel, "build_wheel", lambda *a, **k: pytest.fail("built despite a bad bucket"))
    with pytest.raises(wheel.WheelError) as err:
        wheel.stage_wheel(bad)
    msg = str(err.value)
    assert msg.startswith("cluster.bucket: ") and "gs://" in msg and "\n" not in msg
    assert isinstance(err.value, UserError)  # the CLI prints it as one line and exits 2
    with pytest.raises(wheel.WheelError):
        wheel.upload_wheel(__file__, bad)


def _tiny_project(root, version="1.0"):
    os.makedirs(root / "pkg")
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "pkg"\nversion = "{version}"\n'
        '[tool.setuptools.packages.find]\ninclude = ["pkg*"]\n')
    (root / "pkg" / "__init__.py").write_text('"""pkg."""\n')


def test_build_ignores_stale_build_dir_and_leaves_tree_untouched(tmp_path):
    src = tmp_path / "src"
    _tiny_project(src)
    os.makedirs(src / "build" / "lib" / "pkg")
    (src / "build" / "lib" / "pkg" / "stale.py").write_text("# deleted from the sources long ago\n")
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    path = wheel.build_wheel(str(tmp_path / "out"), str(src))
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert "pkg/__init__.py" in names and "pkg/stale.py" not in names
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == before  # no egg-info, no build/


def test_build_failure_is_one_line(tmp_path):
    src = tmp_path / "src"
    _tiny_project(src, version="not a version!")
    with pytest.raises(wheel.WheelError) as err:
        wheel.build_wheel(str(tmp_path / "out"), str(src))
    msg = str(err.value)
    assert msg.startswith("cluster.bucket: building the project wheel failed: ")
    assert "project.version" in msg and "\n" not in msg
