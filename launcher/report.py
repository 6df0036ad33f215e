"""The run's report: `${run.dir}/report.png` (loss and eval curves, tokens/s, restarts, goodput) and its text summary.

Drawn by the launcher at the end of every run and by `tpu-launch report RUN`, from the run directory alone
(metrics.jsonl, goodput.jsonl, summary.json, config.yaml), read through trainer/runfiles.py.
"""
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from launcher.errors import first_line
from launcher.goodput import BUCKETS, summarize
from trainer import runfiles

# Fixed colours, so that a test can find each curve in the image (and none is reused for something else).
TRAIN_COLOR = "#1f77b4"
EVAL_COLORS = {"val": "#ff7f0e", "test": "#2ca02c"}
TOKENS_COLOR = "#9467bd"
RESTART_COLOR = "#d62728"
LAUNCH_COLOR = "#555555"
PRODUCTIVE_COLOR = "#2ca02c"
BUCKET_COLORS = dict(zip(BUCKETS, ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff9896", "#c5b0d5",
                                   "#dbdb8d")))


@dataclass
class Restart:
    """Where an attempt ended and the run went on (or would have): a failure, or a supervisor that died."""
    time: float
    step: Optional[int]  # the highest step reached when it happened
    cause: str
    attempt: int
    resumed_step: Optional[int]  # where the next attempt started; None: no next attempt (the run stopped there)


@dataclass
class ReportData:
    run_dir: str
    name: str
    summary: dict
    total_steps: Optional[int]
    start_time: Optional[float]  # the first launch: time 0 of the time axes
    launches: List[float] = field(default_factory=list)  # when each typed command started
    train: List[List[dict]] = field(default_factory=list)  # step records, in segments of increasing step
    evals: Dict[str, List[dict]] = field(default_factory=dict)  # eval records by split
    restarts: List[Restart] = field(default_factory=list)
    goodput: dict = field(default_factory=dict)  # launcher.goodput.summarize of the ledger


def _int(x) -> Optional[int]:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def train_segments(metrics: List[dict], attempt_starts: List[float] = ()) -> List[List[dict]]:
    """The step records in file order, cut wherever the step goes back (a restart resumed from an older
    checkpoint) or an attempt started in between (a restart or a later launch), so that each segment is one
    attempt's curve and no line bridges the time between attempts."""
    segments: List[List[dict]] = []
    for r in metrics:
        if "split" in r or _int(r.get("step")) is None or not isinstance(r.get("loss"), (int, float)):
            continue
        prev = segments[-1][-1] if segments else None
        if prev is None or r["step"] <= prev["step"] or any(
                prev.get("time", math.inf) < t <= r.get("time", -math.inf) for t in attempt_starts):
            segments.append([])
        segments[-1].append(r)
    return segments


def eval_curves(metrics: List[dict]) -> Dict[str, List[dict]]:
    curves: Dict[str, List[dict]] = {}
    for r in metrics:
        if isinstance(r.get("split"), str) and _int(r.get("step")) is not None and "eval_loss" in r:
            curves.setdefault(r["split"], []).append(r)
    return curves


def restarts(ledger: List[dict]) -> List[Restart]:
    """Every failure record (with where the next attempt resumed, if one started), and every attempt that has
    neither a failure nor an end but was followed by another: its supervisor died (the ledger's `supervisor_lost`)."""
    recs = sorted((r for r in ledger if isinstance(r.get("time"), (int, float))), key=lambda r: r["time"])
    attempts = sorted({r["attempt"] for r in recs if _int(r.get("attempt")) is not None})
    start_step = {}
    for r in recs:
        if r.get("kind") == "start_step" and r.get("attempt") in attempts:
            start_step.setdefault(r["attempt"], _int(r.get("step")))

    def resumed(a: int) -> Optional[int]:
        later = [b for b in attempts if b > a and b in start_step]
        return start_step[later[0]] if later else None

    found = []
    for a in attempts:
        mine = [r for r in recs if r.get("attempt") == a]
        failure = next((r for r in mine if r.get("kind") == "failure"), None)
        if failure is not None:
            found.append(Restart(failure["time"], _int(failure.get("last_step")), str(failure.get("cause")), a,
                                 resumed(a)))
        elif not any(r.get("kind") == "end" for r in mine) and any(b > a for b in attempts):
            reached = [_int(r.get(k)) for r in mine for k in ("to", "step")]
            found.append(Restart(mine[-1]["time"], max((s for s in reached if s is not None), default=None),
                                 "supervisor_lost", a, resumed(a)))
    return found


def _total_steps(run_dir: str) -> Optional[int]:
    try:
        with open(runfiles.path(run_dir, runfiles.CONFIG)) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None
    return _int((cfg.get("trainer") or {}).get("steps")) if isinstance(cfg, dict) else None


def collect(run_dir: str) -> ReportData:
    """Everything the report shows, from the run directory."""
    metrics = runfiles.read_jsonl(runfiles.path(run_dir, runfiles.METRICS))
    ledger = runfiles.read_jsonl(runfiles.path(run_dir, runfiles.GOODPUT))
    summary = runfiles.read_json(runfiles.path(run_dir, runfiles.SUMMARY)) or {}
    times = [r["time"] for r in ledger if isinstance(r.get("time"), (int, float))]
    launches = [r["time"] for r in ledger if r.get("kind") == "launch" and isinstance(r.get("time"), (int, float))]
    metric_times = [r["time"] for r in metrics if isinstance(r.get("time"), (int, float))]
    start = min(launches or times or metric_times, default=None)
    return ReportData(run_dir=run_dir, name=summary.get("run") or os.path.basename(os.path.normpath(run_dir)),
                      summary=summary, total_steps=_total_steps(run_dir), start_time=start,
                      train=train_segments(metrics, [r["time"] for r in ledger if r.get("kind") == "attempt_start"
                                                     and isinstance(r.get("time"), (int, float))]),
                      launches=sorted(launches), evals=eval_curves(metrics), restarts=restarts(ledger),
                      # now=0: the total runs to the ledger's last record (a finished run's launch_end), so
                      # that drawing the report again later gives the same figures
                      goodput=summarize(ledger, now=0.0))


def _time_unit(span_s: float):
    for limit, unit, div in ((600, "s", 1.0), (3 * 3600, "min", 60.0), (3 * 86400, "h", 3600.0)):
        if span_s < limit:
            return unit, div
    return "days", 86400.0


def draw(data: ReportData, out: str) -> str:
    """Draw the report into `out` (a PNG, written atomically); returns `out`."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: the launcher may run on a head VM, in a Ray job, over SSH
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 1.2))
    ax_loss, ax_tok, ax_good = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    s = data.summary
    steps = f"step {s.get('final_step') if s.get('final_step') is not None else _last_step(data)}" + (
        f"/{data.total_steps}" if data.total_steps else "")
    fig.suptitle(f"run {data.name}: {s.get('status', 'no summary yet')}, {steps}, goodput "
                 f"{data.goodput.get('goodput', 0.0):.2f}, restarts {_restart_count(data)}", fontsize=13)

    # Loss by step: train (one line per attempt), eval splits, restarts where they happened.
    for i, seg in enumerate(data.train):
        ax_loss.plot([r["step"] for r in seg], [r["loss"] for r in seg], color=TRAIN_COLOR, lw=1.8,
                     label="train loss" if i == 0 else None)
    for split, recs in sorted(data.evals.items()):
        ax_loss.plot([r["step"] for r in recs], [r["eval_loss"] for r in recs], "o-" if split != "test" else "s",
                     color=EVAL_COLORS.get(split, "#000000"), lw=1.4, ms=6, label=f"{split} loss")
    for i, r in enumerate(data.restarts):
        if r.step is not None:
            ax_loss.axvline(r.step, color=RESTART_COLOR, ls="--", lw=1.5, label="failure" if i == 0 else None)
            what = f"{r.cause}: resumed at {r.resumed_step}" if r.resumed_step is not None else r.cause
            ax_loss.annotate(what, (r.step, 0.97), xycoords=("data", "axes fraction"), rotation=90, ha="right",
                             va="top", color=RESTART_COLOR, fontsize=8)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    _legend_or_empty(ax_loss, bool(data.train or data.evals))

    # Tokens/s over wall time since the first launch (the compile step left out: it is not a rate).
    t0 = data.start_time or 0.0
    rates = [[r for r in seg if not r.get("includes_compile") and isinstance(r.get("tokens_per_s"), (int, float))
              and isinstance(r.get("time"), (int, float))] for seg in data.train]
    pts = [r for seg in rates for r in seg]
    span = max([r["time"] - t0 for r in pts] + [r.time - t0 for r in data.restarts] + [1.0])
    unit, div = _time_unit(span)
    for i, seg_pts in enumerate(rates):
        ax_tok.plot([(r["time"] - t0) / div for r in seg_pts], [r["tokens_per_s"] for r in seg_pts], ".-",
                    color=TOKENS_COLOR, lw=1.4, label="tokens/s" if i == 0 else None)
    for i, r in enumerate(data.restarts):
        ax_tok.axvline((r.time - t0) / div, color=RESTART_COLOR, ls="--", lw=1.5, label="failure" if i == 0 else None)
    for i, t in enumerate(data.launches[1:]):
        ax_tok.axvline((t - t0) / div, color=LAUNCH_COLOR, ls=":", lw=1.5, label="launch" if i == 0 else None)
    mfu = [r["mfu"] for r in pts if isinstance(r.get("mfu"), (int, float))]
    ax_tok.set(xlabel=f"time since the first launch ({unit})", ylabel="tokens/s",
               title="throughput" + (f" (MFU {100 * mfu[-1]:.1f}% at the end)" if mfu else ""))
    ax_tok.set_xlim(left=0)  # from the launch: the time before the first step (start-up) shows too
    ax_tok.set_ylim(bottom=0)
    _legend_or_empty(ax_tok, bool(pts))

    # Goodput breakdown: one horizontal bar, productive time then each badput bucket, as shares of the total.
    g = data.goodput
    total = g.get("total_s") or 0.0
    left = 0.0
    parts = [("productive", g.get("productive_s", 0.0), PRODUCTIVE_COLOR)] + [
        (b, (g.get("badput") or {}).get(b, 0.0), BUCKET_COLORS[b]) for b in BUCKETS]
    for name, seconds, color in parts:
        share = seconds / total if total else 0.0
        if share <= 0:
            continue
        ax_good.barh(0, share, left=left, color=color, edgecolor="white",
                     label=f"{name} {100 * share:.1f}% ({seconds:.1f} s)")
        if share > 0.011 * len(name):  # the name fits inside its part of the bar
            ax_good.text(left + share / 2, 0, name, ha="center", va="center", fontsize=8, color="white")
        left += share
    ax_good.set(xlim=(0, 1), yticks=[], xlabel="share of the run's time",
                title=f"goodput {g.get('goodput', 0.0):.2f} of {total:.1f} s"
                      + (f" ({g['idle_s']:.1f} s idle between launches not counted)" if g.get("idle_s") else ""))
    if total:
        ax_good.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=5, fontsize=8, frameon=False)
    else:
        ax_good.text(0.5, 0.5, "no goodput records", ha="center", va="center", transform=ax_good.transAxes)

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    runfiles.write_atomic(out, buf.getvalue())
    return out


def _legend_or_empty(ax, has_data: bool) -> None:
    if has_data:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax.transAxes)


def _restart_count(data: ReportData) -> int:
    return int((data.goodput.get("restarts") or {}).get("total", 0))


def _last_step(data: ReportData) -> Optional[int]:
    return data.train[-1][-1]["step"] if data.train else None


def text(data: ReportData, png: Optional[str]) -> List[str]:
    """The short text summary: status, steps, final loss, eval, goodput, restarts, MFU, the report's path."""
    s, g = data.summary, data.goodput
    step = s.get("final_step") if s.get("final_step") is not None else _last_step(data)
    head = f"run {data.name}: {s.get('status', 'no summary yet (live, or its supervisor died)')}, step {step}"
    head += f"/{data.total_steps}" if data.total_steps else ""
    if isinstance(s.get("wall_s"), (int, float)):
        head += f", {s['wall_s']:.1f} s this launch"
    if s.get("launches"):
        head += f", {s['launches']} launch{'es' if s['launches'] != 1 else ''}"
    lines = [head]
    final_loss = s.get("final_loss") if s.get("final_loss") is not None else (
        data.train[-1][-1]["loss"] if data.train else None)
    losses = [f"train loss {final_loss:.4f}" if isinstance(final_loss, (int, float)) else "train loss -"]
    for split, ev in (("test", s.get("eval")), ("val", s.get("val"))):
        ev = ev or (data.evals.get(split) or [None])[-1]
        if isinstance(ev, dict) and isinstance(ev.get("eval_loss"), (int, float)):
            losses.append(f"{split} loss {ev['eval_loss']:.4f} ppl {ev.get('eval_ppl', float('nan')):.2f} "
                          f"acc {ev.get('eval_acc', float('nan')):.4f} (step {ev.get('step')})")
    lines.append("  " + " | ".join(losses))
    badput = sorted(((v, k) for k, v in (g.get("badput") or {}).items() if v > 0), reverse=True)[:3]
    idle = f" ({g['idle_s']:.1f} s idle between launches not counted)" if g.get("idle_s") else ""
    lines.append(f"  goodput {g.get('goodput', 0.0):.2f} of {g.get('total_s', 0.0):.1f} s{idle}"
                 + (" | most badput: " + ", ".join(f"{k} {v:.1f} s" for v, k in badput) if badput else ""))
    by_cause = {c: n for c, n in (g.get("restarts") or {}).items() if c != "total" and n}
    rest = f"  restarts {_restart_count(data)}" + (
        " (" + ", ".join(f"{c} {n}" for c, n in sorted(by_cause.items())) + ")" if by_cause else "")
    rest += f" | lost steps {g.get('lost_steps', 0)}"
    if isinstance(s.get("mfu"), (int, float)):
        rest += f" | MFU {100 * s['mfu']:.1f}%"
    lines.append(rest)
    if png:
        lines.append(f"  report: {png}")
    return lines


def write(run_dir: str) -> List[str]:
    """Draw `${run_dir}/report.png`; returns the text summary's lines (naming the report)."""
    data = collect(run_dir)
    png = draw(data, runfiles.path(run_dir, runfiles.REPORT))
    return text(data, png)


def at_end_of_run(run_dir: str) -> None:
    """The report at the end of a launch: drawn and summarised, or one warning line; never fails the run."""
    try:
        lines = write(run_dir)
    except Exception as e:  # noqa: BLE001 - the report is a view of a run already recorded: it must not fail it
        print(f"warning: could not draw the run's report ({type(e).__name__}: {first_line(e)}); "
              f"`tpu-launch report {run_dir}` draws it again", file=sys.stderr, flush=True)
        return
    print("\n".join(lines), flush=True)
