"""Launch benchmark: the whole command -> first step on every host, this launcher vs Ray Train's JaxTrainer.

Both sides are one whole command started by this script as a subprocess on this machine; the time is from just
before `Popen` to the first finished step of the last host to finish one (max over hosts), for 1, 2 and 4 hosts
(`--hosts`) of `--devices` CPU devices each.

- Ours: `python -m launcher +cluster=local cluster.hosts=N cluster.devices_per_host=D model=... trainer.steps=...`
  (bench/recovery.py's Launch); the first step per host is the trainer's `first_step` event in
  `${run.dir}/events.jsonl`. The run then finishes its few steps (final eval and checkpoint) before the next run.
  The trainer runs as shipped: the persistent compilation cache (`trainer.compile_cache=auto`) is on, so a
  program compiled on this machine before starts warm; each round's cache hits and misses are in the JSON
  (`--set trainer.compile_cache=off` for a cold start every time).
- Ray Train: `python bench/jaxtrainer.py SPEC` -- a `ray.cluster_utils.Cluster` with N fake TPU v4 hosts
  (resources and labels of FIELD-NOTES recipe 4), then `JaxTrainer(..., ScalingConfig(use_tpu=True, num_workers=N,
  topology="2x2x<N>", accelerator_type="TPU-V4")).fit()`, whose train loop builds the same mesh, TransformerLM,
  AdamW, sharded state and jitted sharded step from the same composed config (random tokens of the same global
  batch instead of our data loader) and records the time its first step finished.

The sides alternate (ours first in odd rounds, Ray Train first in even ones), `--rounds` times per host count;
medians are compared (ratio = ours / Ray Train; below 1 is faster). Each side's milestones (max over hosts) are
kept as a breakdown. Ends with one JSON line. Speed goals live here; the tests never assert wall-clock times.
Needs the bench extra (`pip install -e ".[test,tpu,bench]"`, for `ray[train]`).

    python bench/launch.py                    # 1, 2 and 4 hosts x 2 devices, 2 rounds each (model=tiny)
    python bench/launch.py --quick            # smoke: 1 and 2 hosts, 1 round
    python bench/launch.py --hosts 2 --rounds 3 --model small --json out.json
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

from _jsonline import add_json_arg, emit  # noqa: E402 - bench/_jsonline.py, next to this file
from _quiet import wait_until_quiet  # noqa: E402 - bench/_quiet.py, next to this file
from recovery import BenchError, Launch, read_jsonl  # noqa: E402 - bench/recovery.py, next to this file

OURS_MILESTONES = ("ray_ready", "hosts_placed", "process_start", "distributed_ready", "ready",
                   "first_step")
REF_MILESTONES = ("driver_start", "cluster_up", "fit_start", "worker_start", "ready", "first_step")


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("JAX_PLATFORMS", "cpu")
    return e


def milestones(events: List[dict], names, key: str) -> Dict[str, float]:
    """Per milestone: the latest host's first occurrence of it (key: the field naming the host)."""
    out = {}
    for name in names:
        first: Dict[object, float] = {}
        for e in events:
            if e.get("event") == name:
                first.setdefault(e.get(key), e["time"])
        if first:
            out[name] = max(first.values())
    return out


def breakdown(t0: float, marks: Dict[str, float], names) -> Dict[str, float]:
    """Seconds from the previous milestone present (the first from t0), keyed `to_<milestone>`."""
    out, prev = {}, t0
    for name in names:
        if name in marks:
            out[f"to_{name}"] = round(marks[name] - prev, 3)
            prev = marks[name]
    return out


def base_overrides(a, hosts: int) -> List[str]:
    return ["+cluster=local", f"cluster.hosts={hosts}", f"cluster.devices_per_host={a.devices}", f"model={a.model}",
            f"trainer.steps={a.steps}", f"trainer.batch_size={a.batch}", f"trainer.log_every={a.steps}",
            "trainer.eval_every=0", "trainer.eval_batches=1", f"checkpoint.every={a.steps}", *a.set]


def ours(a, hosts: int, run_dir: str) -> dict:
    launch = Launch(run_dir, base_overrides(a, hosts))
    try:
        deadline = launch.started + a.timeout
        while True:
            events = launch.events()
            firsts = {e["host"]: e for e in events if e.get("event") == "first_step" and isinstance(e.get("host"), int)}
            if len(firsts) == hosts:
                break
            launch.check_alive("before every host's first step")
            if time.time() > deadline:
                raise BenchError(f"no first step on every host after {a.timeout:.0f}s; output "
                                 f"({launch.out_path}) ends:\n{launch.output()}")
            time.sleep(0.05)
        launch.wait(a.timeout)
    except BaseException:
        launch.stop()
        raise
    marks = milestones(events, OURS_MILESTONES, "host")
    cache = [e.get("compile_cache") for e in sorted(firsts.values(), key=lambda e: e["host"])]
    return {"total_s": round(marks["first_step"] - launch.started, 3),
            "phases": breakdown(launch.started, marks, OURS_MILESTONES), "compile_cache": cache,
            "run_dir": run_dir}


def compose(a, hosts: int, path: str) -> str:
    from launcher.config import compose_config, to_yaml

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(to_yaml(compose_config(base_overrides(a, hosts))))
    return path


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group the driver leads (it and the Ray nodes it began)."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


class RefRun:
    """`python bench/jaxtrainer.py SPEC` in the background (its own process group), output in `<dir>/out.txt`."""

    def __init__(self, run_dir: str, spec: dict):
        os.makedirs(run_dir, exist_ok=True)
        self.dir = run_dir
        self.events_path = os.path.join(run_dir, "events.jsonl")
        spec = {"events": self.events_path, "storage": os.path.join(run_dir, "storage"), "name": "bench", **spec}
        spec_path = os.path.join(run_dir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        self.out_path = os.path.join(run_dir, "out.txt")
        self.out = open(self.out_path, "w")
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, os.path.join(BENCH, "jaxtrainer.py"), spec_path], cwd=ROOT,
                                     env=env(), stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    def events(self) -> List[dict]:
        return read_jsonl(self.events_path)

    def output(self, chars: int = 3000) -> str:
        self.out.flush()
        with open(self.out_path, errors="replace") as f:
            return f.read()[-chars:]

    def check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the JaxTrainer driver exited ({self.proc.returncode}) {what}; its output "
                             f"({self.out_path}) ends:\n{self.output()}")

    def wait_for(self, cond, what: str, timeout: float, poll_s: float = 0.05):
        deadline = time.time() + timeout
        while True:
            value = cond(self.events())
            if value:
                return value
            self.check_alive(f"while waiting for {what}")
            if time.time() > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}; output ({self.out_path}) "
                                 f"ends:\n{self.output()}")
            time.sleep(poll_s)

    def finish(self, timeout: float) -> dict:
        """Wait for the driver to exit 0 with a fit that ended without an error; returns its fit_end record."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(f"the JaxTrainer driver did not finish in {timeout:.0f}s; output ({self.out_path}) "
                             f"ends:\n{self.output()}") from None
        self.out.close()
        end = next((e for e in self.events() if e.get("event") == "fit_end"), None)
        if code != 0 or end is None or end.get("error"):
            raise BenchError(f"the JaxTrainer driver exited {code} (fit_end {end}); output ({self.out_path}) ends:\n"
                             f"{self.output()}")
        return end

    def stop(self) -> None:
        stop_group(self.proc)
        self.out.close()


def reference(a, hosts: int, run_dir: str) -> dict:
    config = compose(a, hosts, os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".yaml"))
    run = RefRun(run_dir, {"hosts": hosts, "devices": a.devices, "config": config, "ckpt_every": 0,
                           "max_failures": 0, "slice": f"tpu-bench-{hosts}"})
    try:
        events = run.wait_for(lambda ev: ev if len({e["rank"] for e in ev if e.get("event") == "first_step"}) == hosts
                              else None, "every worker's first step", a.timeout)
        run.finish(a.timeout)
    except BaseException:
        run.stop()
        raise
    marks = milestones(events, REF_MILESTONES, "rank")
    return {"total_s": round(marks["first_step"] - run.started, 3),
            "phases": breakdown(run.started, marks, REF_MILESTONES), "run_dir": run_dir}


def _median_phases(runs: List[dict]) -> Dict[str, float]:
    keys = [k for k in runs[0]["phases"] if all(k in r["phases"] for r in runs)]
    return {k: round(statistics.median(r["phases"][k] for r in runs), 3) for k in keys}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/launch.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke version: --hosts 1,2 --rounds 1")
    p.add_argument("--hosts", default=None, help="host counts, comma-separated (default 1,2,4)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of both sides per host count "
                                                            "(default 2)")
    p.add_argument("--devices", type=int, default=2, help="CPU devices per host (default 2)")
    p.add_argument("--model", default="tiny", help="model config (default tiny)")
    p.add_argument("--batch", type=int, default=16, help="global batch (default 16)")
    p.add_argument("--steps", type=int, default=2, help="trainer.steps of every run (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another override for both sides' config (repeatable)")
    p.add_argument("--workdir", default=None, help="where runs go (default runs/bench/launch-<time>)")
    p.add_argument("--timeout", type=float, default=600, help="seconds any single wait may take (default 600)")
    add_json_arg(p)
    a = p.parse_args(argv)
    a.hosts = a.hosts or ("1,2" if a.quick else "1,2,4")
    a.rounds = a.rounds or (1 if a.quick else 2)
    hosts_list = [int(h) for h in a.hosts.split(",")]
    workdir = os.path.abspath(a.workdir or os.path.join(ROOT, "runs", "bench", time.strftime("launch-%Y%m%d-%H%M%S")))
    os.makedirs(workdir, exist_ok=True)
    print(f"[bench] launch: hosts {hosts_list} x {a.devices} CPU devices, model={a.model}, batch {a.batch}, "
          f"{a.rounds} round(s); runs in {workdir}", flush=True)
    out = {"bench": "launch", "time": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "quick": a.quick,
           "model": a.model, "devices_per_host": a.devices, "batch": a.batch, "set": a.set, "workdir": workdir,
           "hosts": {}, "ratios": {}}
    t0 = time.time()
    try:
        for hosts in hosts_list:
            res = {"ours": [], "ray_train": []}
            for r in range(a.rounds):
                sides = ("ours", "ray_train") if r % 2 == 0 else ("ray_train", "ours")
                for side in sides:
                    run_dir = os.path.join(workdir, f"{side}-{hosts}h-r{r + 1}")
                    wait_until_quiet()  # the previous side's Ray processes may still be exiting
                    x = ours(a, hosts, run_dir) if side == "ours" else reference(a, hosts, run_dir)
                    res[side].append(x)
                    print(f"[bench] {hosts} host(s) round {r + 1} {side}: {x['total_s']:.2f} s to the first step on "
                          f"every host | {x['phases']}", flush=True)
            o = statistics.median(x["total_s"] for x in res["ours"])
            t = statistics.median(x["total_s"] for x in res["ray_train"])
            out["hosts"][str(hosts)] = {
                "ours_s": round(o, 3), "ray_train_s": round(t, 3), "ratio": round(o / t, 4),
                "each": {"ours": [x["total_s"] for x in res["ours"]],
                         "ray_train": [x["total_s"] for x in res["ray_train"]]},
                "phases": {"ours": _median_phases(res["ours"]), "ray_train": _median_phases(res["ray_train"])},
                "ours_compile_cache": [x["compile_cache"] for x in res["ours"]]}
            out["ratios"][str(hosts)] = round(o / t, 4)
            print(f"[bench] {hosts} host(s): ours {o:.2f} s, JaxTrainer {t:.2f} s, ratio {o / t:.3f}", flush=True)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out["bench_wall_s"] = round(time.time() - t0, 1)
    emit(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
