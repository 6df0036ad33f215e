"""Integration: a two-slice local pod (2 slices x 2 hosts x 1 device): dcn mesh axis and fresh MEGASCALE vars."""
import os

import pytest

from podutil import TINY, explain, launch, read_json, read_jsonl

pytestmark = pytest.mark.integration


def test_two_slices_train_with_dcn_axis(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "ms")
    # Stale multislice variables in the environment (as after a preemption) must be replaced, not inherited.
    stale = {"MEGASCALE_SLICE_ID": "7", "MEGASCALE_NUM_SLICES": "9", "MEGASCALE_COORDINATOR_ADDRESS": "10.9.9.9"}
    proc = launch("run.name=ms", f"run.dir={run_dir}", *TINY, "cluster.num_slices=2", "cluster.hosts=2",
                  "cluster.devices_per_host=1", "trainer.steps=4", "checkpoint.every=4", env=stale)
    assert proc.returncode == 0, explain(proc)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["hosts"] == 4 and summary["num_slices"] == 2
    assert summary["mesh"] == {"dcn": 2, "data": 2, "fsdp": 1, "tensor": 1}
    starts = {e["host"]: e for e in read_jsonl(os.path.join(run_dir, "events.jsonl"))
              if e["event"] == "process_start"}
    placed = next(e for e in read_jsonl(os.path.join(run_dir, "events.jsonl")) if e["event"] == "hosts_placed")
    assert [h["slice"] for h in placed["hosts"]] == [0, 0, 1, 1]
    assert [h["worker_id"] for h in placed["hosts"]] == [0, 1, 0, 1]
    for host, slice_id in ((0, "0"), (1, "0"), (2, "1"), (3, "1")):
        ms = starts[host]["megascale"]
        assert ms["MEGASCALE_SLICE_ID"] == slice_id and ms["MEGASCALE_NUM_SLICES"] == "2"
        assert ms["MEGASCALE_COORDINATOR_ADDRESS"] == placed["hosts"][0]["ip"]
