"""Bad input for cloud launches: one line naming the key and the fix, exit 2, nothing created or written."""
import os

import pytest

from launcher.__main__ import main

BASE = ["+cluster=v4-32", "model=tiny", "data.max_bytes=1500000", "launcher.preflight=false"]
READY = ["cluster.project=p", "ray.address=10.0.0.2:6379", "cluster.bucket=gs://b/runs"]


@pytest.mark.parametrize("extra,key", [
    ([], "cluster.project"),
    (["cluster.project=p", "cluster.zone=null"], "cluster.zone"),
    (["cluster.project=p"], "cluster.bucket"),  # no head given: a head VM needs the wheel in the bucket
    (["cluster.project=p", "ray.address=10.0.0.2:6379"], "cluster.bucket"),
    (READY, "credentials"),
    (READY + ["cluster.accelerator_type=v4-33"], "cluster.accelerator_type"),
    (READY + ["mesh.data=3"], "mesh"),
    (READY + ["cluster.hosts=2"], "cluster.hosts"),
    (READY + ["cluster.capacity=cheap"], "cluster.capacity"),
    (READY + ["cluster.num_slices=2", "mesh.dcn=3"], "mesh.dcn"),
])
def test_cloud_bad_input(extra, key, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # no metadata-server credentials either
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    code = main([*BASE, f"run.dir={tmp_path}/r", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: {key}"), err
    assert not os.path.exists(tmp_path / "r")


def test_local_provider_needs_no_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    code = main([*BASE, "cluster.provider=local", "launcher.dry_run=true", f"run.dir={tmp_path}/r"])
    assert code == 0, capsys.readouterr().err
