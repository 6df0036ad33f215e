"""Integration: the real CLI on a real local Ray cluster of 2 hosts x 2 CPU devices (jax.distributed + gloo).

Covers train, evaluate, checkpoint, the run-directory contract, exact resume, and fallback to an older
checkpoint when the newest one cannot be read.
"""
import os

import pytest

from podutil import TINY, explain, launch, read_json, read_jsonl

pytestmark = pytest.mark.integration

STEPS = ["trainer.steps=12", "optimizer.decay_steps=12", "optimizer.warmup_steps=3", "checkpoint.every=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_cache):
    """An uninterrupted 12-step run on the launcher's own Ray cluster (the default path)."""
    run_dir = str(tmp_path_factory.mktemp("runs") / "ref")
    proc = launch("run.name=ref", f"run.dir={run_dir}", *TINY, *STEPS)
    assert proc.returncode == 0, explain(proc)
    return run_dir, proc


def test_run_directory_contract(reference):
    run_dir, proc = reference
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed"
    assert summary["final_step"] == 12 and summary["hosts"] == 2
    assert summary["restarts"] == {"total": 0} and summary["lost_steps"] == 0 and summary["attempts"] == 1
    assert 0 < summary["goodput"] < 1 and summary["badput"]["wasted_progress"] == 0
    for host in (0, 1):  # each host's last heartbeat: its pid, its step, and why it exited
        beat = read_json(os.path.join(run_dir, "hosts", f"host-{host}.json"))
        assert beat["step"] == 12 and beat["exit"] == {"code": 0, "reason": "done"} and beat["pid"] > 0
    assert summary["resumed_from_step"] is None
    assert len(summary["params_digest"]) == 64 and int(summary["params_digest"], 16) >= 0
    assert summary["wall_s"] > 0 and summary["final_loss"] > 0
    assert {"eval_loss", "eval_ppl", "eval_acc"} <= set(summary["eval"]) and summary["eval"]["split"] == "test"
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 4, 6, 8, 10, 12]
    for m in steps:
        assert {"step", "loss", "lr", "tokens_per_s", "step_time_s", "time"} <= set(m)
    evals = [m for m in metrics if "split" in m]
    assert [(m["split"], m["step"]) for m in evals] == [("val", 4), ("val", 8), ("test", 12), ("val", 12)]
    for m in evals:
        assert {"eval_loss", "eval_ppl", "eval_acc"} <= set(m)
    assert steps[-1]["loss"] < steps[0]["loss"], "training did not reduce the loss"
    assert summary["eval"]["eval_loss"] < steps[0]["loss"]
    # Both hosts logged; host 0's progress lines reached the launcher's terminal.
    for host in (0, 1):
        assert os.path.getsize(os.path.join(run_dir, "logs", f"host-{host}.log")) > 0
    assert "[host 0] step 12/12" in proc.stdout
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["12", "4", "8"]
    config = open(os.path.join(run_dir, "config.yaml")).read()
    assert "${" not in config and "steps: 12" in config
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    kinds = {(e["event"], e["host"]) for e in events}
    assert {("command_start", "launcher"), ("first_step", 0), ("first_step", 1), ("save_start", 0)} <= kinds


def _on_shared_slice(name, run_dir, tpu_slice_cluster, *extra):
    """Overrides for a launch that attaches to the session's shared 2-host slice (ray.address)."""
    address, slice_name = tpu_slice_cluster
    return [f"run.name={name}", f"run.dir={run_dir}", f"ray.address={address}",
            f"cluster.slice_name={slice_name}", *TINY, *extra]


def test_exact_resume_matches_uninterrupted(reference, tmp_path, tpu_slice_cluster):
    """Stop at step 8, resume to 12: parameters bit-identical to the uninterrupted run."""
    ref_dir, _ = reference
    run_dir = str(tmp_path / "split")
    common = _on_shared_slice("split", run_dir, tpu_slice_cluster, *STEPS[1:])
    first = launch(*common, "trainer.steps=8")
    assert first.returncode == 0, explain(first)
    assert read_json(os.path.join(run_dir, "summary.json"))["final_step"] == 8
    second = launch(*common, "trainer.steps=12")
    assert second.returncode == 0, explain(second)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["resumed_from_step"] == 8
    assert summary["final_step"] == 12
    assert summary["params_digest"] == read_json(os.path.join(ref_dir, "summary.json"))["params_digest"]


def _corrupt(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")


def test_fallback_to_older_checkpoint(reference, tmp_path, tpu_slice_cluster):
    ref_dir, _ = reference
    run_dir = str(tmp_path / "fallback")
    common = _on_shared_slice("fallback", run_dir, tpu_slice_cluster, *STEPS[1:])
    first = launch(*common, "trainer.steps=8")
    assert first.returncode == 0, explain(first)
    _corrupt(os.path.join(run_dir, "checkpoints", "8"))
    second = launch(*common, "trainer.steps=12")
    assert second.returncode == 0, explain(second)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["resumed_from_step"] == 4
    log = open(os.path.join(run_dir, "logs", "host-0.log")).read()
    assert "checkpoint step 8" in log and "could not be read" in log
    # The unreadable checkpoint was kept (moved aside), not deleted; the run still ends exactly.
    aside = os.listdir(os.path.join(run_dir, "checkpoints.unreadable"))
    assert len(aside) == 1 and aside[0].startswith("8-")
    assert summary["params_digest"] == read_json(os.path.join(ref_dir, "summary.json"))["params_digest"]


def test_no_readable_checkpoint_fails_loudly(tmp_path, tpu_slice_cluster, corpus_cache):
    run_dir = str(tmp_path / "broken")
    common = _on_shared_slice("broken", run_dir, tpu_slice_cluster, "checkpoint.every=2")
    first = launch(*common, "trainer.steps=4")
    assert first.returncode == 0, explain(first)
    for step in ("2", "4"):
        _corrupt(os.path.join(run_dir, "checkpoints", step))
    second = launch(*common, "trainer.steps=6")
    assert second.returncode == 2, explain(second)
    assert "none of the checkpoints" in second.stderr + open(os.path.join(run_dir, "logs", "host-0.log")).read()
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4"]  # nothing deleted
    assert read_json(os.path.join(run_dir, "summary.json"))["status"] == "failed"
