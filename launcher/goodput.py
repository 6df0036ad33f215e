"""Goodput ledger: reads ${run.dir}/goodput.jsonl and sums it into goodput, badput buckets, restarts and lost steps.

Computed locally from the records alone, no cloud service. Every record has `kind` and `time` (unix seconds);
trainer records also have `attempt`. Written by trainer/goodput.py's GoodputLog.

Supervisor (launcher) records:
  launch        {time}                                   the command started (once per typed command)
  attempt_start {attempt, time}                          trainers of attempt N are being started
  failure       {attempt, time, cause, last_step}        attempt N failed; cause "preemption", "crash", "hang",
                                                         "user_error", "startup", ...; last_step = highest step any
                                                         host had completed (heartbeats), or null
  recovery      {attempt, time, seconds}                 failure of attempt N detected -> attempt N+1 started
                                                         (teardown, re-provisioning, backoff)
  launch_end    {time, status}                           the command finished
Trainer host 0 records (all with `attempt`):
  init          {seconds}                                process start -> jax.distributed ready (imports included)
  restore       {step, seconds}                          restored checkpoint `step` (absent on a fresh start)
  start_step    {step}                                   the step this attempt starts from (0 when fresh)
  startup       {seconds}                                ready -> end of the first step (compile + first step)
  steps         {from, to, seconds, data_wait_s}         steady stepping that completed steps from+1..to; seconds
                                                         is its wall time, data_wait_s the part spent waiting for
                                                         data. It excludes startup, save blocking and eval time.
  save          {step, blocking_s}                       time the loop was blocked by a checkpoint save (step null
                                                         for the final wait)
  eval          {seconds}
  end           {step}                                   the attempt finished training

Semantics of summarize(records, now):
  - Records are taken in time order. total = the time the launches ran: the sum, over every `launch`, of the time
    from it to its end. A launch's end is its latest record if it has a `launch_end`; else the next `launch` (its
    supervisor died; that gap is infrastructure_recovery below); else, for the last launch (still live, or its
    supervisor died and it was not typed again), max(latest record time, now). Without any `launch` record,
    total = max(latest record time, now) - the first record's time.
  - idle_s = the time between a finished launch's end and the next `launch` (days may pass before a run is
    extended): in no bucket and not in total, so it does not drag goodput down. Time after the last finished
    launch is not counted at all.
  - A `steps` interval of attempt N is wasted where its steps lie beyond the start step of a later attempt that
    actually started (has a `start_step`): beyond the smallest such start step, which is the next attempt's
    unless a later one restored an even older checkpoint. An interval only partly beyond it is split in
    proportion to its steps. Steps of the last attempt (none started after it) are never wasted.
  - productive = sum of (seconds - data_wait_s) over the non-wasted part of `steps` intervals;
    goodput = productive / total (0 when total is 0).
  - badput buckets, in seconds: init = sum of init; startup = sum of startup; data_wait = data_wait_s of the
    non-wasted parts; checkpoint_save = sum of save blocking_s; restore = sum of restore seconds;
    wasted_progress = seconds of the wasted parts (their data wait included); infrastructure_recovery = sum of
    recovery seconds, plus, for each launch that has no `launch_end` (the supervisor died), the gap from its last
    record to the next `launch`; other = total - productive - all the other buckets, at least 0 (eval time,
    logging, hang detection, ...).
    If clock skew between hosts makes the measured parts exceed total, total is raised to their sum, so that
    productive + badput always equals total.
  - restarts: {cause: count} for `failure` records followed by a later attempt's `attempt_start`, plus
    "supervisor_lost" for an attempt with neither `failure` nor `end` that was followed by a later attempt (its
    supervisor died), and "total".
  - lost_steps: over every attempt followed by a later attempt with a `start_step`, the sum of
    max(0, reached - that next start step), reached = max(failure last_step, highest `to` of its `steps`,
    its `end` step).
  - attempts: the number of distinct attempt numbers seen.
"""
import math
from typing import Any, Dict, Iterable, List, Optional

from trainer.runfiles import read_jsonl

BUCKETS = ("init", "startup", "data_wait", "checkpoint_save", "restore", "wasted_progress",
           "infrastructure_recovery", "other")


def read(path: str) -> List[dict]:
    """The records of a goodput.jsonl (trainer/runfiles.read_jsonl: a torn or undecodable line is skipped)."""
    return read_jsonl(path)


def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _sec(x: Any) -> float:
    """A duration field: a finite number, at least 0; anything else counts as 0."""
    v = _num(x)
    return max(0.0, v) if v is not None else 0.0


def _max(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _launch_time(recs: List[dict], launches: List[int], now: float):
    """(total, idle): the seconds the launches ran, and the seconds between a finished launch and the next."""
    if not launches:
        return max(0.0, max(recs[-1]["time"], now) - recs[0]["time"]), 0.0
    total = idle = 0.0
    for n, this in enumerate(launches):
        following = launches[n + 1] if n + 1 < len(launches) else None
        segment = recs[this:following]
        ended = any(r.get("kind") == "launch_end" for r in segment)
        if ended:
            end = segment[-1]["time"]
            if following is not None:
                idle += recs[following]["time"] - end
        else:  # its supervisor died (until the next launch), or it is live
            end = recs[following]["time"] if following is not None else max(segment[-1]["time"], now)
        total += end - recs[this]["time"]
    return total, idle


def summarize(records: List[dict], now: float) -> Dict[str, Any]:
    """goodput, productive_s, total_s, idle_s, badput buckets, restarts by cause, lost_steps and attempts of a
    run's goodput records (see the module docstring); `now` ends a launch that is still live."""
    recs = sorted((r for r in records if isinstance(r, dict) and _num(r.get("time")) is not None),
                  key=lambda r: r["time"])
    buckets = {name: 0.0 for name in BUCKETS}
    if not recs:
        return {"goodput": 0.0, "productive_s": 0.0, "total_s": 0.0, "idle_s": 0.0, "badput": buckets,
                "restarts": {"total": 0}, "lost_steps": 0, "attempts": 0}

    def of(kind: str) -> List[dict]:
        return [r for r in recs if r.get("kind") == kind]

    launches = [i for i, r in enumerate(recs) if r.get("kind") == "launch"]
    span, idle = _launch_time(recs, launches, now)

    attempts = sorted({r["attempt"] for r in recs if isinstance(r.get("attempt"), int)
                       and not isinstance(r.get("attempt"), bool)})
    start_step: Dict[int, float] = {}
    for r in of("start_step"):
        step = _num(r.get("step"))
        if r.get("attempt") in attempts and step is not None:
            start_step.setdefault(r["attempt"], step)

    def later_starts(a: int) -> List[float]:
        return [start_step[b] for b in attempts if b > a and b in start_step]

    # Steady stepping: productive, data wait, wasted.
    productive = 0.0
    for r in of("steps"):
        seconds = _sec(r.get("seconds"))
        wait = min(_sec(r.get("data_wait_s")), seconds)
        lo, hi = _num(r.get("from")), _num(r.get("to"))
        later = later_starts(r.get("attempt")) if r.get("attempt") in attempts else []
        wasted = 0.0
        if later and lo is not None and hi is not None:
            keep = min(later)
            if hi <= keep:
                wasted = 0.0
            elif lo >= keep:
                wasted = 1.0
            else:
                wasted = (hi - keep) / (hi - lo)
        buckets["wasted_progress"] += seconds * wasted
        productive += (seconds - wait) * (1.0 - wasted)
        buckets["data_wait"] += wait * (1.0 - wasted)

    for kind, bucket, field in (("init", "init", "seconds"), ("startup", "startup", "seconds"),
                                ("save", "checkpoint_save", "blocking_s"), ("restore", "restore", "seconds"),
                                ("recovery", "infrastructure_recovery", "seconds")):
        buckets[bucket] += sum(_sec(r.get(field)) for r in of(kind))

    # A launch whose supervisor died (no launch_end): from its last record to the next launch.
    for this, following in zip(launches, launches[1:]):
        segment = recs[this:following]
        if not any(r.get("kind") == "launch_end" for r in segment):
            buckets["infrastructure_recovery"] += max(0.0, recs[following]["time"] - segment[-1]["time"])

    # Restarts by cause.
    started = {r.get("attempt") for r in of("attempt_start")}
    failed = {r.get("attempt") for r in of("failure")}
    ended = {r.get("attempt") for r in of("end")}
    restarts: Dict[str, int] = {}
    for r in of("failure"):
        a = r.get("attempt")
        if a in attempts and any(b > a for b in started if b in attempts):
            cause = str(r.get("cause") or "unknown")
            restarts[cause] = restarts.get(cause, 0) + 1
    for a in attempts:
        if a in started and a not in failed and a not in ended and any(b > a for b in started if b in attempts):
            restarts["supervisor_lost"] = restarts.get("supervisor_lost", 0) + 1
    restarts["total"] = sum(restarts.values())

    # Steps completed by an attempt beyond where the next started attempt resumed.
    lost = 0.0
    for a in attempts:
        nxt = next((start_step[b] for b in attempts if b > a and b in start_step), None)
        if nxt is None:
            continue
        reached = _max([_num(r.get("last_step")) for r in of("failure") if r.get("attempt") == a]
                       + [_num(r.get("to")) for r in of("steps") if r.get("attempt") == a]
                       + [_num(r.get("step")) for r in of("end") if r.get("attempt") == a])
        if reached is not None:
            lost += max(0.0, reached - nxt)

    productive_s = round(productive, 3)
    badput = {name: round(buckets[name], 3) for name in BUCKETS if name != "other"}
    measured = productive_s + sum(badput.values())
    total_s = max(round(span, 3), round(measured, 3))
    badput["other"] = max(0.0, round(total_s - measured, 3))
    return {
        "goodput": round(productive_s / total_s, 4) if total_s > 0 else 0.0,
        "productive_s": productive_s,
        "total_s": total_s,
        "idle_s": round(idle, 3),
        "badput": {name: badput[name] for name in BUCKETS},
        "restarts": restarts,
        "lost_steps": int(round(lost)),
        "attempts": len(attempts),
    }
