"""The launcher builds a reproducible project wheel and stages it once, content-addressed, in a GCS bucket."""
import hashlib
import os
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



def test_stage_uploads_once_and_is_reproducible(gcs_emulator, prefix, tmp_path, caplog):
    caplog.set_level("INFO", logger="launcher.wheel")
    bucket = f"gs://{gcs_emulator.bucket}/{prefix}/"
    url = wheel.stage_wheel(bucket, cache_dir=str(tmp_path / "a"))

    built = list((tmp_path / "a").glob("*.whl"))
    assert len(built) == 1
    data = built[0].read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:12]
    key = f"{prefix}/wheels/{digest}/{built[0].name}"
    assert url == f"gs://{gcs_emulator.bucket}/{key}"
    blobs = _blobs(gcs_emulator.bucket, f"{prefix}/")
    assert [b.name for b in blobs] == [key]
    assert blobs[0].download_as_bytes() == data
    generation = _generation(gcs_emulator.bucket, key)
    assert generation

    with zipfile.ZipFile(built[0]) as zf:
        names = set(zf.namelist())
    assert {"conf/config.yaml", "conf/model/tiny.yaml", "launcher/__main__.py", "launcher/wheel.py",
            "trainer/data/storage.py", "cluster/bootstrap.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") or n.startswith("tests/") for n in names)
    assert any(r.message.startswith("wheel: built ") for r in caplog.records)
    assert any(r.message.startswith("wheel: uploaded ") for r in caplog.records)

    # Same sources, a fresh build: byte-identical wheel, same URL, nothing uploaded again.
    caplog.clear()
    again = wheel.stage_wheel(bucket, cache_dir=str(tmp_path / "b"))
    assert (tmp_path / "b" / built[0].name).read_bytes() == data
    assert again == url
    assert [b.name for b in _blobs(gcs_emulator.bucket, f"{prefix}/")] == [key]
    assert _generation(gcs_emulator.bucket, key) == generation
    assert any("already staged" in r.message for r in caplog.records)
    assert not any(r.message.startswith("wheel: uploaded ") for r in caplog.records)


def test_upload_is_content_addressed(gcs_emulator, prefix, tmp_path):
    bucket = f"gs://{gcs_emulator.bucket}/{prefix}"
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    whl.write_bytes(b"first")
    first = wheel.upload_wheel(str(whl), bucket)
    whl.write_bytes(b"second")
    second = wheel.upload_wheel(str(whl), bucket)
    assert first != second and first.endswith("/pkg-1.0-py3-none-any.whl")
    assert len(_blobs(gcs_emulator.bucket, f"{prefix}/wheels/")) == 2

    # An object of the wrong size under the address (a torn earlier attempt) is replaced.
    from trainer.data.storage import gcs_client

    key = second[len(f"gs://{gcs_emulator.bucket}/"):]
    gcs_client().bucket(gcs_emulator.bucket).blob(key).upload_from_string(b"sec")
    assert wheel.upload_wheel(str(whl), bucket) == second
    assert gcs_client().bucket(gcs_emulator.bucket).blob(key).download_as_bytes() == b"second"


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
