"""Integration: joining the user's own Ray cluster (`ray.address`) with the token they supply, refused in one line.

The session's test cluster (conftest: `tpu_slice_cluster`) runs with token authentication and the session's
token (RAY_AUTH_TOKEN_PATH); a launch with a wrong or missing token must stop before anything starts.
"""
import os
import subprocess
import sys

import pytest

from podutil import ROOT, TINY, explain, launch

pytestmark = pytest.mark.integration


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_a_refused_token_is_one_line_and_nothing_starts(tpu_slice_cluster, tmp_path, corpus_cache):
    address, slice_name = tpu_slice_cluster
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    run_dir = tmp_path / "refused"
    proc = launch("run.name=refused", f"run.dir={run_dir}", *TINY, "trainer.steps=2", f"ray.address={address}",
                  f"cluster.slice_name={slice_name}", f"ray.auth_token_file={wrong}", timeout=120)
    assert proc.returncode == 2, explain(proc)
    assert _error_lines(proc) == [f"error: ray.address: the Ray cluster at {address} refused the token from "
                                  "ray.auth_token_file (use that cluster's token: set RAY_AUTH_TOKEN_PATH or "
                                  "ray.auth_token_file to its token file)"], explain(proc)
    assert "0" * 64 not in proc.stdout + proc.stderr
    assert not run_dir.exists()  # nothing written, no lock taken


def test_no_token_at_all_is_refused_before_anything_starts(tpu_slice_cluster, tmp_path, corpus_cache):
    address, slice_name = tpu_slice_cluster
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token either
    run_dir = tmp_path / "tokenless"
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-m", "launcher", "run.name=tokenless", f"run.dir={run_dir}", *TINY,
                           "trainer.steps=2", f"ray.address={address}", f"cluster.slice_name={slice_name}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, explain(proc)
    assert len(_error_lines(proc)) == 1 and _error_lines(proc)[0].startswith(
        "error: ray.auth_token_file: no Ray token for the cluster at ray.address"), explain(proc)
    assert not run_dir.exists()


def test_the_users_token_joins(tpu_slice_cluster, tmp_path, corpus_cache):
    """The same cluster with the right token file (the session's, as `ray.auth_token_file`) trains."""
    address, slice_name = tpu_slice_cluster
    run_dir = tmp_path / "joined"
    proc = launch("run.name=joined", f"run.dir={run_dir}", *TINY, "trainer.steps=2", "checkpoint.every=2",
                  f"ray.address={address}", f"cluster.slice_name={slice_name}",
                  f"ray.auth_token_file={os.environ['RAY_AUTH_TOKEN_PATH']}", timeout=240)
    assert proc.returncode == 0, explain(proc)
    assert not (run_dir / "auth" / "ray_token").exists()  # the user's token is used, not one of ours
