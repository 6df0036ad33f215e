"""The run's progress in the launcher's terminal: hosts coming up, compile, then one live bar (rich).

On a terminal: each host of the current attempt as it is placed, started, joins jax.distributed, restores and
compiles (events.jsonl), then one bar with step/total, steps/s, tokens/s, loss, MFU and ETA (host 0's records in
metrics.jsonl and its heartbeat, which moves every step). Host 0's other output (warnings, errors, eval lines)
and the launcher's own lines are printed above the bar. Not on a terminal (a pipe, CI, a Ray job's log): host
0's `[host 0] ...` lines, exactly as launcher/logtail.py has always echoed them, and nothing else.
"""
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from launcher.logtail import LogTail
from trainer import runfiles

# Host 0's step lines (trainer/loop.py: "step 10/300 | loss ..."): on a terminal the bar shows them instead.
STEP_LINE = re.compile(r"^\[host 0\] step \d+/\d+ \|")
RATE_WINDOW = 5  # the steps/s of the bar: over the latest records of this many logged steps
MAX_HOST_ROWS = 8  # more hosts than this: counts by state instead of one row per host

# A host's state in its attempt, from its events, in the order they come.
HOST_STATES = (("process_start", "started"), ("distributed_ready", "joined"), ("restore", "restored"),
               ("ready", "compiling"), ("first_step", "training"), ("preempted", "saved"), ("done", "done"))


@dataclass
class Bringup:
    """Where the latest attempt's hosts are, from events.jsonl."""
    attempt: Optional[int] = None
    started: Optional[float] = None  # the attempt's start (the launcher's attempt_start)
    hosts: int = 0  # from the latest hosts_placed
    names: Dict[int, str] = field(default_factory=dict)  # host -> hostname/ip
    state: Dict[int, str] = field(default_factory=dict)  # host -> HOST_STATES name, or "placed"
    since: Dict[int, float] = field(default_factory=dict)  # host -> when it reached that state
    restored: Optional[int] = None  # the step the attempt restored

    @property
    def training(self) -> bool:
        return self.hosts > 0 and sum(self.state.get(i) in ("training", "saved", "done")
                                      for i in range(self.hosts)) == self.hosts


def bringup(events: List[dict]) -> Bringup:
    b = Bringup()
    order = {name: n for n, (_, name) in enumerate(HOST_STATES)}
    for e in events:
        kind, host = e.get("event"), e.get("host")
        if kind == "hosts_placed" and isinstance(e.get("hosts"), list):
            b.hosts = len(e["hosts"])
            b.names = {i: f"{h.get('hostname')}/{h.get('ip')}" for i, h in enumerate(e["hosts"])
                       if isinstance(h, dict)}
            b.state = {i: "placed" for i in range(b.hosts)}
            b.since = {i: e.get("time") for i in range(b.hosts)}
        elif kind == "attempt_start" and host == "launcher":
            b.attempt, b.started, b.restored = e.get("attempt"), e.get("time"), None
            b.state = {i: "placed" for i in range(b.hosts)}
            b.since = {i: e.get("time") for i in range(b.hosts)}
        elif isinstance(host, int) and e.get("attempt") == b.attempt:
            name = dict(HOST_STATES).get(kind)
            if name is not None and order[name] >= order.get(b.state.get(host), -1):
                b.state[host], b.since[host] = name, e.get("time")
            if kind == "restore" and host == 0:
                b.restored = e.get("step")
    return b


@dataclass
class Bar:
    step: int
    total: int
    rate: Optional[float] = None  # steps/s
    tokens_per_s: Optional[float] = None
    loss: Optional[float] = None
    mfu: Optional[float] = None  # a fraction of peak
    eta_s: Optional[float] = None


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def bar(metrics: List[dict], total: int, since: Optional[float] = None, beat: Optional[dict] = None) -> Bar:
    """The bar from host 0's step records of the current attempt (at or after `since`) and its heartbeat (the
    step it last finished). The rate leaves out the first step's record (it includes compilation)."""
    steps = [r for r in metrics if "split" not in r and _num(r.get("step")) is not None
             and (since is None or (_num(r.get("time")) or 0.0) >= since)]
    last = steps[-1] if steps else {}
    step = int(last.get("step", 0))
    if beat and _num(beat.get("step")) is not None and (since is None or (_num(beat.get("time")) or 0) >= since):
        step = max(step, int(beat["step"]))
    timed = [r for r in steps if not r.get("includes_compile") and _num(r.get("time")) is not None][-RATE_WINDOW:]
    rate = None
    if len(timed) >= 2 and timed[-1]["time"] > timed[0]["time"]:
        rate = (timed[-1]["step"] - timed[0]["step"]) / (timed[-1]["time"] - timed[0]["time"])
    elif timed and (_num(timed[-1].get("step_time_s")) or 0) > 0:
        rate = 1.0 / timed[-1]["step_time_s"]
    steady = timed[-1] if timed else {}
    return Bar(step=step, total=total, rate=rate, tokens_per_s=_num(steady.get("tokens_per_s")),
               loss=_num(last.get("loss")), mfu=_num(steady.get("mfu")),
               eta_s=(max(0, total - step) / rate) if rate else None)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    return (f"{days}d " if days else "") + f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _BarLine:
    """One line at any width: `step N/M`, the bar in what the figures leave (8 to 40 columns), the figures."""

    def __init__(self, head: str, done: int, total: int, tail: str):
        self.head, self.done, self.total, self.tail = head, done, total, tail

    def __rich_console__(self, console, options):
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        room = options.max_width - len(self.head) - len(self.tail) - 2
        if room < 8:  # a narrow terminal: the figures only, cut at its edge rather than wrapped
            yield Text(f"{self.head} {self.tail}", no_wrap=True, overflow="ellipsis")
            return
        grid = Table.grid(padding=(0, 1))
        grid.add_row(self.head, ProgressBar(total=max(self.total, 1), completed=self.done, width=min(room, 40)),
                     self.tail)
        yield grid


def render_bar(b: Bar):
    figures = [f"{b.rate:.2f} steps/s" if b.rate else "- steps/s",
               f"{b.tokens_per_s:,.0f} tok/s" if b.tokens_per_s is not None else "- tok/s",
               f"loss {b.loss:.4f}" if b.loss is not None else "loss -"]
    if b.mfu is not None:  # the step records carry it once the trainer measures it
        figures.append(f"MFU {100 * b.mfu:.1f}%")
    figures.append(f"ETA {_duration(b.eta_s)}")
    return _BarLine(f"step {b.step}/{b.total}", min(b.step, b.total), b.total, " ".join(figures))


def render_bringup(b: Bringup, now: float):
    """Hosts coming up: one line of counts by state, one row per host (for a few hosts), the compile wait."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    counts: Dict[str, int] = {}
    for i in range(b.hosts):
        counts[b.state.get(i, "placed")] = counts.get(b.state.get(i, "placed"), 0) + 1
    names = ["placed"] + [n for _, n in HOST_STATES]
    head = Text(f"attempt {b.attempt}: {b.hosts} hosts | " if b.attempt is not None else f"{b.hosts} hosts | ")
    head.append(", ".join(f"{counts[n]} {n}" for n in names if counts.get(n)))
    if b.restored is not None:
        head.append(f" | restored step {b.restored}")
    parts = [head]
    if 0 < b.hosts <= MAX_HOST_ROWS:
        rows = Table.grid(padding=(0, 2))
        for i in range(b.hosts):
            since = b.since.get(i)
            rows.add_row(f"  host {i}", b.names.get(i, ""), b.state.get(i, "placed"),
                         f"{now - since:.1f}s" if isinstance(since, (int, float)) else "")
        parts.append(rows)
    if b.hosts and all(b.state.get(i) in ("compiling", "training") for i in range(b.hosts)):
        ready = [b.since[i] for i in range(b.hosts) if b.state.get(i) == "compiling" and b.since.get(i)]
        if ready:
            parts.append(Text(f"compiling the train step (the first step includes it): {now - min(ready):.1f}s"))
    return Group(*parts)


class Progress:
    """Host 0's progress for the launcher's terminal: the live view on a terminal, else the plain lines."""

    def __init__(self, run_dir: str, total_steps: int, out=None, live: Optional[bool] = None, poll_s: float = 0.2):
        self.run_dir, self.total = run_dir, int(total_steps)
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self._files: Dict[str, tuple] = {}  # name -> (size, records): files are re-read only when they grow
        self._console = self._view = None
        self.tail = LogTail(runfiles.host_log(run_dir, 0), out=self.out, poll_s=poll_s,
                            on_line=self._host_line if self.live else None)

    def start(self) -> "Progress":
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.out)
            # The launcher's own prints (stdout and stderr) go above the bar while it is live.
            self._view = Live(get_renderable=self.render, console=self._console, refresh_per_second=2)
            self._view.start()
        self.tail.start()
        return self

    def stop(self) -> None:
        self.tail.stop()
        if self._view is not None:
            self._view.stop()  # leaves the last view on the screen
            self._view = None

    def _host_line(self, line: str) -> None:
        if not STEP_LINE.match(line):
            self._console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _records(self, name: str) -> List[dict]:
        file = runfiles.path(self.run_dir, name)
        try:
            size = os.path.getsize(file)
        except OSError:
            return []
        cached = self._files.get(name)
        if cached is None or cached[0] != size:
            cached = (size, runfiles.read_jsonl(file))
            self._files[name] = cached
        return cached[1]

    def render(self):
        """The live view now: hosts coming up (until every host of the attempt trains), then the bar."""
        from rich.console import Group

        up = bringup(self._records(runfiles.EVENTS))
        beat = runfiles.read_json(runfiles.heartbeat_file(self.run_dir, 0))
        if beat is not None and up.attempt is not None and beat.get("attempt") != up.attempt:
            beat = None
        parts = [] if up.training else [render_bringup(up, time.time())]
        if up.training or (beat is not None and (beat.get("step") or 0) > 0):
            parts.append(render_bar(bar(self._records(runfiles.METRICS), self.total, up.started, beat)))
        return Group(*parts)
