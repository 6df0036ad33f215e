"""`tpu-launch eval`: a 2-host run's logged evals reproduced in one process (1 or 4 devices), and its bad inputs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from podutil import ROOT, read_json, read_jsonl


def _eval(run_dir, *args, devices=1):
    """`tpu-launch eval` in a process with `devices` CPU devices. XLA_FLAGS is always set: test modules set it in
    this pytest process at import, and a subprocess that inherited it would not run on the devices meant here."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", "eval", run_dir, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """trained_run copied (eval writes eval/ into the run); its config still names the original checkpoints."""
    dst = str(tmp_path / "trained")
    shutil.copytree(trained_run, dst)
    return dst


def _logged(run_dir, split, step):
    return next(r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                if r.get("split") == split and r["step"] == step)


@pytest.mark.parametrize("devices", [1, 4])
def test_reproduces_the_runs_test_loss_and_writes_the_result(run_copy, devices):
    logged = read_json(os.path.join(run_copy, "summary.json"))["eval"]
    proc = _eval(run_copy, devices=devices)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = read_json(os.path.join(run_copy, "eval", "12-test.json"))
    assert abs(written["eval_loss"] - logged["eval_loss"]) < 1e-5
    assert abs(written["eval_acc"] - logged["eval_acc"]) < 1e-6
    assert written["eval_tokens"] == logged["eval_tokens"]
    assert written["eval_acc"] <= written["eval_top5_acc"] <= 1.0
    assert written["devices"] == devices
    assert written["step"] == 12 and written["split"] == "test" and written["batches"] == 2
    assert f"eval test step 12 | loss {written['eval_loss']:.4f}" in proc.stdout


def test_val_split_of_an_older_step(run_copy):
    proc = _eval(run_copy, "--split", "val", "--step", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = read_json(os.path.join(run_copy, "eval", "4-val.json"))
    assert abs(written["eval_loss"] - _logged(run_copy, "val", 4)["eval_loss"]) < 1e-5
    assert os.listdir(os.path.join(run_copy, "eval")) == ["4-val.json"]


def test_all_batches_covers_more_of_the_split(run_copy):
    proc = _eval(run_copy, "--split", "val", "--batches", "all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = read_json(os.path.join(run_copy, "eval", "12-val.json"))
    assert written["batches"] == "all" and written["eval_tokens"] > _logged(run_copy, "val", 12)["eval_tokens"]


def _data_copy(run_dir, tmp_path, **manifest_changes):
    src = str(OmegaConf.load(os.path.join(run_dir, "config.yaml")).data.path)
    dst = str(tmp_path / "data")
    shutil.copytree(src, dst)
    path = os.path.join(dst, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(manifest_changes)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return dst


def test_data_of_the_same_tokenizer(run_copy, tmp_path):
    proc = _eval(run_copy, "--data", _data_copy(run_copy, tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = read_json(os.path.join(run_copy, "eval", "12-test.json"))
    assert abs(written["eval_loss"] - read_json(os.path.join(run_copy, "summary.json"))["eval"]["eval_loss"]) < 1e-5


def test_data_on_gcs(run_copy, gcs_emulator):
    """--data gs://...: the run's own data copied to a bucket (the GCS emulator, real clients) gives the run's test
    loss again."""
    from gcs_emulator import upload_tree

    url = f"gs://{gcs_emulator.bucket}/eval-data"
    assert upload_tree(str(OmegaConf.load(os.path.join(run_copy, "config.yaml")).data.path), url) > 1
    proc = _eval(run_copy, "--data", url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = read_json(os.path.join(run_copy, "eval", "12-test.json"))
    logged = read_json(os.path.join(run_copy, "summary.json"))["eval"]
    assert written["data"] == url
    assert abs(written["eval_loss"] - logged["eval_loss"]) < 1e-5 and written["eval_tokens"] == logged["eval_tokens"]


def _no_checkpoints(run_dir, tmp_path):
    cfg = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
    cfg.checkpoint.dir = str(tmp_path / "empty-checkpoints")
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"))
    return []


BAD = [
    ("no checkpoint", _no_checkpoints, [], "RUN: no finished checkpoint in"),
    ("step not saved", None, ["--step", "5"], "--step: step 5 is not saved in"),
    ("batches zero", None, ["--batches", "0"], "--batches: must be a positive integer or 'all', got '0'"),
    ("batches word", None, ["--batches", "some"], "--batches: must be a positive integer or 'all', got 'some'"),
    ("other tokenizer", lambda r, t: ["--data", _data_copy(r, t, tokenizer="sentencepiece")], [],
     "--data: "),
    ("missing data", lambda r, t: ["--data", str(t / "nowhere")], [], "--data: dataset path does not exist"),
]


@pytest.mark.parametrize("name,prepare,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(run_copy, tmp_path, name, prepare, args, message):
    extra = prepare(run_copy, tmp_path) if prepare else []
    proc = _eval(run_copy, *args, *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    if name == "other tokenizer":  # names both tokenizers
        assert "'sentencepiece'" in errors[0] and "'bytes'" in errors[0]
    assert not os.path.exists(os.path.join(run_copy, "eval"))
