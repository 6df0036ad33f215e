"""Tests for the run's report (launcher/report.py, `tpu-launch report`): the curves and restart markers taken from
a hand-written run directory with a crash and a dead supervisor, the report.png every run ends with (the shared
`trained_run`), drawn again by the command, and a report that cannot be written costing one warning line."""
import os
import shutil

import numpy as np
import pytest
from matplotlib import image

from launcher import report
from podutil import tpu_launch as _cli
from trainer import runfiles

T0 = 1_800_000_000.0


def _pixels_near(png: str, color: str, region=None, tol: int = 30) -> int:
    """How many pixels of `png` (in `region`: "loss", the upper left panel, or "throughput", the upper right) are
    within `tol` (summed over R, G, B) of `color`."""
    rgb = (image.imread(png)[..., :3] * 255).round().astype(int)
    h, w, _ = rgb.shape
    rgb = {"loss": rgb[: h // 2, : w // 2], "throughput": rgb[: h // 2, w // 2:], None: rgb}[region]
    want = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).sum(axis=-1) <= tol).sum())


def _step(step, t, loss, **extra):
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "step_time_s": 0.1, "tokens_per_s": 9000.0 + step,
            "time": t, "data_wait_s": 0.001, **extra}


def _restarted_run(tmp_path) -> str:
    """Attempt 0 crashes at step 14 and attempt 1 resumes from 10; attempt 1's supervisor dies at step 20 and the
    command typed again resumes attempt 2 from 16, which completes at 30."""
    run = str(tmp_path / "restarted")
    metrics, ledger = runfiles.path(run, runfiles.METRICS), runfiles.path(run, runfiles.GOODPUT)
    recs = [_step(1, T0 + 5, 6.5, includes_compile=True)] + [_step(s, T0 + 5 + s, 6.5 - s / 10) for s in (2, 4, 6, 8,
                                                                                                     10, 12, 14)]
    recs += [{"split": "val", "step": 8, "eval_loss": 5.9, "eval_ppl": 365.0, "eval_acc": 0.1, "time": T0 + 13.5}]
    recs += [_step(11, T0 + 30, 5.5, includes_compile=True)] + [_step(s, T0 + 20 + s, 6.0 - s / 10)
                                                              for s in (12, 14, 16, 18, 20)]
    recs += [_step(17, T0 + 100, 4.5, includes_compile=True)] + [_step(s, T0 + 85 + s, 5.0 - s / 20)
                                                               for s in range(18, 31, 2)]
    recs += [{"split": "val", "step": 24, "eval_loss": 4.2, "eval_ppl": 66.0, "eval_acc": 0.2, "time": T0 + 110},
             {"split": "test", "step": 30, "eval_loss": 3.9, "eval_ppl": 49.4, "eval_acc": 0.25, "time": T0 + 116},
             {"split": "val", "step": 30, "eval_loss": 4.0, "eval_ppl": 54.6, "eval_acc": 0.24, "time": T0 + 116.5}]
    for r in recs:
        runfiles.append_jsonl(metrics, r)
    for r in [{"kind": "launch", "time": T0},
              {"kind": "attempt_start", "attempt": 0, "time": T0 + 1},
              {"kind": "start_step", "attempt": 0, "step": 0, "time": T0 + 3},
              {"kind": "startup", "attempt": 0, "seconds": 2.0, "step": 1, "time": T0 + 5},
              {"kind": "steps", "attempt": 0, "from": 1, "to": 14, "seconds": 13.0, "data_wait_s": 0.1, "time": T0 + 19},
              {"kind": "failure", "attempt": 0, "cause": "crash", "last_step": 14, "time": T0 + 20},
              {"kind": "recovery", "attempt": 0, "seconds": 5.0, "time": T0 + 25},
              {"kind": "attempt_start", "attempt": 1, "time": T0 + 25},
              {"kind": "start_step", "attempt": 1, "step": 10, "time": T0 + 27},
              {"kind": "steps", "attempt": 1, "from": 11, "to": 20, "seconds": 9.0, "data_wait_s": 0.1, "time": T0 + 40},
              {"kind": "launch", "time": T0 + 90},
              {"kind": "attempt_start", "attempt": 2, "time": T0 + 91},
              {"kind": "start_step", "attempt": 2, "step": 16, "time": T0 + 95},
              {"kind": "steps", "attempt": 2, "from": 17, "to": 30, "seconds": 14.0, "data_wait_s": 0.1,
               "time": T0 + 115},
              {"kind": "end", "attempt": 2, "step": 30, "time": T0 + 117},
              {"kind": "launch_end", "status": "completed", "time": T0 + 118}]:
        runfiles.append_jsonl(ledger, r)
    runfiles.write_atomic(runfiles.path(run, runfiles.CONFIG), "run:\n  name: restarted\ntrainer:\n  steps: 30\n")
    runfiles.write_json(runfiles.path(run, runfiles.SUMMARY), {
        "status": "completed", "run": "restarted", "final_step": 30, "final_loss": 3.5, "wall_s": 28.0,
        "launches": 2, "eval": recs[-2], "val": recs[-1], "mfu": 0.31})
    return run


def test_curves_and_restart_markers_from_the_records(tmp_path):
    data = report.collect(_restarted_run(tmp_path))
    # one train curve per attempt: the step went back twice
    assert [[r["step"] for r in seg][:2] for seg in data.train] == [[1, 2], [11, 12], [17, 18]]
    assert {k: [r["step"] for r in v] for k, v in data.evals.items()} == {"val": [8, 24, 30], "test": [30]}
    assert [(r.cause, r.attempt, r.step, r.resumed_step) for r in data.restarts] == [
        ("crash", 0, 14, 10), ("supervisor_lost", 1, 20, 16)]
    assert data.restarts[0].time == T0 + 20 and data.restarts[1].time == T0 + 40  # its last record
    assert data.total_steps == 30 and data.start_time == T0 and data.launches == [T0, T0 + 90]
    assert data.goodput["restarts"] == {"crash": 1, "supervisor_lost": 1, "total": 2}
    lines = report.text(data, "/x/report.png")
    assert lines[0].startswith("run restarted: completed, step 30/30")
    joined = "\n".join(lines)
    for part in ("train loss 3.5000", "test loss 3.9000", "val loss 4.0000", "restarts 2 (crash 1, supervisor_lost 1)",
                 "MFU 31.0%", "report: /x/report.png", "goodput 0.2"):
        assert part in joined, (part, joined)


def test_a_failure_that_was_the_end_of_the_run_is_marked_but_not_a_restart():
    ledger = [{"kind": "launch", "time": T0}, {"kind": "attempt_start", "attempt": 0, "time": T0 + 1},
              {"kind": "start_step", "attempt": 0, "step": 0, "time": T0 + 2},
              {"kind": "failure", "attempt": 0, "cause": "user_error", "last_step": 3, "time": T0 + 9},
              {"kind": "launch_end", "status": "failed", "time": T0 + 10}]
    assert [(r.cause, r.step, r.resumed_step) for r in report.restarts(ledger)] == [("user_error", 3, None)]


def test_the_report_holds_the_curves_and_the_markers(tmp_path):
    run = _restarted_run(tmp_path)
    lines = report.write(run)
    png = runfiles.path(run, runfiles.REPORT)
    assert lines[-1] == f"  report: {png}"
    assert _pixels_near(png, report.TRAIN_COLOR, "loss") > 300  # the train curve, not just its legend sample
    assert _pixels_near(png, report.EVAL_COLORS["val"], "loss") > 100
    assert _pixels_near(png, report.TOKENS_COLOR, "throughput") > 300
    for region in ("loss", "throughput"):  # a restart line across each panel
        assert _pixels_near(png, report.RESTART_COLOR, region) > 150
    assert _pixels_near(png, report.PRODUCTIVE_COLOR) > 2000  # the goodput bar


def test_every_run_ends_with_its_report_and_the_command_draws_it_again(trained_run, tmp_path):
    png = runfiles.path(trained_run, runfiles.REPORT)
    assert os.path.isfile(png), "the launch did not write report.png"
    assert _pixels_near(png, report.TRAIN_COLOR, "loss") > 300
    assert _pixels_near(png, report.TOKENS_COLOR, "throughput") > 100
    assert _pixels_near(png, report.RESTART_COLOR) < 20  # it had no failure
    assert len(np.unique(image.imread(png).reshape(-1, 4), axis=0)) > 50  # not a blank canvas

    run = str(tmp_path / "trained")
    shutil.copytree(trained_run, run)
    os.remove(runfiles.path(run, runfiles.REPORT))
    proc = _cli("report", run)
    assert proc.returncode == 0, proc.stderr
    again = runfiles.path(run, runfiles.REPORT)
    assert os.path.isfile(again) and _pixels_near(again, report.TRAIN_COLOR, "loss") > 300
    assert proc.stdout.splitlines()[0].startswith("run trained: completed, step 12/12")
    assert "test loss " in proc.stdout and "goodput " in proc.stdout and f"report: {again}" in proc.stdout


def test_report_of_a_missing_run_is_one_line(tmp_path):
    proc = _cli("report", "no-such-run", "--root", str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "no run 'no-such-run'" in proc.stderr, proc.stderr


def test_a_report_that_cannot_be_written_is_one_warning_line(tmp_path, capsys):
    run = _restarted_run(tmp_path)
    os.makedirs(runfiles.path(run, runfiles.REPORT))  # report.png is a directory: the write fails
    report.at_end_of_run(run)
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("warning: could not draw"), err


@pytest.mark.parametrize("missing", [runfiles.METRICS, runfiles.GOODPUT])
def test_a_run_with_no_records_yet_still_gets_a_report(tmp_path, missing):
    run = _restarted_run(tmp_path)
    os.remove(runfiles.path(run, missing))
    lines = report.write(run)
    assert os.path.isfile(runfiles.path(run, runfiles.REPORT)) and lines[0].startswith("run restarted")
