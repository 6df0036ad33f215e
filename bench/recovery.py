"""Recovery benchmark: SIGKILL of a host -> first resumed step, and goodput of a run preempted every N seconds.

Runs the real CLI (`python -m launcher`) on the local pod (2 hosts x 2 CPU devices) as a subprocess and hurts it
with real signals sent to the real trainer processes (their pids come from the hosts' heartbeats,
`${run.dir}/hosts/host-<i>.json`). Two parts, in one invocation:

1. Recovery. One long run (checkpoint every `--ckpt-every` steps); in attempt k host 1's trainer is SIGKILLed
   `--kill-offset` steps past the checkpoint at step (k+1) x ckpt_every, `--kills` times. For each kill, from
   `${run.dir}/events.jsonl`: kill -> first step of the next attempt (max over hosts), split at milestones
   (max over hosts) into detection (kill -> launcher `failure`), restart (`failure` -> next `attempt_start`,
   teardown and backoff included), spawn (-> `process_start`), jax init (-> `distributed_ready`), setup + restore
   (-> `restore`) and compile + first step (-> `first_step`); and the steps lost (the failed attempt's last step,
   from the goodput ledger, minus the step the next attempt resumed from).
2. Goodput under preemption. A short calibration run measures step rate and fixed overhead, from which
   trainer.steps is chosen so that an uninterrupted run takes about `--minutes` (or `--steps N`); then the same
   config runs twice, one after the other: uninterrupted, and with a preemption notice (SIGTERM to a random
   host's trainer, seeded) every `--every` seconds of wall time (a notice due while the pod is not training -- starting,
   restoring, compiling -- is sent as soon as it trains again; at most one per attempt). Both must complete with
   the same params_digest (exact resume). Prints goodput, badput buckets, restarts, lost steps, wall time of both
   and the ratio goodput_preempted / goodput_uninterrupted.

Every run gets model=tiny (`--model`), supervisor.backoff_s=0 (`--backoff`), watchdog.heartbeat_s=0.1
(`--heartbeat`) and any `--set KEY=VALUE`. Run dirs are kept under runs/bench/ (`--workdir`).
Speed goals live here, measured side by side in one run; the tests never assert wall-clock times.

    python bench/recovery.py                 # full: 3 kills; 8-minute runs preempted every 120 s
    python bench/recovery.py --quick         # smoke: --kills 1 --every 30 --minutes 2
    python bench/recovery.py --json out.json # also write the final JSON line to a file
"""
import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

from _jsonline import add_json_arg, emit  # bench/_jsonline.py, next to this file (the script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = 2  # the local pod: cluster/local.yaml, 2 hosts x 2 CPU devices


class BenchError(Exception):
    pass


def read_jsonl(path: str) -> List[dict]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n"):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being appended right now
                pass
    return out


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Launch:
    """`python -m launcher OVERRIDES` in the background, output in `<run_dir>.out`."""

    def __init__(self, run_dir: str, overrides: List[str]):
        self.run_dir = run_dir
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("JAX_PLATFORMS", "cpu")
        self.out_path = run_dir + ".out"
        self.out = open(self.out_path, "w")
        self.argv = [sys.executable, "-m", "launcher", f"run.name={os.path.basename(run_dir)}",
                     f"run.dir={run_dir}", *overrides]
        self.started = time.time()
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT)

    def file(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def beat(self, host: int) -> Optional[dict]:
        return read_json(self.file(os.path.join("hosts", f"host-{host}.json")))

    def events(self) -> List[dict]:
        return read_jsonl(self.file("events.jsonl"))

    def ledger(self) -> List[dict]:
        return read_jsonl(self.file("goodput.jsonl"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, chars: int = 3000) -> str:
        self.out.flush()
        with open(self.out_path, errors="replace") as f:
            return f.read()[-chars:]

    def check_alive(self, what: str) -> None:
        if not self.alive():
            raise BenchError(f"the launcher exited ({self.proc.returncode}) {what}; its output "
                             f"({self.out_path}) ends:\n{self.output()}")

    def wait(self, timeout: float) -> dict:
        """Wait for the launcher to exit 0; returns summary.json."""
        try:
            code = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(f"the launcher did not finish in {timeout:.0f}s; output ({self.out_path}) ends:\n"
                             f"{self.output()}") from None
        self.out.close()
        summary = read_json(self.file("summary.json"))
        if code != 0 or not summary or summary.get("status") != "completed":
            raise BenchError(f"the launcher exited {code} (summary status "
                             f"{(summary or {}).get('status')!r}); output ({self.out_path}) ends:\n{self.output()}")
        return summary

    def stop(self) -> None:
        """Ctrl-C the launcher (it stops its hosts), then SIGKILL it if it does not exit."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def _first(events: List[dict], event: str, **match) -> Optional[dict]:
    for e in events:
        if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
            return e
    return None


def _host_times(events: List[dict], event: str, attempt: int) -> Dict[int, float]:
    """event time per host (first occurrence) of one attempt."""
    out: Dict[int, float] = {}
    for e in events:
        if e.get("event") == event and e.get("attempt") == attempt and isinstance(e.get("host"), int):
            out.setdefault(e["host"], e["time"])
    return out


def _wait(cond, launch: Launch, what: str, timeout: float, poll_s: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        launch.check_alive(f"while waiting for {what}")
        time.sleep(poll_s)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}; output ({launch.out_path}) ends:\n"
                     f"{launch.output()}")


# -- part 1: SIGKILL -> first resumed step ---------------------------------------------------------------------

def bench_recovery(args, base: List[str], workdir: str) -> dict:
    every, offset, kills = args.ckpt_every, args.kill_offset, args.kills
    steps = (kills + 2) * every
    overrides = [*base, f"trainer.steps={steps}", f"supervisor.max_failures={kills + 1}"]
    launch = Launch(os.path.join(workdir, "recovery"), overrides)
    print(f"[bench] recovery: {steps} steps, SIGKILL host 1 at {kills} points; run dir {launch.run_dir}",
          flush=True)
    records = []
    try:
        attempt = None
        for k in range(kills):
            base_ckpt = (k + 1) * every
            target = base_ckpt + offset
            ckpt_dir = launch.file(os.path.join("checkpoints", str(base_ckpt)))

            def ready():
                b = launch.beat(1)
                if not b or b.get("exit") is not None or (attempt is not None and b.get("attempt") != attempt):
                    return None
                if (b.get("step") or 0) >= target and os.path.isdir(ckpt_dir):
                    return b
                return None

            beat = _wait(ready, launch, f"host 1 at step {target} (kill {k + 1})", args.timeout)
            attempt = beat["attempt"]
            t_kill = time.time()
            os.kill(int(beat["pid"]), signal.SIGKILL)
            print(f"[bench]   kill {k + 1}: SIGKILL host 1 (pid {beat['pid']}) of attempt {attempt} at step "
                  f"{beat['step']}", flush=True)
            nxt = attempt + 1

            def resumed():
                ev = launch.events()
                firsts = _host_times(ev, "first_step", nxt)
                return ev if len(firsts) == HOSTS else None

            events = _wait(resumed, launch, f"the first step of attempt {nxt}", args.timeout, poll_s=0.1)
            records.append(_breakdown(events, launch.ledger(), t_kill, attempt, int(beat["step"])))
            attempt = nxt
        summary = launch.wait(args.timeout + steps * 5)
    except BaseException:
        launch.stop()
        raise
    totals = [r["total_s"] for r in records]
    return {"run_dir": launch.run_dir, "steps": steps, "ckpt_every": every, "kill_offset": offset,
            "kills": records, "median_s": round(statistics.median(totals), 3),
            "median": {key: round(statistics.median(r[key] for r in records), 3) for key in PHASES},
            "lost_steps_per_kill": [r["lost_steps"] for r in records],
            "summary_lost_steps": summary.get("lost_steps"), "restarts": summary.get("restarts"),
            "goodput": summary.get("goodput"), "final_step": summary.get("final_step")}


PHASES = ("detect_s", "restart_s", "spawn_s", "jax_init_s", "restore_s", "compile_first_step_s")


def _breakdown(events: List[dict], ledger: List[dict], t_kill: float, attempt: int, kill_step: int) -> dict:
    nxt = attempt + 1
    failure = _first(events, "failure", host="launcher", attempt=attempt)
    start = _first(events, "attempt_start", host="launcher", attempt=nxt)
    if failure is None or start is None:
        raise BenchError(f"events.jsonl lacks the failure of attempt {attempt} or the start of attempt {nxt}")
    spawned = _host_times(events, "process_start", nxt)
    joined = _host_times(events, "distributed_ready", nxt)
    restored = _host_times(events, "restore", nxt) or _host_times(events, "ready", nxt)
    first = _host_times(events, "first_step", nxt)
    marks = [t_kill, failure["time"], start["time"], max(spawned.values()), max(joined.values()),
             max(restored.values()), max(first.values())]
    parts = {key: round(b - a, 3) for key, a, b in zip(PHASES, marks, marks[1:])}
    orbax = [e.get("seconds") for e in events if e.get("event") == "restore" and e.get("attempt") == nxt]
    last_step = next((r.get("last_step") for r in ledger if r.get("kind") == "failure"
                      and r.get("attempt") == attempt), None)
    resumed_from = next((r.get("step") for r in ledger if r.get("kind") == "start_step"
                         and r.get("attempt") == nxt), None)
    reached = max(s for s in (last_step, kill_step) if s is not None)
    return {"attempt": attempt, "kill_step": kill_step, "failed_last_step": last_step,
            "resumed_from": resumed_from, "lost_steps": (reached - resumed_from) if resumed_from is not None else None,
            "cause": failure.get("cause"), "total_s": round(marks[-1] - t_kill, 3), **parts,
            "orbax_restore_s": max((s for s in orbax if s is not None), default=None)}


# -- part 2: goodput under preemption -------------------------------------------------------------------------

def calibrate(args, base: List[str], workdir: str) -> dict:
    """Step rate and fixed overhead of the config, from a short run's goodput ledger: per step = steady step time
    plus the checkpoint saves' blocking time spread over their interval (the first save, which sets orbax up, and
    the final wait count as fixed); fixed = the run's wall time less steps x per step."""
    launch = Launch(os.path.join(workdir, "calibrate"), [*base, f"trainer.steps={args.calib_steps}"])
    print(f"[bench] calibration: {args.calib_steps} steps; run dir {launch.run_dir}", flush=True)
    try:
        summary = launch.wait(args.timeout + args.calib_steps * 5)
    except BaseException:
        launch.stop()
        raise
    ledger = launch.ledger()
    stepping = [r for r in ledger if r.get("kind") == "steps"]
    n = sum(r["to"] - r["from"] for r in stepping)
    if n <= 0:
        raise BenchError(f"the calibration run logged no steady steps ({launch.file('goodput.jsonl')})")
    saves = [r["blocking_s"] for r in ledger if r.get("kind") == "save" and r.get("step")][1:]
    save_s = statistics.median(saves) if saves else 0.0
    per_step = sum(r["seconds"] for r in stepping) / n + save_s / args.ckpt_every
    steps = int(summary["final_step"])
    fixed = float(summary["wall_s"]) - per_step * steps
    return {"run_dir": launch.run_dir, "steps": steps, "per_step_s": round(per_step, 5), "fixed_s": round(fixed, 2),
            "wall_s": summary["wall_s"]}


def run_plain(args, overrides: List[str], run_dir: str, expect_s: float) -> dict:
    launch = Launch(run_dir, overrides)
    print(f"[bench] uninterrupted run; run dir {launch.run_dir}", flush=True)
    try:
        summary = launch.wait(args.timeout + expect_s * 3)
    except BaseException:
        launch.stop()
        raise
    return summary


def run_preempted(args, overrides: List[str], run_dir: str, expect_s: float, steps: int):
    """The run with a preemption notice (SIGTERM to a random host's trainer) every args.every seconds."""
    rng = random.Random(args.seed)
    launch = Launch(run_dir, overrides)
    print(f"[bench] preempted run (SIGTERM every {args.every:g}s, seed {args.seed}); run dir {launch.run_dir}",
          flush=True)
    notices = []
    deadline = time.time() + args.timeout + expect_s * 4
    due, host, last_attempt = launch.started + args.every, rng.randrange(HOSTS), None
    try:
        while launch.alive():
            if time.time() > deadline:
                raise BenchError(f"the preempted run did not finish in time; output ({launch.out_path}) ends:\n"
                                 f"{launch.output()}")
            now = time.time()
            if now >= due:
                b = launch.beat(host)
                beats = [launch.beat(i) for i in range(HOSTS)]
                current = max((x.get("attempt", -1) for x in beats if x), default=-1)
                phase = str((b or {}).get("phase") or "")
                training = phase == "train" or phase.startswith("eval-val") or (
                    phase.startswith("save-") and phase[5:].isdigit())
                if (b and b.get("exit") is None and b.get("attempt") == current and current != last_attempt
                        and training and (b.get("step") or 0) < steps):
                    try:
                        os.kill(int(b["pid"]), signal.SIGTERM)
                    except ProcessLookupError:
                        time.sleep(0.05)
                        continue
                    notices.append({"t_s": round(now - launch.started, 2), "delay_s": round(now - due, 2),
                                    "host": host, "attempt": current, "step": b.get("step")})
                    print(f"[bench]   preemption {len(notices)} at {now - launch.started:.0f}s: SIGTERM host {host} "
                          f"(attempt {current}, step {b.get('step')})", flush=True)
                    last_attempt = current
                    due += args.every
                    while due <= now:  # a notice delayed past the next one's time: one notice, not a burst
                        due += args.every
                    host = rng.randrange(HOSTS)
            time.sleep(0.05)
        summary = launch.wait(60)
    except BaseException:
        launch.stop()
        raise
    return summary, notices


def bench_goodput(args, base: List[str], workdir: str) -> dict:
    if args.steps:
        cal, steps, expect = None, args.steps, args.minutes * 60.0
        print(f"[bench] goodput runs: trainer.steps={steps} (given, no calibration)", flush=True)
    else:
        cal = calibrate(args, base, workdir)
        target_s = args.minutes * 60.0
        steps = max(2 * args.ckpt_every, int(round((target_s - cal["fixed_s"]) / cal["per_step_s"])))
        expect = cal["fixed_s"] + steps * cal["per_step_s"]
        print(f"[bench]   {cal['per_step_s'] * 1000:.0f} ms/step, {cal['fixed_s']:.0f}s fixed: trainer.steps={steps} "
              f"for ~{expect / 60:.1f} min", flush=True)
    overrides = [*base, f"trainer.steps={steps}"]
    clean = run_plain(args, overrides, os.path.join(workdir, "uninterrupted"), expect)
    preempted, notices = run_preempted(args, overrides, os.path.join(workdir, "preempted"), expect, steps)
    keys = ("goodput", "badput", "restarts", "lost_steps", "wall_s", "final_step", "params_digest", "attempts")
    ratio = preempted["goodput"] / clean["goodput"] if clean.get("goodput") else None
    return {"calibration": cal, "steps": steps, "every_s": args.every, "seed": args.seed,
            "uninterrupted": {k: clean.get(k) for k in keys},
            "preempted": {**{k: preempted.get(k) for k in keys}, "notices": notices},
            "ratio": round(ratio, 4) if ratio is not None else None,
            "params_digest_match": bool(clean.get("params_digest"))
            and clean.get("params_digest") == preempted.get("params_digest")}


# -- report ---------------------------------------------------------------------------------------------------

def print_recovery(rec: dict) -> None:
    print()
    print(f"Recovery: SIGKILL of host 1 -> first step of the next attempt (max over hosts); {rec['steps']} steps, "
          f"checkpoint every {rec['ckpt_every']}, kill {rec['kill_offset']} steps past one")
    head = ("kill", "attempt", "step", "lost", "detect", "restart", "spawn", "jax init", "restore", "compile+1",
            "TOTAL")
    print("  " + "".join(f"{h:>10}" for h in head))
    for i, r in enumerate(rec["kills"], 1):
        row = [i, r["attempt"], r["kill_step"], r["lost_steps"]] + [f"{r[k]:.2f}" for k in PHASES] + \
              [f"{r['total_s']:.2f}"]
        print("  " + "".join(f"{str(x):>10}" for x in row))
    med = rec["median"]
    row = ["median", "", "", statistics.median(r["lost_steps"] or 0 for r in rec["kills"])] + \
        [f"{med[k]:.2f}" for k in PHASES] + [f"{rec['median_s']:.2f}"]
    print("  " + "".join(f"{str(x):>10}" for x in row))
    print("  seconds; detect = kill -> launcher 'failure', restart = -> next 'attempt_start' (teardown, backoff), "
          "spawn = -> 'process_start',\n  jax init = -> 'distributed_ready', restore = -> 'restore' (setup + orbax "
          "restore), compile+1 = -> 'first_step'")
    print(f"  kill -> first resumed step: median {rec['median_s']:.2f}s, each "
          f"{', '.join(format(r['total_s'], '.2f') for r in rec['kills'])}s; steps lost per kill "
          f"{rec['lost_steps_per_kill']} (summary.json lost_steps {rec['summary_lost_steps']}); "
          f"restarts {rec['restarts']}")


def print_goodput(gp: dict) -> None:
    cal = gp["calibration"]
    u, p = gp["uninterrupted"], gp["preempted"]
    print()
    how = (f"calibrated: {cal['per_step_s'] * 1000:.0f} ms/step, {cal['fixed_s']:.0f}s fixed" if cal
           else "given")
    print(f"Goodput under preemption: trainer.steps={gp['steps']} ({how}), SIGTERM to a random host every "
          f"{gp['every_s']:g}s (seed {gp['seed']}); the two runs one after the other")
    print(f"  {'':<36}{'uninterrupted':>15}{'preempted':>15}")

    def line(name, a, b):
        print(f"  {name:<36}{str(a):>15}{str(b):>15}")

    line("goodput", f"{u['goodput']:.4f}", f"{p['goodput']:.4f}")
    for bucket in u["badput"]:
        line(f"badput.{bucket} (s)", f"{u['badput'][bucket]:.2f}", f"{p['badput'].get(bucket, 0):.2f}")
    line("restarts", u["restarts"].get("total", 0), p["restarts"].get("total", 0))
    line("lost_steps", u["lost_steps"], p["lost_steps"])
    line("attempts", u["attempts"], p["attempts"])
    line("wall (s)", f"{u['wall_s']:.1f}", f"{p['wall_s']:.1f}")
    line("final_step", u["final_step"], p["final_step"])
    line("params_digest", (u["params_digest"] or "")[:12], (p["params_digest"] or "")[:12])
    print(f"  restarts by cause (preempted): {p['restarts']}")
    print("  notices: " + ("; ".join(f"{n['t_s']:.0f}s host {n['host']} step {n['step']}"
                                      + (f" (+{n['delay_s']:.0f}s)" if n["delay_s"] >= 1 else "")
                                      for n in p["notices"]) or "none"))
    ratio = gp["ratio"]
    print(f"  goodput ratio preempted / uninterrupted: {ratio:.3f}" if ratio is not None else "  ratio: n/a")
    print(f"  params_digest match (exact resume): {'yes' if gp['params_digest_match'] else 'NO'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/recovery.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke version: --kills 1 --every 30 --minutes 2")
    p.add_argument("--kills", type=int, default=None, help="SIGKILLs in the recovery run (default 3)")
    p.add_argument("--every", type=float, default=None, help="seconds between preemptions (default 120)")
    p.add_argument("--minutes", type=float, default=None, help="uninterrupted run length to calibrate for (default 8)")
    p.add_argument("--model", default="tiny", choices=("tiny", "small"))
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint.every (default 50)")
    p.add_argument("--kill-offset", type=int, default=None, help="steps past a checkpoint to kill at "
                                                                 "(default ckpt-every / 2)")
    p.add_argument("--calib-steps", type=int, default=None, help="steps of the calibration run (default 300)")
    p.add_argument("--steps", type=int, default=None, help="trainer.steps of the goodput runs (skips calibration)")
    p.add_argument("--backoff", type=float, default=0.0, help="supervisor.backoff_s for every run (default 0)")
    p.add_argument("--heartbeat", type=float, default=0.1, help="watchdog.heartbeat_s (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the preempted hosts' choice")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra launcher override for every run (repeatable)")
    p.add_argument("--only", choices=("recovery", "goodput"), help="run one part only")
    p.add_argument("--workdir", default=None, help="where the run dirs go (default runs/bench/recovery-<time>)")
    p.add_argument("--timeout", type=float, default=600, help="seconds any single wait may take (default 600)")
    add_json_arg(p)
    args = p.parse_args(argv)
    quick = {"kills": 1, "every": 30.0, "minutes": 2.0, "calib_steps": 150}
    full = {"kills": 3, "every": 120.0, "minutes": 8.0, "calib_steps": 300}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.kill_offset is None:
        args.kill_offset = max(1, args.ckpt_every // 2)
    if not 0 < args.kill_offset < args.ckpt_every:
        p.error("--kill-offset must lie between 0 and --ckpt-every")
    workdir = os.path.abspath(args.workdir or os.path.join(ROOT, "runs", "bench",
                                                           time.strftime("recovery-%Y%m%d-%H%M%S")))
    base = [f"model={args.model}", f"checkpoint.every={args.ckpt_every}", "trainer.log_every=10",
            "trainer.eval_every=500", f"supervisor.backoff_s={args.backoff:g}",
            f"watchdog.heartbeat_s={args.heartbeat:g}", *args.set]
    print(f"[bench] local pod {HOSTS} hosts x 2 CPU devices; overrides: {' '.join(base)}; run dirs in {workdir}",
          flush=True)
    result = {"bench": "recovery", "quick": args.quick, "model": args.model, "overrides": base,
              "workdir": workdir}
    t0 = time.time()
    try:
        if args.only in (None, "recovery"):
            result["recovery"] = bench_recovery(args, base, workdir)
        if args.only in (None, "goodput"):
            result["goodput"] = bench_goodput(args, base, workdir)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result["bench_wall_s"] = round(time.time() - t0, 1)
    if "recovery" in result:
        print_recovery(result["recovery"])
    if "goodput" in result:
        print_goodput(result["goodput"])
    ok = "goodput" not in result or result["goodput"]["params_digest_match"]
    result["ok"] = ok
    emit(result, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
