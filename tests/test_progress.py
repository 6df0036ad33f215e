"""Tests for the launcher's progress view (launcher/progress.py): the hosts coming up and the live bar rendered from
real record shapes, host 0's other lines above the bar on a terminal, and the plain `[host 0]` lines elsewhere."""
import io
import os
import time

from rich.console import Console

from launcher.progress import Progress, bar, bringup, render_bar, render_bringup
from trainer import runfiles

T0 = 1_800_000_000.0


def _text(renderable, width: int = 160) -> str:
    console = Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def _step(step: int, t: float, loss: float, tokens: float = 12000.0, **extra) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "step_time_s": 0.1, "tokens_per_s": tokens,
            "time": t, "data_wait_s": 0.0, **extra}


def _events(attempt: int, t: float, states=("process_start", "distributed_ready", "ready")) -> list:
    evs = [{"event": "hosts_placed", "host": "launcher", "time": t,
            "hosts": [{"hostname": "vm", "ip": f"10.0.0.{i}", "slice": 0, "worker_id": i} for i in range(2)]},
           {"event": "attempt_start", "host": "launcher", "attempt": attempt, "time": t + 0.1}]
    for n, kind in enumerate(states):
        for host in range(2):
            evs.append({"event": kind, "host": host, "attempt": attempt, "time": t + 1 + n})
    return evs


def test_bar_shows_step_total_rate_tokens_loss_mfu_and_eta():
    records = [_step(1, T0, 6.0, tokens=100.0, includes_compile=True)] + [
        _step(s, T0 + 10 + (s - 2) * 0.5, 6.0 - s / 10, tokens=11000.0 + s, mfu=0.25) for s in range(2, 13, 2)]
    records.append({"split": "val", "step": 12, "eval_loss": 5.0, "time": T0 + 20})  # an eval record: not a step
    b = bar(records, total=40)
    assert (b.step, b.total, b.loss, b.tokens_per_s, b.mfu) == (12, 40, 6.0 - 1.2, 11012.0, 0.25)
    assert abs(b.rate - 2.0) < 1e-9  # 2 steps per 0.5 s over the steady records, the compile step left out
    assert abs(b.eta_s - 14.0) < 1e-9  # 28 steps left at 2 steps/s
    text = _text(render_bar(b))
    for part in ("step 12/40", "2.00 steps/s", "11,012 tok/s", "loss 4.8000", "MFU 25.0%", "ETA 0:00:14"):
        assert part in text, (part, text)
    assert "━" in text  # the bar itself
    narrow = _text(render_bar(b), width=50)
    assert narrow.count("\n") == 1 and narrow.startswith("step 12/40 2.00 steps/s")  # one line, never wrapped


def test_bar_follows_the_heartbeat_and_only_the_current_attempt():
    old = [_step(s, T0 + s, 5.0) for s in range(2, 21, 2)]  # attempt 0 got to step 20, then failed
    new = [_step(11, T0 + 100, 4.5, includes_compile=True), _step(12, T0 + 101, 4.4)]
    b = bar(old + new, total=30, since=T0 + 90, beat={"attempt": 1, "step": 13, "time": T0 + 101.5})
    assert b.step == 13 and b.loss == 4.4  # the heartbeat's step, the latest record's loss
    assert abs(b.rate - 10.0) < 1e-9 and abs(b.eta_s - 1.7) < 1e-9  # one steady record: 1 / step_time_s
    no_mfu = _text(render_bar(b))
    assert "MFU" not in no_mfu and "step 13/30" in no_mfu and "ETA 0:00:02" in no_mfu
    assert "ETA -:--:--" in _text(render_bar(bar([], total=30)))  # nothing measured yet: no guess


def test_hosts_coming_up_then_compiling():
    evs = _events(0, T0, states=("process_start", "distributed_ready"))
    evs.append({"event": "ready", "host": 0, "attempt": 0, "time": T0 + 3, "step": 0})
    up = bringup(evs)
    assert up.hosts == 2 and up.state == {0: "compiling", 1: "joined"} and not up.training
    text = _text(render_bringup(up, now=T0 + 5))
    assert "attempt 0: 2 hosts" in text and "1 joined" in text and "1 compiling" in text
    assert "host 0" in text and "vm/10.0.0.1" in text and "compiling" in text
    evs.append({"event": "ready", "host": 1, "attempt": 0, "time": T0 + 4, "step": 0})
    assert "compiling the train step" in _text(render_bringup(bringup(evs), now=T0 + 6))
    evs += [{"event": "first_step", "host": h, "attempt": 0, "time": T0 + 9, "step": 1} for h in range(2)]
    assert bringup(evs).training


def test_a_restart_brings_the_hosts_up_again():
    evs = _events(0, T0, states=("process_start", "distributed_ready", "ready", "first_step"))
    assert bringup(evs).training
    evs.append({"event": "failure", "host": "launcher", "attempt": 0, "cause": "crash", "time": T0 + 20})
    evs.append({"event": "attempt_start", "host": "launcher", "attempt": 1, "time": T0 + 21})
    evs.append({"event": "process_start", "host": 0, "attempt": 0, "time": T0 + 21.5})  # a straggler of attempt 0
    evs.append({"event": "process_start", "host": 1, "attempt": 1, "time": T0 + 22})
    evs.append({"event": "restore", "host": 0, "attempt": 1, "time": T0 + 23, "step": 10})
    up = bringup(evs)
    assert up.attempt == 1 and up.state == {0: "restored", 1: "started"} and not up.training
    assert "restored step 10" in _text(render_bringup(up, now=T0 + 24))


def _run_dir(tmp_path) -> str:
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, runfiles.LOGS))
    open(runfiles.host_log(run, 0), "w").close()
    return run


def _wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.05)


LINES = ["[Gloo] Rank 0 is connected to 1 peer ranks.",  # not host 0's: never echoed
         "[host 0] model tiny: 147776 params | mesh {'data': 4}",
         "[host 0] step 2/4 | loss 5.2408 | lr 2.25e-03 | 11657 tok/s | step 0.044s",
         "[host 0] WARNING absl: something to see",
         "[host 0] eval val   step 4 | loss 4.0372 | ppl 56.67 | acc 0.1992",
         "[host 0] step 4/4 | loss 4.7509 | lr 3.00e-03 | 1536 tok/s | step 0.333s"]


def test_not_a_terminal_echoes_host_0_lines_exactly_as_before(tmp_path):
    run = _run_dir(tmp_path)
    out = io.StringIO()  # not a tty
    view = Progress(run, 4, out=out, poll_s=0.05).start()
    assert not view.live
    with open(runfiles.host_log(run, 0), "a") as f:
        f.write("\n".join(LINES) + "\n")
    _wait_for(lambda: "step 4/4" in out.getvalue(), "host 0's lines echoed")
    view.stop()
    assert out.getvalue() == "".join(line + "\n" for line in LINES if line.startswith("[host 0]"))


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_replaces_step_lines_and_other_lines_print_above(tmp_path):
    run = _run_dir(tmp_path)
    for e in _events(0, T0, states=("process_start", "distributed_ready", "ready", "first_step")):
        runfiles.append_jsonl(runfiles.path(run, runfiles.EVENTS), e)
    for r in (_step(1, T0 + 5, 6.4, includes_compile=True), _step(2, T0 + 6, 5.2408), _step(4, T0 + 7, 4.7509)):
        runfiles.append_jsonl(runfiles.path(run, runfiles.METRICS), r)
    out = _Tty()
    view = Progress(run, 4, out=out, poll_s=0.05).start()
    assert view.live
    with open(runfiles.host_log(run, 0), "a") as f:
        f.write("\n".join(LINES) + "\n")
    _wait_for(lambda: "eval val" in out.getvalue(), "host 0's eval line printed")
    view.stop()
    text = out.getvalue()
    assert "WARNING absl: something to see" in text and "[host 0] model tiny" in text
    assert "[host 0] step 2/4" not in text and "[Gloo]" not in text  # the bar shows the steps
    assert "step 4/4" in text and "loss 4.7509" in text and "2.00 steps/s" in text and "ETA 0:00:00" in text, text
