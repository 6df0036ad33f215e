"""Dry-run plans for every shipped cluster config, and the pre-flight refusing a step that does not fit."""
import json
import os

import pytest

from launcher.errors import UserError
from launcher.plan import refuse_if_unfit, tpu_compiler_installed
from podutil import ROOT, explain, launch
from tpu_api_server import TpuApiServer

CLUSTERS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "cluster"))
                  if f.endswith(".yaml") and f != "local.yaml")
KEYS = {"accelerator_type", "num_slices", "hosts", "chips_per_host", "devices", "mesh", "params",
        "est_hbm_bytes_per_chip", "hbm_bytes_per_chip", "fits", "preflight", "compile_s", "cost_per_hour_usd",
        "est_step_time_s"}


def test_shipped_clusters_are_the_issue_list():
    assert set(CLUSTERS) >= {"v4-8", "v4-32", "v5litepod-16", "v5p-32", "v6e-16", "v4-32x2"}


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_dry_run_plan(cluster, tmp_path, corpus_cache):
    run_dir = tmp_path / "r"
    proc = launch(f"+cluster={cluster}", "launcher.dry_run=true", "model=tiny", "trainer.batch_size=64",
                  "data.max_bytes=1500000", f"run.dir={run_dir}")
    assert proc.returncode == 0, explain(proc)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert KEYS <= set(plan)
    assert plan["accelerator_type"] in cluster
    assert plan["devices"] == plan["hosts"] * plan["chips_per_host"]
    mesh = plan["mesh"]
    assert plan["devices"] == mesh.get("dcn", 1) * mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    assert mesh.get("dcn", 1) == plan["num_slices"]
    assert plan["preflight"] == ("tpu-compiler" if tpu_compiler_installed() else "analytic")
    assert 0 < plan["est_hbm_bytes_per_chip"] < plan["hbm_bytes_per_chip"] and plan["fits"] is True
    assert plan["cost_per_hour_usd"]["spot"] < plan["cost_per_hour_usd"]["on_demand"]
    assert plan["est_step_time_s"] > 0
    assert plan["model_flops_per_step"] > 0  # trainer/flops.py: 6N x tokens + causal attention
    if plan["preflight"] == "tpu-compiler":  # XLA's cost analysis of the compiled step, and the MFU it implies
        assert plan["compiled_flops_per_step"] > 0 and "compiled step:" in proc.stdout
        if plan["num_slices"] == 1:
            assert plan["implied_step_s"] > 0 and 0 < plan["implied_mfu"] < 1
            assert f"MFU {plan['implied_mfu']:.1%}" in proc.stdout
        else:  # XLA's cost model times no cross-slice collective (optimal_seconds < 0): no step time, no MFU
            assert plan["implied_step_s"] is None and plan["implied_mfu"] is None
            assert "XLA cost model: no step time" in proc.stdout
    assert os.listdir(run_dir) == ["plan.json"]  # nothing else written, nothing created


@pytest.mark.skipif(not tpu_compiler_installed(), reason="needs the tpu extra (CI installs it)")
def test_preflight_refuses_unfit_model_before_provisioning(tmp_path, corpus_cache):
    with TpuApiServer() as server:
        proc = launch("+cluster=v5litepod-16", "cluster.project=p", f"cluster.tpu_api_endpoint={server.url}",
                      "ray.address=127.0.0.1:1", "model=base", "model.d_model=4096", "model.n_heads=32",
                      "model.d_ff=16384", "model.n_layers=8", "data.max_bytes=1500000", f"run.dir={tmp_path}/r")
        assert proc.returncode == 2, explain(proc)
        line = proc.stderr.strip().splitlines()
        assert len(line) == 1 and line[0].startswith("error: model:") and "GiB per chip" in line[0]
        assert "opt_state" in line[0]  # names the largest buffers
        assert server.requests == []  # nothing provisioned
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not tpu_compiler_installed(), reason="needs the tpu extra (CI installs it)")
def test_dry_run_of_unfit_plan_writes_it_then_exits_2_with_the_launch_error(tmp_path, corpus_cache):
    # tiny's two MLPs widened to 1.07B parameters: 17 GiB a v5e chip, compiled as fast as tiny itself
    run_dir = tmp_path / "r"
    proc = launch("+cluster=v5litepod-16", "launcher.dry_run=true", "model=tiny", "model.d_ff=4194304",
                  "data.max_bytes=1500000", f"run.dir={run_dir}")
    assert proc.returncode == 2, explain(proc)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["fits"] is False and plan["preflight"] == "tpu-compiler"
    assert "DOES NOT FIT" in proc.stdout and f"plan in {run_dir}/plan.json" in proc.stdout  # printed, then refused
    with pytest.raises(UserError) as refused:  # what a real launch of this plan stops with
        refuse_if_unfit(plan)
    assert proc.stderr.strip().splitlines() == [f"error: {refused.value}"]
    assert os.listdir(run_dir) == ["plan.json"]  # nothing else written, nothing created
