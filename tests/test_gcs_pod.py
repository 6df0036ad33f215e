"""Integration: data streamed from and checkpoints written to gs:// (real clients against a local GCS emulator)."""
import os

import pytest
from google.cloud import storage

from podutil import TINY, explain, launch, read_json

pytestmark = pytest.mark.integration


def test_train_and_resume_on_gcs(gcs_emulator, corpus_cache, tmp_path):
    from trainer.data.corpus import prepare_stdlib

    data = f"gs://{gcs_emulator.bucket}/shards/stdlib"
    prepare_stdlib(data, max_bytes=1_500_000)
    ckpt = f"gs://{gcs_emulator.bucket}/runs/gcs/checkpoints"
    run_dir = str(tmp_path / "gcs")
    common = ["run.name=gcs", f"run.dir={run_dir}", *TINY, "data=shards", f"data.path={data}",
              f"checkpoint.dir={ckpt}", "checkpoint.ocdbt=false", "checkpoint.every=3", "optimizer.decay_steps=9"]
    first = launch(*common, "trainer.steps=6")
    assert first.returncode == 0, explain(first)
    client = storage.Client(project="test")
    names = {b.name for b in client.list_blobs(gcs_emulator.bucket, prefix="runs/gcs/checkpoints/")}
    steps = {n.split("/")[3] for n in names}
    assert {"3", "6"} <= steps, sorted(names)[:20]
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))  # nothing written locally
    second = launch(*common, "trainer.steps=9")
    assert second.returncode == 0, explain(second)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["final_step"] == 9
    assert summary["resumed_from_step"] == 6
    assert summary["eval"]["eval_loss"] < 5.0
