"""Recovery benchmark against Ray Train: SIGKILL of one host's process -> first step of the next attempt, this launcher
vs `JaxTrainer` with `FailureConfig`, and the steps each side loses.

Both sides train the same model (`--model`, default tiny) on 2 hosts x 2 CPU devices for 3 x `--ckpt-every` steps,
checkpointing every `--ckpt-every` steps, and have host 1's process SIGKILLed once, `--kill-offset` steps past the
first checkpoint (once that checkpoint is complete); the time is from the kill to the first finished step of the
next attempt on every host (max over hosts).

- Ours: bench/recovery.py's recovery part with one kill (the real CLI on the local pod, host 1's trainer pid from
  its heartbeat, supervisor.backoff_s=0 and watchdog.heartbeat_s=0.1 as there), with its phase breakdown.
- Ray Train: bench/jaxtrainer.py with `FailureConfig(max_failures=1)`: the train loop reports a checkpoint (rank 0
  writes the replicated state; `ray.train.report` on every rank) every `--ckpt-every` steps and restores from
  `ray.train.get_checkpoint()`; rank 1's worker process (its pid from the loop's own step records) is SIGKILLed.
  Ray Train as shipped: its controller checks worker health every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).
  Phases: kill -> every new worker in the train function (detection, teardown, a new worker group, Ray's
  jax.distributed join), -> restored, -> ready (state on the mesh), -> first step (compile included).

Steps lost = the last step the killed attempt finished minus the step the next attempt resumed from. The sides
alternate (ours first in odd rounds), `--rounds` times; medians are compared (ratio = ours / Ray Train). Ends with
one JSON line. Needs the bench extra (`pip install -e ".[test,tpu,bench]"`). The tests never assert times.

    python bench/recovery_vs.py               # 2 rounds
    python bench/recovery_vs.py --quick       # smoke: 1 round
"""
import argparse
import os
import signal
import statistics
import sys
import time
from types import SimpleNamespace
from typing import List

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

import recovery  # noqa: E402 - bench/recovery.py
from _jsonline import add_json_arg, emit  # noqa: E402 - bench/_jsonline.py
from _quiet import wait_until_quiet  # noqa: E402 - bench/_quiet.py
from launch import RefRun  # noqa: E402 - bench/launch.py
from recovery import BenchError  # noqa: E402

HOSTS, DEVICES = recovery.HOSTS, 2
REF_PHASES = ("restart_s", "restore_s", "ready_s", "compile_first_step_s")


def base_overrides(a) -> List[str]:
    return [f"model={a.model}", f"checkpoint.every={a.ckpt_every}", "trainer.log_every=10", "trainer.eval_every=500",
            f"supervisor.backoff_s={a.backoff:g}", f"watchdog.heartbeat_s={a.heartbeat:g}", *a.set]


def ours(a, workdir: str) -> dict:
    args = SimpleNamespace(ckpt_every=a.ckpt_every, kill_offset=a.kill_offset, kills=1, timeout=a.timeout)
    rec = recovery.bench_recovery(args, base_overrides(a), workdir)
    k = rec["kills"][0]
    return {"total_s": k["total_s"], "lost_steps": k["lost_steps"], "kill_step": k["kill_step"],
            "resumed_from": k["resumed_from"], "phases": {p: k[p] for p in recovery.PHASES}, "run_dir": rec["run_dir"]}


def reference(a, run_dir: str) -> dict:
    from launcher.config import compose_config, to_yaml

    every, offset = a.ckpt_every, a.kill_offset
    steps = 3 * every
    config = run_dir + ".yaml"
    os.makedirs(os.path.dirname(config), exist_ok=True)
    with open(config, "w") as f:
        f.write(to_yaml(compose_config(["+cluster=local", f"cluster.hosts={HOSTS}",
                                        f"cluster.devices_per_host={DEVICES}", *base_overrides(a),
                                        f"trainer.steps={steps}"])))
    run = RefRun(run_dir, {"hosts": HOSTS, "devices": DEVICES, "config": config, "ckpt_every": every,
                           "max_failures": 1, "slice": "tpu-bench-recovery"})
    print(f"[bench] JaxTrainer recovery: {steps} steps, SIGKILL rank 1 at step {every + offset}; dir {run_dir}",
          flush=True)
    try:
        def ready(ev):
            saved = any(e.get("event") == "checkpoint" and e.get("step", 0) >= every for e in ev)
            mine = [e for e in ev if e.get("event") == "step" and e.get("rank") == 1]
            return mine[-1] if saved and mine and mine[-1]["step"] >= every + offset else None

        beat = run.wait_for(ready, f"rank 1 at step {every + offset} after the checkpoint at {every}", a.timeout,
                            poll_s=0.02)
        t_kill = time.time()
        os.kill(int(beat["pid"]), signal.SIGKILL)
        old = {e["pid"] for e in run.events() if "pid" in e}
        print(f"[bench]   SIGKILL rank 1 (pid {beat['pid']}) at step {beat['step']}", flush=True)

        def resumed(ev):
            firsts = {e["rank"] for e in ev if e.get("event") == "first_step" and e.get("pid") not in old}
            return ev if len(firsts) == HOSTS else None

        events = run.wait_for(resumed, "the first step of the next attempt", a.timeout, poll_s=0.1)
        run.finish(a.timeout + steps * 5)
    except BaseException:
        run.stop()
        raise
    new = [e for e in events if e.get("pid") not in old and "rank" in e]

    def latest(name):
        first = {}
        for e in new:
            if e.get("event") == name:
                first.setdefault(e["rank"], e["time"])
        return max(first.values()) if len(first) == HOSTS else None

    marks = [t_kill, latest("worker_start"), latest("restore"), latest("ready"), latest("first_step")]
    phases = {}
    prev = t_kill
    for key, t in zip(REF_PHASES, marks[1:]):
        if t is not None:
            phases[key] = round(t - prev, 3)
            prev = t
    reached = max(e["step"] for e in run.events() if e.get("event") == "step" and e.get("pid") in old)
    restored = next((e.get("step") for e in new if e.get("event") == "restore"), None)
    return {"total_s": round(marks[-1] - t_kill, 3), "lost_steps": reached - restored if restored is not None else None,
            "kill_step": beat["step"], "failed_last_step": reached, "resumed_from": restored, "phases": phases,
            "run_dir": run_dir}


def _median_phases(runs: List[dict]) -> dict:
    keys = [k for k in runs[0]["phases"] if all(k in r["phases"] for r in runs)]
    return {k: round(statistics.median(r["phases"][k] for r in runs), 3) for k in keys}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/recovery_vs.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke version: --rounds 1")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of both sides (default 2)")
    p.add_argument("--model", default="tiny", choices=("tiny", "small"))
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint interval, both sides (default 50)")
    p.add_argument("--kill-offset", type=int, default=None, help="steps past the checkpoint to kill at "
                                                                 "(default ckpt-every / 2)")
    p.add_argument("--backoff", type=float, default=0.0, help="our supervisor.backoff_s (default 0)")
    p.add_argument("--heartbeat", type=float, default=0.1, help="our watchdog.heartbeat_s (default 0.1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another override for both sides' config (repeatable)")
    p.add_argument("--workdir", default=None, help="where runs go (default runs/bench/recovery-vs-<time>)")
    p.add_argument("--timeout", type=float, default=600, help="seconds any single wait may take (default 600)")
    add_json_arg(p)
    a = p.parse_args(argv)
    a.rounds = a.rounds or (1 if a.quick else 2)
    if a.kill_offset is None:
        a.kill_offset = max(1, a.ckpt_every // 2)
    if not 0 < a.kill_offset < a.ckpt_every:
        p.error("--kill-offset must lie between 0 and --ckpt-every")
    workdir = os.path.abspath(a.workdir or os.path.join(ROOT, "runs", "bench",
                                                        time.strftime("recovery-vs-%Y%m%d-%H%M%S")))
    os.makedirs(workdir, exist_ok=True)
    print(f"[bench] recovery vs JaxTrainer: {HOSTS} hosts x {DEVICES} CPU devices, model={a.model}, checkpoint every "
          f"{a.ckpt_every}, kill {a.kill_offset} past it, {a.rounds} round(s); runs in {workdir}", flush=True)
    res = {"ours": [], "ray_train": []}
    t0 = time.time()
    try:
        for r in range(a.rounds):
            for side in (("ours", "ray_train") if r % 2 == 0 else ("ray_train", "ours")):
                d = os.path.join(workdir, f"{side}-r{r + 1}")
                wait_until_quiet()  # the previous side's Ray processes may still be exiting
                x = ours(a, d) if side == "ours" else reference(a, d)
                res[side].append(x)
                print(f"[bench] round {r + 1} {side}: kill -> first resumed step {x['total_s']:.2f} s, "
                      f"{x['lost_steps']} steps lost | {x['phases']}", flush=True)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    o = statistics.median(x["total_s"] for x in res["ours"])
    t = statistics.median(x["total_s"] for x in res["ray_train"])
    out = {"bench": "recovery_vs", "time": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "quick": a.quick,
           "model": a.model, "hosts": HOSTS, "devices_per_host": DEVICES, "ckpt_every": a.ckpt_every,
           "kill_offset": a.kill_offset, "overrides": base_overrides(a), "workdir": workdir,
           "ours_s": round(o, 3), "ray_train_s": round(t, 3), "ratio": round(o / t, 4),
           "lost_steps": {"ours": [x["lost_steps"] for x in res["ours"]],
                          "ray_train": [x["lost_steps"] for x in res["ray_train"]]},
           "each": {k: [x["total_s"] for x in v] for k, v in res.items()},
           "phases": {k: _median_phases(v) for k, v in res.items()},
           "bench_wall_s": round(time.time() - t0, 1)}
    print(f"[bench] kill -> first resumed step: ours {o:.2f} s, JaxTrainer {t:.2f} s, ratio {o / t:.3f}; steps lost "
          f"ours {out['lost_steps']['ours']}, JaxTrainer {out['lost_steps']['ray_train']}", flush=True)
    emit(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
