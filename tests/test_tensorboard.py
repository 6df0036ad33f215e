"""TensorBoard: host 0's event files hold the values of metrics.jsonl and the launcher's goodput; a resumed
attempt's file hides what earlier ones logged past its checkpoint; cloud hosts' event files are synced back whole."""
import os
import shutil

import pytest

from launcher.runsync import apply_chunks, is_event_file, list_event_files, read_new
from podutil import TINY, explain, launch, read_json, read_jsonl
from trainer.tensorboard import PERF_TAGS, TRAIN_TAGS, EventWriter, event_files, read_records, read_scalars

REL = 1e-6  # TensorBoard scalars are float32


def _at(points, step):
    values = [v for s, v in points if s == step]
    assert len(values) == 1, (step, points)  # one value per step
    return values[0]


def _check_against_metrics(run_dir):
    """Every logged scalar of metrics.jsonl is in the event files at its step (the latest record of a step wins:
    an earlier attempt's steps past the checkpoint are purged), and nothing else is."""
    scalars = read_scalars(run_dir)
    latest = {}
    for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        latest[(r.get("split"), r["step"])] = r
    expected = {}
    for (split, step), r in latest.items():
        if split is not None:
            for key, name in (("eval_loss", "loss"), ("eval_ppl", "ppl"), ("eval_acc", "acc")):
                expected.setdefault(f"eval/{split}/{name}", {})[step] = r[key]
            continue
        tags = TRAIN_TAGS if r.get("includes_compile") else {**TRAIN_TAGS, **PERF_TAGS}
        for key, tag in tags.items():
            expected.setdefault(tag, {})[step] = r[key]
    for tag, by_step in expected.items():
        assert sorted(s for s, _ in scalars[tag]) == sorted(by_step), tag
        for step, value in by_step.items():
            assert _at(scalars[tag], step) == pytest.approx(value, rel=REL), (tag, step)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    final = summary["final_step"]
    assert _at(scalars["goodput/goodput"], final) == pytest.approx(summary["goodput"], rel=REL)
    for bucket, seconds in summary["badput"].items():
        assert _at(scalars[f"goodput/badput_{bucket}_s"], final) == pytest.approx(seconds, rel=REL, abs=1e-6)
    assert set(scalars) == set(expected) | {"goodput/goodput"} | {f"goodput/badput_{b}_s" for b in summary["badput"]}
    return scalars


def test_trained_runs_event_files_hold_its_metrics(trained_run):
    scalars = _check_against_metrics(trained_run)
    assert {"train/loss", "perf/mfu", "perf/tokens_per_s", "eval/val/loss", "eval/test/acc"} <= set(scalars)
    names = [os.path.basename(p) for p in event_files(trained_run)]
    # host 0's file and the launcher's, nobody else's
    assert len(names) == 2 and sum(".host0." in n for n in names) == 1 and sum(".launcher." in n for n in names) == 1


def test_a_resumed_attempt_hides_the_steps_it_runs_again(tmp_path):
    first = EventWriter(str(tmp_path), "host0", purge_from=1)
    for step in range(1, 9):  # ran to step 8; its last checkpoint was at 4
        first.scalars(step, {"train/loss": 10.0 - step})
    first.close()
    second = EventWriter(str(tmp_path), "host0", purge_from=5)
    for step in range(5, 11):
        second.scalars(step, {"train/loss": 100.0 + step})
    second.close()
    files = event_files(str(tmp_path))
    assert len(files) == 2  # appended, not clobbered (same second, same process: a sequence number tells them apart)
    assert read_scalars(str(tmp_path))["train/loss"] == [(s, 10.0 - s) for s in range(1, 5)] + \
        [(s, 100.0 + s) for s in range(5, 11)]


def test_host_event_files_sync_by_whole_records(tmp_path):
    """The cloud layout's sync of tb/: only event-file names are accepted, and a file being written is copied up
    to its last whole record, the rest on the next pull, so the copy ends byte-identical."""
    host, run = tmp_path / "host", tmp_path / "run"
    run.mkdir()
    writer = EventWriter(str(host), "host0", purge_from=1)
    for step in range(1, 6):
        writer.scalars(step, {"train/loss": float(step)})
    writer.close()
    [name] = list_event_files(str(host))
    assert is_event_file(name)
    for evil in ("tb/../config.yaml", "tb/events.out.tfevents.1/../../x", "tb/notes.txt", "events.out.tfevents.1",
                 "tb/sub/events.out.tfevents.1", "tb/events.out.tfevents.1 x", None):
        assert not is_event_file(evil)
    full = (host / name).read_bytes()
    (host / name).write_bytes(full[:-7])  # the writer died (or is) in the middle of its last record
    offsets = {name: 0}
    offsets.update(apply_chunks(str(run), 0, offsets, read_new(str(host), offsets)))
    copied = (run / name).read_bytes()
    assert 0 < len(copied) < len(full) - 7 and full.startswith(copied)
    assert len(list(read_records(str(run / name)))) == 6  # file version, START, steps 1-4: all whole
    (host / name).write_bytes(full)
    offsets.update(apply_chunks(str(run), 0, offsets, read_new(str(host), offsets)))
    assert (run / name).read_bytes() == full and offsets[name] == len(full)
    assert read_scalars(str(run))["train/loss"] == [(s, float(s)) for s in range(1, 6)]


@pytest.mark.integration
def test_cloud_layout_syncs_event_files_across_launches(tmp_path, corpus_cache):
    """Host-local run dirs (as on TPU VMs), two launches (the second resumes from the first's last step): every
    event file of host 0 comes back byte-identical, and the curves hold each logged step once."""
    run_dir, disks = str(tmp_path / "run"), tmp_path / "vm-disks"
    args = ["run.name=tbsync", f"run.dir={run_dir}", *TINY, "cluster.shared_run_dir=false",
            f"cluster.host_run_root={disks}", "optimizer.warmup_steps=2", "optimizer.decay_steps=10",
            "checkpoint.every=4"]
    for steps in (6, 10):
        proc = launch(*args, f"trainer.steps={steps}")
        assert proc.returncode == 0, explain(proc)
    host0 = str(disks / "tbsync" / "host-0")
    names = list_event_files(host0)
    assert len(names) == 2  # one per launch's attempt
    for name in names:
        with open(os.path.join(host0, name), "rb") as a, open(os.path.join(run_dir, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not list_event_files(str(disks / "tbsync" / "host-1"))  # host 0 only
    scalars = _check_against_metrics(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 4, 6, 7, 8, 10]
    assert len(event_files(run_dir)) == 4  # two trainer files, two launcher files
    shutil.rmtree(disks)
