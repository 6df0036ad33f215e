"""Shard names in a dataset's manifest.json are untrusted: each must be a plain file name inside the data root.

A bad name is a one-line `error: data.path: ...` (exit 2) naming the manifest and the entry, raised while the
manifest is read, before any shard is opened; staging a dataset to a bucket reads it the same way.
"""
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from launcher.__main__ import main  # noqa: E402
from trainer.data import DataError, prepare, read_manifest  # noqa: E402
from trainer.data import storage  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_NAMES = ["../secret.bin", "/etc/passwd", "a/b.bin", "x\x00.bin", "..", ".", "", "a\\b.bin"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good") / "ds")
    docs = [(f"d{i}.txt", f"document {i} " + "alpha beta gamma " * (5 + i % 7)) for i in range(120)]
    prepare(docs, out, record_len=17, records_per_shard=7)
    with open(os.path.join(out, "manifest.json")) as f:
        return out, json.load(f)


def _dataset_with(tmp_path, good, bad_name, split="val"):
    """A copy of the good dataset whose manifest names `bad_name` as a shard of `split`, and a sentinel
    file just outside its root."""
    src, manifest = good
    root = tmp_path / "ds"
    root.mkdir()
    for name in os.listdir(src):
        (root / name).write_bytes(open(os.path.join(src, name), "rb").read())
    (tmp_path / "secret.bin").write_bytes(b"\0" * 1000)
    manifest = json.loads(json.dumps(manifest))
    manifest["splits"][split]["shards"][-1]["name"] = bad_name
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def opened(monkeypatch):
    """Names read through LocalStore (the only way the data layer opens local files)."""
    names = []
    real_bytes, real_range = storage.LocalStore.read_bytes, storage.LocalStore.read_range
    monkeypatch.setattr(storage.LocalStore, "read_bytes", lambda self, n: names.append(n) or real_bytes(self, n))
    monkeypatch.setattr(storage.LocalStore, "read_range",
                        lambda self, n, a, b: names.append(n) or real_range(self, n, a, b))
    return names


@pytest.mark.parametrize("bad_name", BAD_NAMES)
def test_read_manifest_rejects_names_outside_the_root(tmp_path, good, bad_name, opened):
    root = _dataset_with(tmp_path, good, bad_name)
    with pytest.raises(DataError) as info:
        read_manifest(str(root))
    msg = str(info.value)
    assert f"{root}/manifest.json" in msg and repr(bad_name) in msg and "\n" not in msg
    assert opened == ["manifest.json"]  # nothing but the manifest was read


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_split_is_checked(tmp_path, good, split):
    root = _dataset_with(tmp_path, good, "../secret.bin", split=split)
    with pytest.raises(DataError, match=f"split '{split}' has a bad shard name"):
        read_manifest(str(root))


def test_good_names_pass(good):
    assert read_manifest(good[0])["splits"]["train"]["shards"]


@pytest.mark.parametrize("bad_name", ["../secret.bin", "/etc/passwd", "a/b.bin", "x\x00.bin"])
def test_launcher_exits_2_with_one_line(tmp_path, good, bad_name, capsys, opened):
    root = _dataset_with(tmp_path, good, bad_name)
    code = main(["data=shards", f"data.path={root}", "model=tiny", f"run.dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.path: ") and repr(bad_name) in lines[0], err
    assert "Traceback" not in err + out
    assert opened == ["manifest.json"]
    assert not (tmp_path / "run").exists()


def test_real_cli(tmp_path, good):
    root = _dataset_with(tmp_path, good, "../secret.bin")
    env = dict(os.environ, PYTHONPATH=REPO, TPU_LAUNCHER_CACHE=str(tmp_path / "cache"))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "launcher", "data=shards", f"data.path={root}", "model=tiny",
                           f"run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: data.path: {root}/manifest.json is invalid: split 'val' has a bad shard name '../secret.bin' "
        f"(contains a path separator): shard names must be plain file names inside the dataset directory"), lines


def test_stage_data_reads_through_the_validated_reader(tmp_path, good, opened):
    from launcher.stage import stage_data

    root = _dataset_with(tmp_path, good, "../secret.bin")
    bucket = tmp_path / "bucket"
    with pytest.raises(DataError, match="bad shard name"):
        stage_data(str(root), str(bucket))
    assert opened == ["manifest.json"] and not bucket.exists()


def test_stage_data_copies_a_good_dataset(tmp_path, good):
    from launcher.stage import stage_data

    target = stage_data(good[0], str(tmp_path / "bucket"))
    assert read_manifest(target) == read_manifest(good[0])
    assert sorted(os.listdir(target)) == sorted(os.listdir(good[0]))
