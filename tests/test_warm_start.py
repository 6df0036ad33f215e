"""Warm starts (checkpoint.init_from): a fine-tune of the session's trained run on other data and another mesh
starts from its loss with a fresh optimizer at step 0; typed again it resumes from its own checkpoint and says it
ignores init_from; a missing path or a model of other shapes is one line, exit 2, before anything starts (and the
trainer refuses a mismatch the same way when a config reaches it unchecked). trained_run is only read."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from launcher.config import compose_config, to_yaml
from launcher.hosts import coordinator_port
from launcher.validate import validate
from podutil import ROOT, TINY, explain, launch, read_json, read_jsonl
from trainer.model import ModelSpec
from trainer.warmstart import WarmStartError, check_shapes, locate

MISMATCH = "parameter block_0/attn/key/kernel has shape [64, 4, 16] in the checkpoint"


def _tree_digest(root: str) -> str:
    """Every file under root with its size, mtime and content: proof that init_from only read it."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, root)} {st.st_size} {st.st_mtime_ns}\n".encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _train_losses(run_dir: str):
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "split" not in r]


def _one_error_line(proc, fragment: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, explain(proc)
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint.init_from: "), explain(proc)
    assert fragment in lines[0] and lines[0].endswith(")"), lines[0]
    return lines[0]


def test_locate_takes_a_run_dir_its_checkpoints_dir_or_a_step_dir(trained_run):
    ckpts = os.path.join(trained_run, "checkpoints")
    assert locate(trained_run) == (ckpts, 12)
    assert locate(ckpts + "/") == (ckpts, 12)
    assert locate(os.path.join(ckpts, "8")) == (ckpts, 8)
    for bad, why in ((os.path.join(ckpts, "9"), "does not exist"), (os.path.join(trained_run, "logs"),
                                                                     "holds no finished checkpoint")):
        with pytest.raises(WarmStartError) as info:
            locate(bad)
        assert why in info.value.problem and bad in info.value.problem
    spec = ModelSpec(vocab_size=384, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=256)
    check_shapes(ckpts, 12, spec, 64)  # the trained run's own model fits
    with pytest.raises(WarmStartError) as info:
        check_shapes(ckpts, 12, ModelSpec(**{**spec.__dict__, "n_layers": 3}), 64)
    assert "parameter block_2/attn/key/kernel [64, 4, 16] of this model is not in the checkpoint" in info.value.problem


def test_missing_or_empty_path_is_one_line_before_anything_starts(tmp_path, trained_run, corpus_cache):
    run_dir = tmp_path / "r"
    missing = tmp_path / "nothing-here"
    proc = launch(f"run.dir={run_dir}", *TINY, f"checkpoint.init_from={missing}", timeout=120)
    line = _one_error_line(proc, f"{missing} does not exist")
    assert "point it at a run directory, its checkpoints directory or one step directory" in line
    proc = launch(f"run.dir={run_dir}", *TINY, f"checkpoint.init_from={trained_run}/logs", timeout=120)
    _one_error_line(proc, "holds no finished checkpoint")
    assert not run_dir.exists() and "Traceback" not in proc.stdout + proc.stderr


def test_shape_mismatch_is_one_line_naming_the_parameter_before_anything_starts(tmp_path, trained_run,
                                                                              corpus_cache):
    run_dir = tmp_path / "r"
    proc = launch(f"run.dir={run_dir}", *TINY, "model.d_model=32", f"checkpoint.init_from={trained_run}",
                  timeout=120)
    line = _one_error_line(proc, f"{MISMATCH} {trained_run}/checkpoints/12 but [32, 4, 8] in this model")
    assert "use the model config of the run it comes from" in line
    assert not run_dir.exists()


def test_the_trainer_refuses_a_mismatch_it_is_handed_with_exit_2(tmp_path, trained_run, corpus_cache):
    """A config that reaches the trainer unchecked (written by hand, or a source changed after validation): the
    trainer's user-error path, one line in its log, exit 2, no step trained."""
    run_dir = tmp_path / "run"
    cfg = compose_config([f"run.dir={run_dir}", *TINY, "model.d_model=32", "cluster.hosts=1",
                          "cluster.devices_per_host=1"])
    validate(cfg)
    cfg.checkpoint.init_from = trained_run
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "trainer.main", "--config", str(run_dir / "config.yaml"),
                           "--process-id", "0", "--num-processes", "1", "--coordinator",
                           f"127.0.0.1:{coordinator_port()}", "--devices", "1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and MISMATCH in errors[0] and "[32, 4, 8] in this model" in errors[0], proc.stdout
    beat = json.loads((run_dir / "hosts" / "host-0.json").read_text())
    assert beat["exit"] == {"code": 2, "reason": "user_error"}
    assert not (run_dir / "metrics.jsonl").exists() and not os.listdir(run_dir / "checkpoints")


def test_fine_tune_starts_from_the_trained_loss_then_resumes_from_its_own_checkpoint(tmp_path, trained_run):
    before = _tree_digest(trained_run)
    trained = _train_losses(trained_run)
    scratch_loss, trained_loss = trained[0]["loss"], read_json(os.path.join(trained_run, "summary.json"))["final_loss"]
    # from scratch: about ln(vocab) or above; 12 steps later well below it
    assert trained[0]["step"] == 1 and scratch_loss > math.log(384) - 0.5 > trained_loss + 1.5, trained

    run_dir = str(tmp_path / "ft")
    # Other data (a smaller corpus), another seed, and another pod: 1 host x 2 devices, parameters fsdp-sharded
    # (the trained run had 2 hosts x 2 devices, data-parallel).
    overrides = ["run.name=ft", f"run.dir={run_dir}", *TINY, "data.max_bytes=1000000", "trainer.seed=5",
                 "cluster.hosts=1", "cluster.devices_per_host=2", "mesh.data=1", "mesh.fsdp=2",
                 "optimizer.warmup_steps=2", f"checkpoint.init_from={trained_run}"]
    proc = launch(*overrides, "trainer.steps=4")
    assert proc.returncode == 0, explain(proc)
    step_dir = os.path.join(trained_run, "checkpoints", "12")
    assert f"[host 0] warm start: parameters of {trained_run}/checkpoints step 12" in proc.stdout
    losses = _train_losses(run_dir)
    first = losses[0]
    # step 0 of this run's schedule (warmup from lr 0), and the trained run's loss rather than ln(vocab)
    assert first["step"] == 1 and first["lr"] == 0.0, first
    assert abs(first["loss"] - trained_loss) < 0.5 and first["loss"] < scratch_loss - 1.5, (first, trained_loss)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["final_step"] == 4 and summary["resumed_from_step"] is None
    assert summary["init_from"] == {"path": step_dir, "checkpoint_dir": os.path.join(trained_run, "checkpoints"),
                                    "step": 12}
    assert summary["mesh"]["fsdp"] == 2 and summary["hosts"] == 1
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    starts = [e for e in events if e["event"] == "init_from"]
    assert len(starts) == 1 and starts[0]["step"] == 12 and starts[0]["host"] == 0, starts
    assert read_json(os.path.join(run_dir, "result.json"))["checkpoints"] == [4]  # its own, from its step 0
    # the launcher pinned the run dir to the step it found, so every host and attempt starts from that one
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert yaml.safe_load(f)["checkpoint"]["init_from"] == step_dir

    # Typed again with more steps: it resumes from its own checkpoint and says it ignores init_from.
    proc = launch(*overrides, "trainer.steps=6")
    assert proc.returncode == 0, explain(proc)
    said = [line for line in proc.stdout.splitlines() if "init_from" in line]
    assert said == [f"[host 0] checkpoint.init_from={trained_run} ignored: this run resumes from its own "
                    f"checkpoint step 4"], proc.stdout
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["resumed_from_step"] == 4 and summary["final_step"] == 6
    assert summary["init_from"]["step"] == 12  # where its parameters came from, still
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    assert [e["event"] for e in events].count("init_from") == 1
    ignored = [e for e in events if e["event"] == "init_from_ignored"]
    assert len(ignored) == 1 and ignored[0]["resumed_from_step"] == 4 and ignored[0]["path"] == trained_run
    assert _tree_digest(trained_run) == before  # only read


def test_warm_start_from_a_gs_path(tmp_path, trained_run, gcs_emulator, corpus_cache):
    """init_from=gs://... (what a cloud run needs: its VMs cannot read this machine): the trained run's checkpoint
    copied to a bucket (the GCS emulator, real clients) is located, shape-checked (a mismatch is one line, exit 2,
    before anything starts), pinned to its step and restored by the trainer, which starts from the trained loss."""
    from gcs_emulator import upload_tree

    ckpts = f"gs://{gcs_emulator.bucket}/warm/checkpoints"
    assert upload_tree(os.path.join(trained_run, "checkpoints", "12"), f"{ckpts}/12") > 0
    run_dir = tmp_path / "gs-ft"
    proc = launch(f"run.dir={run_dir}", *TINY, "model.d_model=32", f"checkpoint.init_from={ckpts}", timeout=120)
    _one_error_line(proc, f"{MISMATCH} {ckpts}/12 but [32, 4, 8] in this model")
    assert not run_dir.exists()

    trained_loss = read_json(os.path.join(trained_run, "summary.json"))["final_loss"]
    scratch_loss = _train_losses(trained_run)[0]["loss"]
    proc = launch("run.name=gs-ft", f"run.dir={run_dir}", *TINY, "cluster.hosts=1", "cluster.devices_per_host=1",
                  "trainer.steps=2", "optimizer.warmup_steps=1", f"checkpoint.init_from={ckpts}")
    assert proc.returncode == 0, explain(proc)
    assert f"[host 0] warm start: parameters of {ckpts} step 12" in proc.stdout
    first = _train_losses(str(run_dir))[0]
    assert first["step"] == 1 and first["lr"] == 0.0, first
    assert abs(first["loss"] - trained_loss) < 0.5 and first["loss"] < scratch_loss - 1.5, (first, trained_loss)
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["final_step"] == 2
    assert summary["init_from"] == {"path": f"{ckpts}/12", "checkpoint_dir": ckpts, "step": 12}
    with open(run_dir / "config.yaml") as f:
        assert yaml.safe_load(f)["checkpoint"]["init_from"] == f"{ckpts}/12"
