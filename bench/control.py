"""Control-path benchmark: the supervisor and the GCP provider at 1024 hosts (a v5p-8192), no JAX on the hosts.

What runs for real: the launcher's config composition, validation and plan (launcher/plan.py, whose pre-flight
AOT-compiles the step for the v5p:16x16x16 topology when libtpu is installed, else plans analytically); the GCP
provider (cluster/cloud.py, cluster/gcp.py) through the real google-cloud-tpu client against tests/tpu_api_server.py
(in its own process; it only serves state, no VM boots: one queued resource whose node gets 1024 network endpoints
when ACTIVE); and the supervisor's whole control loop, `Supervisor.supervise()` (launcher/supervisor.py) with
its Pod/SliceGroup placement (launcher/hosts.py), RunSync (launcher/runsync.py), Watch (launcher/watch.py),
classify and Budget (launcher/classify.py), and re-provisioning through the provider after a preemption.

What is simulated: Ray. There are no 1024 Ray nodes on this machine, so `ray` inside launcher.hosts, .watch,
.runsync and .supervisor is a stand-in (FakeRay below): a placement group is ready at once, each HostActor call
returns at once, `ray.wait` blocks for its timeout as Ray's does, `ray.nodes()` lists 1024 live nodes. Ray's own
costs at 1024 nodes (gang-scheduling 1024 bundles, 1024 actor starts, the GCS's answers to ray.nodes() and to the
drain query, the RPCs of RunSync's per-poll pulls) are NOT measured. The trainers are simulated by a second
process that keeps one real trainer/heartbeat.py `Heartbeat` per host (its writer thread, every
watchdog.heartbeat_s) in the host-local run directory a cloud host uses (cluster.host_run_root/<run>/host-<i>), and
steps every host once a second; the fake actors' `pull` reads those directories as HostActor.pull does on a host
(that read is host-side work: its CPU time is subtracted from the supervisor's).

Measured, in order:
  plan       compose + validate (launcher/validate.py) + make_plan (launcher/plan.py), for v5p-8192
  provision  CloudProvider.up(): create the queued resource -> ACTIVE, node READY with 1024 endpoints
             (the server moves one state per --tick-s; the provider polls every 0.5 s as it does against a test
             endpoint), with the number of API calls and the time spent in them
  place      supervise() start -> all 1024 trainers started: Pod (placement, worker-id order), prepare (each
             host's config, written through the actor), start (each host's argv and env)
  watch      the supervisor's process CPU (seconds per wall second, simulated host work subtracted) and RSS while
             watching 1024 heartbeats for --watch-s, and the work per Watch poll (RunSync.pull, heartbeat reads)
  detect     (a) a lost host: the TPU node PREEMPTED in the API server and host k's Ray node dead (its actor's
             ref fails, ray.nodes() shows it dead) at once -> Watch returns, then classify's verdict (after
             stop_all, the final codes and the provider's node states); then re-provision and restart of all
             1024 trainers. Ray's own time to declare a node dead (GCS health checks: 5 misses x 3 s by
             default) comes on top and is not in the figure.
             (b) one heartbeat stopped (no Ray death): the watchdog's hang verdict, minus the last progress time
             + watchdog.timeout_s (--watchdog-s, 10 s here in place of the default 600 s): the overhead.
The run's config: +cluster=v5p-32 with cluster.accelerator_type=v5p-8192, model=tiny with 8 heads and mesh.tensor=8,
batch 512 (the embedded corpus's val/test splits hold fewer records than one per chip), supervisor.backoff_s=0,
launcher.echo=false. Ends with one JSON line (--json PATH also writes it). Tests never assert these times.

    python bench/control.py                 # v5p-8192 (1024 hosts), 30 s of watching (~70 s here)
    python bench/control.py --quick         # v5p-128 (16 hosts), 5 s of watching: a smoke run
"""
import argparse
import functools
import json
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# --- child process: the Cloud TPU API test server -------------------------------------------------------------
def serve_tpu_api(tick_s: float) -> int:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tpu_api_server import TpuApiServer

    server = TpuApiServer(tick_s=tick_s)  # no on_ready callback: nodes go READY, nothing boots
    print(server.start(), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "preempt":
            server.preempt(args[0])
            print("ok", flush=True)
        elif cmd == "requests":
            print(json.dumps(len(server.requests)), flush=True)
        elif cmd == "quit":
            break
    server.stop()
    return 0


# --- child process: the simulated trainers' heartbeats --------------------------------------------------------
def simulate(heartbeat_s: float, step_s: float) -> int:
    """One trainer/heartbeat.py Heartbeat per started host, stepping every step_s. Commands on stdin:
    start ATTEMPT HOST DIR | kill HOST | stop HOST (answers: stopped HOST PROGRESS_TIME) | finish HOST CODE REASON."""
    from trainer.heartbeat import Heartbeat
    from trainer.runfiles import PHASE_TRAIN, read_json

    beats: Dict[int, list] = {}  # host -> [Heartbeat, step]
    lock = threading.Lock()

    def stepper():
        while True:
            time.sleep(step_s)
            with lock:  # a host stopped under the lock makes no progress after its stop
                for entry in beats.values():
                    entry[1] += 1
                    entry[0].beat(step=entry[1], phase=PHASE_TRAIN)

    threading.Thread(target=stepper, daemon=True).start()

    def drop(host: int) -> Optional[object]:
        with lock:
            entry = beats.pop(host, None)
        if entry is None:
            return None
        entry[0]._stop.set()  # the host is gone: its heartbeat thread writes no more (no exit record)
        return entry[0]

    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "start":
            attempt, host, run_dir = int(args[0]), int(args[1]), args[2]
            drop(host)
            hb = Heartbeat(run_dir, host, attempt, heartbeat_s).start()
            hb.beat(step=0, phase=PHASE_TRAIN)
            with lock:
                beats[host] = [hb, 0]
        elif cmd == "kill":
            drop(int(args[0]))
        elif cmd == "stop":  # answers with the last progress time the host's heartbeat file holds
            hb = drop(int(args[0]))
            if hb is not None and hb._thread is not None:
                hb._thread.join()
            beat = read_json(hb.path) if hb is not None else None
            print(f"stopped {args[0]} {(beat or {}).get('progress_time', 'nan')}", flush=True)
        elif cmd == "finish":
            with lock:
                entry = beats.pop(int(args[0]), None)
            if entry is not None:
                entry[0].finish(int(args[1]), args[2])
        elif cmd == "quit":
            break
    return 0


class Child:
    """A child process of this script, talked to by lines on stdin/stdout."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ,
                                     "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
        self.lines: "queue.Queue[str]" = queue.Queue()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def send(self, line: str) -> None:
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def expect(self, timeout: float = 60.0) -> str:
        return self.lines.get(timeout=timeout)

    def close(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - it is going away either way
            self.proc.kill()


# --- the stand-in for Ray --------------------------------------------------------------------------------------
class Ref:
    __slots__ = ("value", "error", "done")

    def __init__(self, value=None, done=False):
        self.value, self.error, self.done = value, None, done


class _Method:
    def __init__(self, fn):
        self.remote = fn


class FakeRay:
    """What launcher.hosts/.watch/.runsync/.supervisor call on `ray`, for a slice whose hosts are simulated."""

    def __init__(self, sim: Child):
        import ray

        self.exceptions = ray.exceptions
        self.sim = sim
        self.cond = threading.Condition()
        self.node_ids: List[str] = []
        self.dead: set = set()
        self.runs: Dict[int, Ref] = {}  # host -> the pending ref of its trainer's exit code
        self.started: Dict[int, float] = {}  # attempt -> when its last trainer was started
        self.bundles: List[int] = []  # bundles of each placement group asked for
        self.host_cpu = 0.0  # CPU seconds of host-side work done here (HostActor.pull's reads)
        self.waits: List[tuple] = []  # (start, work before it: seconds since the previous wait returned)
        self._last_wait_end: Optional[float] = None
        self._perm: List[int] = []
        self._next = 0

    # placement -------------------------------------------------------------------------------------------------
    def placement_group(self, bundles, strategy="PACK", name=""):
        """Fresh Ray nodes for a (re)provisioned slice; hosts come up in random order (SliceGroup sorts them)."""
        self.bundles.append(len(bundles))
        with self.cond:
            self.node_ids = [f"{random.getrandbits(224):056x}" for _ in bundles]
            self.dead = set()
        self._perm = list(range(len(bundles)))
        random.Random(len(self.bundles)).shuffle(self._perm)
        self._next = 0
        return type("PlacementGroup", (), {"ready": lambda _self: Ref(True, True)})()

    def remove_placement_group(self, pg) -> None:
        pass

    def actor_class(self):
        ray_ = self

        class HostActorClass:
            @staticmethod
            def options(**_):
                return HostActorClass

            @staticmethod
            def remote():
                worker = ray_._perm[ray_._next]
                ray_._next += 1
                return FakeActor(ray_, worker)

        return HostActorClass

    # the calls on ray ------------------------------------------------------------------------------------------
    def wait(self, refs, num_returns=1, timeout=None):
        start = time.time()
        if self._last_wait_end is not None:
            self.waits.append((start, start - self._last_wait_end))
        deadline = None if timeout is None else start + timeout
        with self.cond:
            while True:
                ready = [r for r in refs if r.done]
                left = None if deadline is None else deadline - time.time()
                if len(ready) >= num_returns or (left is not None and left <= 0):
                    break
                self.cond.wait(left)
        self._last_wait_end = time.time()
        return ready, [r for r in refs if not r.done]

    def get(self, ref, timeout=None):
        if isinstance(ref, list):
            return [self.get(r, timeout) for r in ref]
        with self.cond:
            if not self.cond.wait_for(lambda: ref.done, timeout):
                raise self.exceptions.GetTimeoutError(f"timed out after {timeout}s")
        if ref.error is not None:
            raise ref.error
        return ref.value

    def nodes(self):
        with self.cond:
            return [{"NodeID": nid, "Alive": nid not in self.dead, "NodeManagerAddress": f"10.0.{i // 250}.{i % 250}",
                     "Resources": {"CPU": 208.0, "TPU": 4.0, "memory": 4.0e11}} for i, nid in enumerate(self.node_ids)]

    def kill(self, actor) -> None:
        pass

    # what the bench does to the slice --------------------------------------------------------------------------
    def _resolve(self, host: int, value=None, error=None) -> bool:
        with self.cond:
            ref = self.runs.get(host)
            if ref is None or ref.done:
                return False
            ref.value, ref.error, ref.done = value, error, True
            self.cond.notify_all()
            return True

    def lose_host(self, host: int) -> None:
        """Host `host`'s VM is gone: its Ray node is dead, its actor's call fails, its heartbeat stops."""
        with self.cond:
            self.dead.add(self.node_ids[host])
        self._resolve(host, error=self.exceptions.RayActorError())
        self.sim.send(f"kill {host}")

    def complete(self) -> None:
        """Every live trainer exits 0 (its heartbeat records the exit first, as the trainer's does)."""
        for host in sorted(self.runs):
            if not self.runs[host].done:
                self.sim.send(f"finish {host} 0 done")
        time.sleep(0.5)
        for host in sorted(self.runs):
            self._resolve(host, value=0)


class FakeActor:
    """A HostActor whose host is simulated: calls return at once; `run` registers the trainer with the simulator."""

    def __init__(self, ray_: FakeRay, worker: int):
        self.ray, self.worker, self.host = ray_, worker, worker  # single slice: process id = worker id
        self.info = _Method(lambda: Ref({"worker_id": worker, "ip": f"10.0.{worker // 250}.{worker % 250}",
                                         "port": 8476, "hostname": f"t1v-n-{worker:04d}-w-{worker}",
                                         "node_id": ray_.node_ids[worker], "actor_pid": 1000 + worker}, True))
        self.prepare = _Method(lambda log_path, cwd, files=None, heartbeat_file=None, sync_names=():
                               Ref({"cleaned": [], "sizes": {n: 0 for n in sync_names}}, True))
        self.run = _Method(self._run)
        self.stop = _Method(self._stop)
        self.signal = _Method(lambda signum: Ref(True, True))
        self.fresh_port = _Method(lambda: Ref(8476, True))
        self.pid = _Method(self._pid)
        self.pull = _Method(self._pull)
        self.event_files = _Method(self._event_files)

    def _alive(self) -> bool:
        return self.ray.node_ids[self.worker] not in self.ray.dead

    def _dead_ref(self) -> Ref:
        ref = Ref(done=True)
        ref.error = self.ray.exceptions.RayActorError()
        return ref

    def _run(self, argv, env, log_path, cwd, cleaned=()):
        attempt, host = int(argv[argv.index("--attempt") + 1]), int(argv[argv.index("--process-id") + 1])
        ref = Ref()
        with self.ray.cond:
            self.ray.runs[host] = ref
        self.ray.sim.send(f"start {attempt} {host} {cwd}")
        if host == len(self.ray.node_ids) - 1:
            self.ray.started[attempt] = time.time()
        return ref

    def _stop(self, grace_s=5.0):
        if not self._alive():
            return self._dead_ref()
        self.ray.sim.send(f"kill {self.host}")
        self.ray._resolve(self.host, value=128 + signal.SIGKILL)
        return Ref(128 + signal.SIGKILL, True)

    def _pid(self):
        return Ref(2000 + self.worker, True) if self._alive() else self._dead_ref()

    def _pull(self, root, offsets):
        if not self._alive():
            return self._dead_ref()
        from launcher.runsync import read_new

        t = time.thread_time()
        out = read_new(root, offsets)
        self.ray.host_cpu += time.thread_time() - t
        return Ref(out, True)

    def _event_files(self, root):
        from launcher.runsync import list_event_files

        t = time.thread_time()
        out = list_event_files(root)
        self.ray.host_cpu += time.thread_time() - t
        return Ref(out, True)


# --- instrumentation --------------------------------------------------------------------------------------------
REC: Dict[str, List[tuple]] = defaultdict(list)  # name -> (start, end, result, CPU seconds of the calling thread)
SAID: List[tuple] = []  # (time, the supervisor's line)


def timed(owner, attr: str, key: Optional[str] = None) -> None:
    fn = getattr(owner, attr)
    key = key or f"{getattr(owner, '__name__', owner)}.{attr}"

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0, c0, result = time.time(), time.thread_time(), None
        try:
            result = fn(*a, **k)
            return result
        finally:
            REC[key].append((t0, time.time(), result, time.thread_time() - c0))

    setattr(owner, attr, wrapper)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_for(cond, timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def _ms(xs, cpu=None) -> Dict[str, float]:
    xs = list(xs)
    if not xs:
        return {"n": 0}
    out = {"n": len(xs), "median_ms": round(statistics.median(xs) * 1e3, 2), "max_ms": round(max(xs) * 1e3, 2)}
    if cpu is not None:
        out["cpu_median_ms"] = round(statistics.median(cpu) * 1e3, 2)
    return out


def durations(key: str, since: float = 0.0, until: float = float("inf")) -> List[float]:
    return [r[1] - r[0] for r in REC[key] if since <= r[0] <= until]


def cpu_times(key: str, since: float = 0.0, until: float = float("inf")) -> List[float]:
    return [r[3] for r in REC[key] if since <= r[0] <= until]


def timing(key: str, since: float = 0.0, until: float = float("inf")) -> Dict[str, float]:
    return _ms(durations(key, since, until), cpu_times(key, since, until))


def last(key: str):
    return REC[key][-1] if REC[key] else (None, None, None, None)


# --- the run ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accelerator-type", default="v5p-8192")
    p.add_argument("--watch-s", type=float, default=30.0, help="seconds of steady watching measured")
    p.add_argument("--watchdog-s", type=float, default=10.0, help="watchdog.timeout_s for the run")
    p.add_argument("--tick-s", type=float, default=0.1, help="the TPU API server's seconds per state")
    p.add_argument("--no-plan", action="store_true", help="skip make_plan (the pre-flight compile)")
    p.add_argument("--quick", action="store_true", help="v5p-128 (16 hosts), 5 s of watching")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("--json", default=None, help="also write the JSON line here")
    p.add_argument("--serve-tpu-api", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--heartbeat-s", type=float, default=1.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_tpu_api:
        return serve_tpu_api(a.tick_s)
    if a.simulate:
        return simulate(a.heartbeat_s, 1.0)
    if a.quick:
        a.accelerator_type, a.watch_s = "v5p-128", 5.0

    workdir = a.workdir or tempfile.mkdtemp(prefix="bench-control-")
    os.makedirs(workdir, exist_ok=True)
    children = [Child("--serve-tpu-api", "--tick-s", str(a.tick_s))]
    try:
        out = run(a, workdir, children)
    finally:
        for child in children:
            child.close()
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    line = json.dumps(out)
    print(line, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    return 0


def run(a, workdir: str, children: List[Child]) -> dict:
    tpu = children[0]
    url = tpu.expect()
    out = {"bench": "control", "time": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
           "accelerator_type": a.accelerator_type}
    run_dir, host_root = os.path.join(workdir, "run"), os.path.join(workdir, "hosts")
    overrides = ["+cluster=v5p-32", f"cluster.accelerator_type={a.accelerator_type}", "cluster.project=bench",
                 f"cluster.tpu_api_endpoint={url}", "ray.address=10.0.0.2:6379", f"cluster.host_run_root={host_root}",
                 "run.name=bench-control", f"run.dir={run_dir}", "model=tiny", "model.n_heads=8", "mesh.tensor=8",
                 "trainer.batch_size=512", "supervisor.backoff_s=0", f"watchdog.timeout_s={a.watchdog_s}",
                 "launcher.echo=false"]

    # plan ----------------------------------------------------------------------------------------------------
    t0 = time.time()
    from launcher.config import compose_config
    from launcher.validate import validate

    t1 = time.time()
    cfg = compose_config(overrides)
    t2 = time.time()
    plan = validate(cfg)
    t3 = time.time()
    hosts = plan.slice.hosts * plan.num_slices
    out["hosts"], out["chips"] = hosts, plan.devices
    plan_out = {"import_s": round(t1 - t0, 3), "compose_s": round(t2 - t1, 3), "validate_s": round(t3 - t2, 3)}
    if not a.no_plan:
        from launcher import plan as planning

        p = planning.make_plan(cfg, plan, compile=True)
        planning.refuse_if_unfit(p)
        t4 = time.time()
        plan_out.update(make_plan_s=round(t4 - t3, 3), preflight=p["preflight"], compile_s=p["compile_s"],
                        total_s=round(t4 - t1, 3))
        print(f"plan: {hosts} hosts, {plan.devices} chips, mesh {plan.mesh}: compose {t2 - t1:.2f}s, validate "
              f"{t3 - t2:.2f}s, make_plan {t4 - t3:.2f}s ({p['preflight']}, compile {p['compile_s']:.1f}s)",
              flush=True)
    out["plan"] = plan_out

    # provision -----------------------------------------------------------------------------------------------
    import launcher.hosts as lhosts
    import launcher.runsync as lrunsync
    import launcher.supervisor as lsup
    import launcher.watch as lwatch
    from cluster.cloud import CloudProvider
    from launcher.rundir import RunDir
    from trainer.goodput import GoodputLog

    lsup._say = lambda msg: (SAID.append((time.time(), msg)), print(f"[launcher] {msg}", flush=True))
    provider = lsup._provider(cfg, plan)
    assert isinstance(provider, CloudProvider)
    client = provider.api.client
    for name in ("get_queued_resource", "get_node", "create_queued_resource", "delete_queued_resource"):
        timed(client, name, f"api.{name}")
    timed(provider, "repair", "provider.repair")
    t0 = time.time()
    provider.up()
    provision_s = time.time() - t0
    api = [k for k in REC if k.startswith("api.")]
    endpoints = sum(len(n["ips"]) for n in provider.nodes)
    out["provision"] = {"s": round(provision_s, 3), "server_tick_s": a.tick_s, "poll_s": provider.api.poll_s,
                        "api_calls": sum(len(REC[k]) for k in api),
                        "api_s": round(sum(r[1] - r[0] for k in api for r in REC[k]), 3),
                        "get_node_ms": _ms(durations("api.get_node"))["median_ms"],
                        "nodes": len(provider.nodes), "endpoints": endpoints}
    print(f"provision: {provision_s:.2f}s to ACTIVE with {endpoints} endpoints ({out['provision']['api_calls']} API "
          f"calls, {out['provision']['api_s']:.2f}s in them; the server moves one state per {a.tick_s}s)", flush=True)
    assert endpoints == hosts, (endpoints, hosts)
    node_name = provider.nodes[0]["name"]
    for k in api:
        REC[k].clear()

    # the supervisor, with Ray stood in for --------------------------------------------------------------------
    sim = Child("--simulate", "--heartbeat-s", str(a.heartbeat_s))
    children.append(sim)
    fake = FakeRay(sim)
    for mod in (lhosts, lwatch, lrunsync, lsup):
        mod.ray = fake
    lhosts.placement_group, lhosts.remove_placement_group = fake.placement_group, fake.remove_placement_group
    lhosts.HostActor = fake.actor_class()
    timed(lhosts.Pod, "__init__", "Pod.__init__")
    timed(lhosts.Pod, "prepare", "Pod.prepare")
    timed(lhosts.Pod, "start", "Pod.start")
    timed(lwatch.Watch, "run", "Watch.run")
    timed(lwatch.Watch, "_read_heartbeats", "Watch._read_heartbeats")
    timed(lwatch.Watch, "_check_nodes", "Watch._check_nodes")
    timed(lrunsync.RunSync, "pull", "RunSync.pull")
    timed(lsup, "classify", "classify")
    timed(lsup.Supervisor, "_node_states", "node_states")
    timed(lsup.Pod, "stop_all", "Pod.stop_all")
    timed(lsup.Supervisor, "_final_codes", "final_codes")

    run = RunDir(cfg.run.dir)
    os.makedirs(run.path, exist_ok=True)
    sup = lsup.Supervisor(cfg, plan, run, provider, GoodputLog(run.path), first_attempt=0)
    result: Dict[str, object] = {}

    def supervise():
        try:
            result["outcome"] = sup.supervise()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            result["error"] = repr(e)
            raise

    rss = []
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.wait(0.25):
            rss.append((time.time(), rss_mib()))

    rss_before = rss_mib()
    threading.Thread(target=sample, daemon=True).start()
    t_sup = time.time()
    thread = threading.Thread(target=supervise, name="supervisor", daemon=True)
    thread.start()
    wait_for(lambda: 0 in fake.started or "error" in result, 600, "attempt 0's trainers")
    if "error" in result:
        raise SystemExit(f"the supervisor failed: {result['error']}")
    pod_s = durations("Pod.__init__")[0]
    prep_s, start_s = durations("Pod.prepare")[0], durations("Pod.start")[0]
    place_s = fake.started[0] - t_sup
    out["place"] = {"s": round(place_s, 3), "pod_s": round(pod_s, 3), "prepare_s": round(prep_s, 3),
                    "prepare_cpu_s": round(cpu_times("Pod.prepare")[0], 3), "start_s": round(start_s, 3),
                    "bundles": fake.bundles[0],
                    "not_measured": "Ray: 1024-bundle STRICT_SPREAD placement group, 1024 actor starts, RPCs"}
    print(f"place: {place_s:.2f}s from supervise() to {hosts} trainers started (Pod {pod_s:.2f}s, prepare "
          f"{prep_s:.2f}s, start {start_s:.2f}s; Ray itself stood in)", flush=True)

    # steady watching -----------------------------------------------------------------------------------------
    time.sleep(3.0)  # the first heartbeats are written and pulled
    w0, c0, h0 = time.time(), time.process_time(), fake.host_cpu
    sup_clock = time.pthread_getcpuclockid(thread.ident)
    s0 = time.clock_gettime(sup_clock)
    time.sleep(a.watch_s)
    w1, c1, h1 = time.time(), time.process_time(), fake.host_cpu
    s1 = time.clock_gettime(sup_clock)
    if REC["Watch.run"]:
        raise SystemExit(f"the watch ended during steady state (a false alarm?): {SAID[-3:]}")
    window = [r for t, r in rss if w0 <= t <= w1]
    polls = [work for t, work in fake.waits if w0 <= t <= w1]
    cpu = (c1 - c0 - (h1 - h0)) / (w1 - w0)
    out["watch"] = {
        "s": round(w1 - w0, 2), "cpu_s_per_s": round(cpu, 4), "supervisor_thread_cpu_s_per_s":
        round((s1 - s0 - (h1 - h0)) / (w1 - w0), 4), "simulated_host_cpu_s_per_s": round((h1 - h0) / (w1 - w0), 4),
        "rss_mib_before_supervise": round(rss_before, 1), "rss_mib_max": round(max(window), 1),
        "rss_mib_end": round(window[-1], 1), "polls": len(polls),
        "poll_period_s": round((w1 - w0) / max(1, len(polls)), 3), "poll_work": _ms(polls),
        "runsync_pull": timing("RunSync.pull", w0, w1), "read_heartbeats": timing("Watch._read_heartbeats", w0, w1),
        "check_nodes": timing("Watch._check_nodes", w0, w1)}
    wt = out["watch"]
    print(f"watch: {hosts} heartbeats for {w1 - w0:.0f}s: supervisor CPU {cpu:.3f} s/s (simulated hosts' reads "
          f"{wt['simulated_host_cpu_s_per_s']:.3f} s/s subtracted), RSS {wt['rss_mib_max']:.0f} MiB "
          f"(before supervise {rss_before:.0f}); {len(polls)} polls, work per poll "
          f"{wt['poll_work'].get('median_ms')} ms median (RunSync.pull {wt['runsync_pull'].get('median_ms')} ms, "
          f"{wt['runsync_pull'].get('cpu_median_ms')} ms CPU; heartbeat reads {wt['read_heartbeats'].get('median_ms')}"
          f" ms, {wt['read_heartbeats'].get('cpu_median_ms')} ms CPU)", flush=True)

    # (a) a lost host: TPU node PREEMPTED, host k's Ray node dead ----------------------------------------------
    k = hosts // 2 + 7 if hosts > 16 else hosts - 1
    tpu.send(f"preempt {node_name}")
    tpu.expect()
    t_inj = time.time()
    fake.lose_host(k)
    wait_for(lambda: 1 in fake.started or "error" in result or "outcome" in result, 600, "attempt 1's trainers")
    if 1 not in fake.started:
        raise SystemExit(f"the supervisor did not restart: {result}")
    w_end = last("Watch.run")[1]
    c_start, c_end, verdict, _ = last("classify")
    repair = last("provider.repair")
    out["detect_lost_host"] = {
        "host": k, "watch_s": round(w_end - t_inj, 3), "classified_s": round(c_end - t_inj, 3),
        "cause": verdict.cause, "detail": verdict.detail, "reprovision": verdict.reprovision,
        "stop_all_s": round(durations("Pod.stop_all")[-1], 3), "final_codes_s": round(durations("final_codes")[-1], 3),
        "node_states_s": round(durations("node_states")[-1], 3),
        "repair_s": round(repair[1] - repair[0], 3) if repair[0] else None,
        "restarted_s": round(fake.started[1] - t_inj, 3),
        "not_measured": "Ray's own time to declare the node dead (GCS health checks, >= 15 s by default)"}
    d = out["detect_lost_host"]
    print(f"detect (lost host {k}, node PREEMPTED): Watch returned after {d['watch_s']:.2f}s, classify said "
          f"{verdict.cause} ({verdict.detail}) at {d['classified_s']:.2f}s; re-provisioned in {d['repair_s']:.2f}s; "
          f"all {hosts} trainers restarted {d['restarted_s']:.2f}s after the loss", flush=True)

    # (b) one heartbeat stopped: the watchdog -------------------------------------------------------------------
    time.sleep(3.0)
    j = 3 % hosts
    sim.send(f"stop {j}")
    reply = sim.expect()
    progress = float(reply.split()[2])
    n_watch = len(REC["Watch.run"])
    wait_for(lambda: 2 in fake.started or "error" in result or "outcome" in result, a.watchdog_s + 600,
             "attempt 2's trainers")
    if len(REC["Watch.run"]) <= n_watch or 2 not in fake.started:
        raise SystemExit(f"no hang verdict: {result}")
    said = [t for t, msg in SAID if msg.startswith("watchdog:") and t >= progress]
    due = progress + a.watchdog_s
    c_start, c_end, verdict, _ = last("classify")
    out["detect_stopped_heartbeat"] = {
        "host": j, "watchdog_timeout_s": a.watchdog_s, "heartbeat_s": a.heartbeat_s,
        "verdict_after_due_s": round(said[0] - due, 3) if said else None,
        "watch_after_due_s": round(REC["Watch.run"][-1][1] - due, 3), "classified_after_due_s": round(c_end - due, 3),
        "cause": verdict.cause, "detail": verdict.detail, "restarted_after_due_s": round(fake.started[2] - due, 3)}
    d = out["detect_stopped_heartbeat"]
    print(f"detect (heartbeat of host {j} stopped): the watchdog's verdict {d['verdict_after_due_s']}s after its "
          f"due time (last progress + {a.watchdog_s:.0f}s), classify said {verdict.cause} "
          f"{d['classified_after_due_s']}s after it; trainers restarted {d['restarted_after_due_s']:.2f}s after it", flush=True)

    # the end: every trainer exits 0; the slice is deleted --------------------------------------------------------
    time.sleep(2.0)
    t_done = time.time()
    fake.complete()
    wait_for(lambda: "outcome" in result or "error" in result, 120, "the supervisor's end")
    out["complete_s"] = round(time.time() - t_done, 3)
    out["outcome"] = list(result.get("outcome") or [result.get("error")])
    sup.close()
    t0 = time.time()
    provider.down()
    out["down_s"] = round(time.time() - t0, 3)
    stop_sampling.set()
    out["rss_mib_max_overall"] = round(max(r for _, r in rss), 1)
    out["place_again_s"] = {"prepare": [round(x, 3) for x in durations("Pod.prepare")],
                            "start": [round(x, 3) for x in durations("Pod.start")]}
    print(f"end: {out['outcome']}; slice deleted in {out['down_s']:.2f}s", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
