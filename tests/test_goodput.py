"""Tests for the goodput ledger: trainer.goodput.GoodputLog writes records, launcher.goodput reads and sums them.

Expected numbers are computed by hand in the comments; records carry explicit times, so nothing depends on the
wall clock.
"""
import json
import os
import subprocess
import sys

import pytest

from launcher.goodput import BUCKETS, read, summarize
from trainer.goodput import GoodputLog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def R(kind, time, attempt=None, **fields):
    record = {"kind": kind, "time": float(time), **fields}
    if attempt is not None:
        record["attempt"] = attempt
    return record


def _check_adds_up(s):
    parts = s["productive_s"] + sum(s["badput"].values())
    assert parts <= s["total_s"] + 1e-6
    assert s["total_s"] == pytest.approx(parts, abs=1e-6)
    assert set(s["badput"]) == set(BUCKETS)
    assert all(v >= 0 for v in s["badput"].values())


def clean_run():
    return [
        R("launch", 1000),
        R("attempt_start", 1000, 1),
        R("init", 1010, 1, seconds=8.0),
        R("start_step", 1010, 1, step=0),
        R("startup", 1030, 1, seconds=20.0),
        R("steps", 1060, 1, **{"from": 1, "to": 100, "seconds": 30.0, "data_wait_s": 2.0}),
        R("save", 1061, 1, step=100, blocking_s=1.0),
        R("eval", 1065, 1, seconds=4.0),
        R("steps", 1095, 1, **{"from": 100, "to": 200, "seconds": 30.0, "data_wait_s": 3.0}),
        R("save", 1097, 1, step=None, blocking_s=2.0),
        R("end", 1097, 1, step=200),
        R("launch_end", 1100, status="completed"),
    ]


def test_single_clean_attempt():
    s = summarize(clean_run(), now=1100)
    # total 100; productive (30-2)+(30-3) = 55; other = 100-55-5-8-20-3 = 9 (eval 4 + gaps)
    assert s["total_s"] == 100.0
    assert s["productive_s"] == 55.0
    assert s["goodput"] == 0.55
    assert s["badput"] == {"init": 8.0, "startup": 20.0, "data_wait": 5.0, "checkpoint_save": 3.0,
                           "restore": 0.0, "wasted_progress": 0.0, "infrastructure_recovery": 0.0,
                           "other": 9.0}
    assert s["restarts"] == {"total": 0}
    assert s["lost_steps"] == 0
    assert s["attempts"] == 1
    _check_adds_up(s)


def test_now_extends_only_a_live_launch():
    live = clean_run()[:-1]  # no launch_end yet: the launch runs until now
    s = summarize(live, now=1200)
    assert s["total_s"] == 200.0
    assert s["goodput"] == 0.275
    assert s["badput"]["other"] == 109.0
    _check_adds_up(s)
    # a `now` earlier than the last record does not shorten it
    assert summarize(live, now=0)["total_s"] == 97.0
    # a finished launch ends at its launch_end, however late `now` is; the time after it is not idle either
    s = summarize(clean_run(), now=1_000_000)
    assert s["total_s"] == 100.0 and s["goodput"] == 0.55 and s["idle_s"] == 0.0


def test_crash_restart_from_earlier_checkpoint():
    records = [
        R("launch", 0),
        R("attempt_start", 0, 1),
        R("init", 10, 1, seconds=10.0),
        R("start_step", 10, 1, step=0),
        R("startup", 30, 1, seconds=20.0),
        R("steps", 70, 1, **{"from": 1, "to": 80, "seconds": 40.0, "data_wait_s": 4.0}),
        R("steps", 95, 1, **{"from": 80, "to": 130, "seconds": 25.0, "data_wait_s": 5.0}),
        R("save", 97, 1, step=100, blocking_s=2.0),
        R("steps", 122, 1, **{"from": 130, "to": 180, "seconds": 25.0, "data_wait_s": 0.0}),
        R("failure", 130, 1, cause="crash", last_step=183),
        R("recovery", 140, 1, seconds=10.0),
        R("attempt_start", 140, 2),
        R("init", 150, 2, seconds=10.0),
        R("restore", 155, 2, step=100, seconds=5.0),
        R("start_step", 155, 2, step=100),
        R("startup", 170, 2, seconds=15.0),
        R("steps", 270, 2, **{"from": 101, "to": 300, "seconds": 100.0, "data_wait_s": 4.0}),
        R("save", 273, 2, step=None, blocking_s=3.0),
        R("end", 273, 2, step=300),
        R("launch_end", 275, status="completed"),
    ]
    s = summarize(records, now=275)
    # attempt 1 resumed from 100 by attempt 2:
    #   1..80   kept:   productive 36, data wait 4
    #   80..130 split:  30/50 beyond 100 -> wasted 0.6*25 = 15; kept productive 0.4*20 = 8, data wait 0.4*5 = 2
    #   130..180 wasted 25
    # attempt 2: productive 96, data wait 4
    assert s["productive_s"] == 140.0
    assert s["badput"]["wasted_progress"] == 40.0
    assert s["badput"]["data_wait"] == 10.0
    assert s["badput"]["init"] == 20.0
    assert s["badput"]["startup"] == 35.0
    assert s["badput"]["checkpoint_save"] == 5.0
    assert s["badput"]["restore"] == 5.0
    assert s["badput"]["infrastructure_recovery"] == 10.0
    assert s["badput"]["other"] == 10.0  # 275 - 265
    assert s["total_s"] == 275.0
    assert s["goodput"] == round(140 / 275, 4) == 0.5091
    assert s["restarts"] == {"crash": 1, "total": 1}
    assert s["lost_steps"] == 83  # heartbeat last_step 183 - restored 100
    assert s["attempts"] == 2
    _check_adds_up(s)


def test_preemption_saved_at_agreed_step_loses_nothing():
    records = [
        R("launch", 0),
        R("attempt_start", 0, 1),
        R("init", 10, 1, seconds=10.0),
        R("start_step", 10, 1, step=0),
        R("startup", 30, 1, seconds=20.0),
        R("steps", 90, 1, **{"from": 1, "to": 100, "seconds": 60.0, "data_wait_s": 0.0}),
        R("steps", 120, 1, **{"from": 100, "to": 150, "seconds": 30.0, "data_wait_s": 0.0}),
        R("save", 124, 1, step=150, blocking_s=4.0),
        R("failure", 125, 1, cause="preemption", last_step=150),
        R("recovery", 185, 1, seconds=60.0),
        R("attempt_start", 185, 2),
        R("init", 197, 2, seconds=12.0),
        R("restore", 200, 2, step=150, seconds=3.0),
        R("start_step", 200, 2, step=150),
        R("startup", 220, 2, seconds=20.0),
        R("steps", 310, 2, **{"from": 151, "to": 300, "seconds": 90.0, "data_wait_s": 0.0}),
        R("save", 315, 2, step=None, blocking_s=5.0),
        R("end", 315, 2, step=300),
        R("launch_end", 316, status="completed"),
    ]
    s = summarize(records, now=316)
    # productive 60+30+90 = 180; 180+60+22+40+9+3 = 314 -> other 2
    assert s["lost_steps"] == 0
    assert s["badput"]["wasted_progress"] == 0.0
    assert s["productive_s"] == 180.0
    assert s["badput"]["infrastructure_recovery"] == 60.0
    assert s["badput"]["init"] == 22.0
    assert s["badput"]["startup"] == 40.0
    assert s["badput"]["checkpoint_save"] == 9.0
    assert s["badput"]["restore"] == 3.0
    assert s["badput"]["other"] == 2.0
    assert s["total_s"] == 316.0
    assert s["goodput"] == 0.5696
    assert s["restarts"] == {"preemption": 1, "total": 1}
    _check_adds_up(s)


def test_supervisor_death_gap_is_infrastructure_recovery():
    records = [
        R("launch", 0),
        R("attempt_start", 0, 1),
        R("init", 10, 1, seconds=10.0),
        R("start_step", 10, 1, step=0),
        R("startup", 30, 1, seconds=20.0),
        R("steps", 80, 1, **{"from": 1, "to": 100, "seconds": 50.0, "data_wait_s": 2.0}),
        R("save", 82, 1, step=100, blocking_s=2.0),
        R("steps", 102, 1, **{"from": 100, "to": 140, "seconds": 20.0, "data_wait_s": 0.0}),
        # the supervisor dies: no failure, no launch_end; the command is typed again at 400
        R("launch", 400),
        R("attempt_start", 400, 2),
        R("init", 410, 2, seconds=10.0),
        R("restore", 414, 2, step=100, seconds=4.0),
        R("start_step", 414, 2, step=100),
        R("startup", 430, 2, seconds=16.0),
        R("steps", 480, 2, **{"from": 101, "to": 200, "seconds": 50.0, "data_wait_s": 1.0}),
        R("save", 483, 2, step=None, blocking_s=3.0),
        R("end", 483, 2, step=200),
        R("launch_end", 485, status="completed"),
    ]
    s = summarize(records, now=485)
    # gap 400 - 102 = 298; productive 48 + 49 = 97; wasted 100..140 = 20
    # 97 + 3 + 20 + 20 + 36 + 5 + 4 + 298 = 483 -> other 2
    assert s["badput"]["infrastructure_recovery"] == 298.0
    assert s["productive_s"] == 97.0
    assert s["badput"]["wasted_progress"] == 20.0
    assert s["badput"]["data_wait"] == 3.0
    assert s["badput"]["other"] == 2.0
    assert s["total_s"] == 485.0
    assert s["goodput"] == 0.2
    assert s["restarts"] == {"supervisor_lost": 1, "total": 1}
    assert s["lost_steps"] == 40
    assert s["attempts"] == 2
    _check_adds_up(s)


def test_ended_launch_then_relaunch_is_not_recovery():
    # the run finished, and a later command extends it: the idle time between is neither recovery nor restart
    records = clean_run() + [
        R("launch", 2000),
        R("attempt_start", 2000, 2),
        R("start_step", 2010, 2, step=200),
        R("steps", 2100, 2, **{"from": 201, "to": 300, "seconds": 90.0, "data_wait_s": 0.0}),
        R("end", 2100, 2, step=300),
        R("launch_end", 2100, status="completed"),
    ]
    s = summarize(records, now=2100)
    assert s["badput"]["infrastructure_recovery"] == 0.0
    assert s["restarts"] == {"total": 0}
    assert s["lost_steps"] == 0
    assert s["productive_s"] == 145.0
    # the two launches ran 100 s each; the 900 s between them are idle, outside total
    assert s["total_s"] == 200.0 and s["idle_s"] == 900.0
    assert s["goodput"] == 0.725
    _check_adds_up(s)


def test_days_idle_between_launches_do_not_drag_goodput_down():
    # a completed run, extended three days later: goodput is that of the two launches' own time
    day = 86400.0
    first = clean_run()
    later = [dict(r, time=r["time"] + 3 * day, **({"attempt": 2} if "attempt" in r else {})) for r in first]
    for r in later:
        if r["kind"] == "start_step":
            r["step"] = 200
        if r["kind"] == "steps":
            r["from"], r["to"] = r["from"] + 200, r["to"] + 200
        if r["kind"] == "end":
            r["step"] = 400
    s = summarize(first + later, now=3 * day + 5000)
    assert s["total_s"] == 200.0  # 100 s per launch
    assert s["idle_s"] == 3 * day - 100.0  # the first launch's end (1100) to the second launch (1000 + 3 days)
    assert s["productive_s"] == 110.0 and s["goodput"] == 0.55  # as one clean launch: no worse for the wait
    assert s["badput"]["other"] == 18.0 and s["badput"]["infrastructure_recovery"] == 0.0
    assert s["restarts"] == {"total": 0} and s["lost_steps"] == 0 and s["attempts"] == 2
    _check_adds_up(s)


def test_idle_after_a_finished_launch_but_dead_supervisor_is_still_recovery():
    # launch 1 finished; launch 2's supervisor died at 2050 (no launch_end); launch 3 at 2500
    records = clean_run() + [
        R("launch", 2000), R("attempt_start", 2000, 2), R("start_step", 2010, 2, step=200),
        R("steps", 2050, 2, **{"from": 201, "to": 240, "seconds": 40.0, "data_wait_s": 0.0}),
        R("launch", 2500), R("attempt_start", 2500, 3), R("start_step", 2510, 3, step=240),
        R("end", 2520, 3, step=240), R("launch_end", 2520, status="completed"),
    ]
    s = summarize(records, now=9999)
    assert s["idle_s"] == 900.0  # 1100 -> 2000 only
    assert s["badput"]["infrastructure_recovery"] == 450.0  # 2050 -> 2500
    assert s["total_s"] == 100.0 + 500.0 + 20.0
    _check_adds_up(s)


def test_older_checkpoint_later_wastes_against_the_earliest_later_start():
    # attempt 1 reaches 150; attempt 2 resumes at 100, reaches 130; attempt 3 resumes at 50 (newer ones unreadable)
    # and ends in a hang with no attempt after it (not a restart). 1 s per step.
    records = [
        R("launch", 0),
        R("attempt_start", 0, 1),
        R("start_step", 0, 1, step=0),
        R("steps", 150, 1, **{"from": 0, "to": 150, "seconds": 150.0, "data_wait_s": 0.0}),
        R("failure", 150, 1, cause="crash", last_step=150),
        R("attempt_start", 150, 2),
        R("start_step", 150, 2, step=100),
        R("steps", 180, 2, **{"from": 100, "to": 130, "seconds": 30.0, "data_wait_s": 0.0}),
        R("failure", 180, 2, cause="crash", last_step=None),
        R("attempt_start", 180, 3),
        R("start_step", 180, 3, step=50),
        R("steps", 330, 3, **{"from": 50, "to": 200, "seconds": 150.0, "data_wait_s": 0.0}),
        R("failure", 330, 3, cause="hang", last_step=200),
        R("launch_end", 330, status="failed"),
    ]
    s = summarize(records, now=330)
    # attempt 1: steps 51..150 redone -> 100 s wasted, 50 kept; attempt 2: all 30 wasted; attempt 3: 150 kept
    assert s["badput"]["wasted_progress"] == 130.0
    assert s["productive_s"] == 200.0
    # lost: (150 - 100) + (130 - 50) = 130, the same 130 steps that were computed twice
    assert s["lost_steps"] == 130
    assert s["restarts"] == {"crash": 2, "total": 2}
    assert s["attempts"] == 3
    _check_adds_up(s)


def test_parts_never_exceed_total():
    for records, now in [(clean_run(), 1100), (clean_run(), 5000), ([R("launch", 7)], 7), ([], 0)]:
        _check_adds_up(summarize(records, now))
    assert summarize([R("launch", 7)], 7)["goodput"] == 0.0
    assert summarize([], 0)["attempts"] == 0
    # a trainer clock behind the supervisor's: its durations add up to more than the timestamps span
    skewed = [R("launch", 100), R("attempt_start", 100, 1), R("init", 90, 1, seconds=30.0),
              R("steps", 95, 1, **{"from": 0, "to": 10, "seconds": 50.0, "data_wait_s": 5.0})]
    s = summarize(skewed, now=150)
    assert s["total_s"] == 80.0 and s["badput"]["other"] == 0.0
    assert s["goodput"] <= 1.0
    _check_adds_up(s)


def test_writer_and_torn_last_line(tmp_path):
    log = GoodputLog(str(tmp_path), attempt=3)
    log("steps", **{"from": 10, "to": 20, "seconds": 1.5, "data_wait_s": 0.25})
    GoodputLog(str(tmp_path))("failure", attempt=3, cause="crash", last_step=20)
    path = tmp_path / "goodput.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"kind": "recovery", "time": 12')  # a writer died mid-line
    records = read(str(path))
    assert [r["kind"] for r in records] == ["steps", "failure"]
    assert records[0]["attempt"] == 3 and records[0]["from"] == 10 and records[0]["data_wait_s"] == 0.25
    assert isinstance(records[0]["time"], float)
    assert records[1]["attempt"] == 3 and records[1]["cause"] == "crash"
    raw = path.read_bytes().split(b"\n")
    assert json.loads(raw[0])["kind"] == "steps"  # one JSON object per line
    assert read(str(tmp_path / "missing.jsonl")) == []


def test_trainer_writer_imports_no_launcher_code():
    code = ("import sys, trainer.goodput; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('launcher', 'cluster')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=REPO))
