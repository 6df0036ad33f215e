"""The supervisor: bring the slice up, start one trainer per host, watch them, write summary.json.

On any host failing, every other host of the slice is stopped at once (crashes beat hangs).
"""
import copy
import logging
import os
import re
import signal
import sys
import time
from typing import Dict, Optional

import ray
from omegaconf import DictConfig
from ray.util.tpu import get_tpu_coordinator_env_vars

from cluster.bootstrap import token_metadata
from cluster.cloud import CloudProvider
from cluster.gcp import ProvisionError
from cluster.local import AttachedProvider, LocalProvider
from launcher.config import to_yaml
from launcher import goodput
from launcher.blame import exit_times
from launcher.classify import HOST_LOST, Budget, classify
from launcher.hosts import HostStartError, Pod
from launcher.mfu import launch_mfu, run_peak_flops
from launcher.progress import Progress
from launcher.report import at_end_of_run
from launcher.runsync import RunSync, host_files
from launcher.stage import stage_for_cloud
from launcher.follow import follow
from launcher.rundir import RunDir, RunLive
from launcher.validate import Plan
from launcher.watch import Watch
from trainer import runfiles
from trainer.goodput import GoodputLog
from trainer.heartbeat import read_heartbeat
from trainer.tensorboard import write_goodput
from trainer.runfiles import (CONFIG, EXIT_FAILED, EXIT_OK, EXIT_USER_ERROR, GOODPUT, POD, REASON_PREEMPTION, RESULT,
                              RESULT_PREVIOUS, SUMMARY)

log = logging.getLogger("launcher")


def _say(msg: str) -> None:
    print(f"[launcher] {msg}", flush=True)


def _provider(cfg: DictConfig, plan: Plan):
    c = cfg.cluster
    if c.provider == "gcp":
        staged = None
        if c.bucket:
            from launcher.wheel import staged_for_run

            staged, earlier = staged_for_run(c.bucket)
            _say(f"project wheel {'(staged by the launching terminal) ' if earlier else 'staged '}at "
                 f"{staged.wheel_url} (sha256 {staged.wheel_sha256[:12]}...), its hash-locked requirements at "
                 f"{staged.lock_url}")
        return CloudProvider(plan.slice, cfg.ray.address, c.project, c.zone,
                             c.runtime_version or plan.tpu.default_runtime_version, cfg.run.name, plan.num_slices,
                             c.capacity, c.network, c.subnetwork, c.service_account, dict(c.labels),
                             endpoint=c.tpu_api_endpoint, staged=staged, timeout_s=float(c.provision_timeout_s),
                             poll_s=0.5 if c.tpu_api_endpoint else 5.0, delete_on_exit=bool(c.delete_on_exit),
                             progress=_say, token_metadata=token_metadata(c.project, cfg.run.name,
                                                                          c.secret_manager_endpoint))
    if cfg.ray.address:
        return AttachedProvider(cfg.ray.address)
    return LocalProvider(plan.slices, int(cfg.cluster.cpus_per_host), bool(cfg.ray.dashboard))


_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./-]*")  # a YAML plain scalar, never read as a number, bool or null
_PLAIN_LINE = re.compile(r"\s*(?:- |[A-Za-z0-9_-]+: )[A-Za-z0-9_./:@+=,-]+")


class HostDirs:
    """Where each host's trainer keeps its run directory: run.dir itself when the hosts share this filesystem
    (local pods), else a host-local directory whose files RunSync pulls back (cloud TPU VMs)."""

    def __init__(self, cfg: DictConfig, run: RunDir):
        shared = cfg.cluster.shared_run_dir
        self.shared = (cfg.cluster.provider == "local") if shared is None else bool(shared)
        self.cfg, self.run = cfg, run
        self._template = None  # (stand-in run.dir, the YAML with it, whether it may be replaced textually)

    def dir(self, i: int) -> str:
        if self.shared:
            return self.run.path
        return os.path.join(self.cfg.cluster.host_run_root, self.cfg.run.name, f"host-{i}")

    def config(self, i: int) -> str:
        return os.path.join(self.dir(i), CONFIG)

    def log(self, i: int) -> str:
        return runfiles.host_log(self.dir(i), i)

    def files(self, i: int):
        if self.shared:
            return None
        return {self.config(i): self._host_yaml(self.dir(i))}

    def _host_yaml(self, host_dir: str) -> str:
        """The config as a host sees it (run.dir: its host-local directory). A deep copy and a YAML dump per host
        cost ~7 ms, 7 s of every attempt's start on a 1024-host slice (bench/control.py), so the YAML is rendered
        once with a stand-in path and the host's directory put in its place, where that gives the same text: both
        plain absolute paths, every line holding it a `key: value` or `- value` without spaces or quotes."""
        if self._template is None:
            stand_in = f"/run-dir-{os.urandom(8).hex()}"
            host_cfg = copy.deepcopy(self.cfg)
            host_cfg.run.dir = stand_in
            text = to_yaml(host_cfg)
            lines = [line for line in text.splitlines() if stand_in in line]
            self._template = (stand_in, text, bool(lines) and all(_PLAIN_LINE.fullmatch(x) for x in lines))
        stand_in, text, plain = self._template
        if plain and _PLAIN_PATH.fullmatch(host_dir):
            return text.replace(stand_in, host_dir)
        host_cfg = copy.deepcopy(self.cfg)
        host_cfg.run.dir = host_dir
        return to_yaml(host_cfg)


def _trainer_argv(dirs: HostDirs, plan: Plan, coordinator: str, attempt: int, peak_flops: Optional[float]):
    def argv_for(i: int):
        argv = ["-m", "trainer.main", "--config", dirs.config(i), "--process-id", str(i),
                "--num-processes", str(plan.slice.hosts * plan.num_slices), "--coordinator", coordinator,
                "--attempt", str(attempt)]
        if peak_flops is not None:
            argv += ["--peak-flops", repr(float(peak_flops))]
        return argv

    return argv_for


def _trainer_env(plan: Plan, pod: Pod):
    """Each host's env; multislice runs get the MEGASCALE_* variables set afresh on every start (stale ones
    left from a preempted run make jax.distributed hang)."""
    base = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": project_pythonpath()}
    head_ip = pod.infos[0]["ip"]

    def env_for(i: int):
        env = dict(base)
        if plan.num_slices > 1:
            env.update(get_tpu_coordinator_env_vars(head_ip, plan.num_slices, pod.slice_of(i)))
        return env

    return env_for


def project_pythonpath() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    return os.pathsep.join(parts)


class Terminated(KeyboardInterrupt):
    """The launcher got SIGTERM: stop the hosts with a checkpoint, as Ctrl-C does. A KeyboardInterrupt because Ray's
    blocking calls (ray.get, ray.wait) turn only that into an interrupt (they re-raise it as a plain
    KeyboardInterrupt; any other exception from a signal handler comes out as a SystemError): `sigterm` remembers
    which signal it was."""

    sigterm = False


def _on_sigterm(signum, frame):
    Terminated.sigterm = True
    raise Terminated()


def launch(cfg: DictConfig, plan: Plan, started_at: float) -> int:
    run = RunDir(cfg.run.dir)
    try:
        run.acquire()
    except RunLive as live:
        return follow(run, live.holder, int(cfg.trainer.steps))
    mirror = _open_mirror(cfg, run)
    if run.taken_over:
        _take_over(run)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _launch(cfg, plan, run, started_at)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if mirror is not None:
            mirror.close()  # what the end of the launch wrote (summary.json, report.png) reaches the bucket
        run.release()


def _open_mirror(cfg: DictConfig, run: RunDir):
    """A cloud run's run directory is mirrored to its bucket (launcher/mirror.py), where the laptop's commands read
    it and where it outlives a head VM. First the mirror is pulled: a new head VM resumes the run's history (events,
    goodput ledger, attempts) where the last one left it. None for a local run, or a cloud run with no bucket."""
    from launcher import mirror

    url = mirror.url_for(cfg)
    if url is None:
        return None
    warning = mirror.refresh(run.path, cfg)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return mirror.Mirror(run.path, url).start()


def _launch(cfg: DictConfig, plan: Plan, run: RunDir, started_at: float) -> int:
    if cfg.cluster.provider != "local" and cfg.cluster.bucket:
        stage_for_cloud(cfg, say=_say)
    run.write_text(CONFIG, to_yaml(cfg))
    if os.path.exists(run.file(RESULT)):
        os.replace(run.file(RESULT), run.file(RESULT_PREVIOUS))
    run.event("command_start", time=started_at, argv=sys.argv[1:])
    ledger = GoodputLog(run.path)
    ledger("launch", time=started_at)
    _say(f"run {cfg.run.name} -> {run.path}")
    _say(f"{plan.num_slices} x {plan.slice.accelerator_type} ({', '.join(s.name for s in plan.slices)}): "
         f"{plan.slice.hosts} hosts x {plan.slice.devices_per_host} devices per slice, mesh {plan.mesh}")
    provider = _provider(cfg, plan)
    peak_flops = run_peak_flops(cfg, plan)  # measured (local pods) before the pod starts, so it does not disturb it
    sup = Supervisor(cfg, plan, run, provider, ledger, first_attempt=_next_attempt(run), peak_flops=peak_flops)
    status, code, error = "failed", EXIT_FAILED, None
    saved = None  # the step every host checkpointed at when the launch was stopped (Ctrl-C, SIGTERM, tpu-launch stop)
    try:
        t0 = time.time()
        address = provider.up()
        _record_local_pod(run, provider)
        # Inside a Ray job the job's runtime env (set at submission) already carries PYTHONPATH.
        runtime_env = None if cfg.launcher.in_job else {"env_vars": {"PYTHONPATH": project_pythonpath()}}
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, runtime_env=runtime_env)
        # ray.init sets its own SIGTERM handler (sys.exit, and the core worker's crash dump): ours again, so that
        # SIGTERM (`tpu-launch stop`, a Ray job stopped) stops the hosts with a checkpoint
        signal.signal(signal.SIGTERM, _on_sigterm)
        run.event("ray_ready", seconds=round(time.time() - t0, 4), address=address)
        status, code, error = sup.supervise()
    except (HostStartError, ProvisionError) as e:
        error = str(e)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated)
        error = "terminated (SIGTERM)" if Terminated.sigterm else "interrupted"
        status = "stopped"
        saved = sup.stop(graceful=True)
        if saved is not None:
            error += f"; the hosts saved a checkpoint at step {saved}: type the same command to resume from it"
        elif sup.group is not None:
            error += (f"; the hosts did not all checkpoint at one step within supervisor.stop_grace_s="
                      f"{cfg.supervisor.stop_grace_s}s ({sup.hosts_at_stop()}): the same command resumes from the "
                      "newest checkpoint")
    finally:
        sup.close()
        try:
            ray.shutdown()
        finally:
            try:
                provider.down()
            except ProvisionError as e:
                error = error or f"could not delete the TPU resources: {e}"
                print(f"error: could not delete the TPU resources: {e}", file=sys.stderr)
            _forget_local_pod(run)
    result = run.read_json(RESULT) or {}
    if status == "completed" and not result:
        status, code, error = "failed", EXIT_FAILED, "host 0 finished without writing result.json"
    ledger("launch_end", status=status)
    ledger_summary = goodput.summarize(goodput.read(run.file(GOODPUT)), time.time())
    summary = {
        "status": status, "run": cfg.run.name, "final_step": result.get("final_step"),
        "final_loss": result.get("final_loss"), "eval": result.get("eval"), "val": result.get("val"),
        "hosts": plan.slice.hosts * plan.num_slices, "num_slices": plan.num_slices, "devices": plan.devices,
        "mesh": plan.mesh,
        "accelerator_type": plan.slice.accelerator_type, "params": result.get("params"),
        "restarts": ledger_summary["restarts"], "lost_steps": ledger_summary["lost_steps"],
        "goodput": ledger_summary["goodput"], "badput": ledger_summary["badput"],
        "idle_s": ledger_summary["idle_s"],  # between launches: outside goodput's total
        "attempts": ledger_summary["attempts"], "failures": sup.failures,
        "resumed_from_step": result.get("resumed_from_step"),
        "params_digest": result.get("params_digest"), "exit_codes": {str(k): v for k, v in sup.codes.items()},
        "wall_s": round(time.time() - started_at, 3), "launches": sum(1 for r in goodput.read(run.file(GOODPUT)) if r.get("kind") == "launch"),
        "error": error, "exit_code": code, "stopped_at_step": saved,
        "mfu": launch_mfu(runfiles.read_jsonl(run.file(runfiles.METRICS)), started_at), "peak_flops": peak_flops,
        "init_from": _warm_start(run),
    }
    run.write_json(SUMMARY, summary)
    try:
        write_goodput(run.path, summary)
    except OSError as e:  # TensorBoard's copy of the goodput is a view; summary.json holds it already
        log.warning("could not write the goodput to %s: %s", run.file(runfiles.TB), e)
    run.event("command_end", status=status, wall_s=summary["wall_s"])
    at_end_of_run(run.path)
    if status == "completed":
        ev = summary["eval"] or {}
        _say(f"completed: step {summary['final_step']}, test loss {ev.get('eval_loss', float('nan')):.4f}, "
             f"ppl {ev.get('eval_ppl', float('nan')):.2f}, acc {ev.get('eval_acc', float('nan')):.4f}, "
             f"goodput {summary['goodput']:.2f}, restarts {summary['restarts'].get('total', 0)}, "
             f"{summary['wall_s']:.1f}s; summary: {run.file('summary.json')}")
    else:
        print(f"error: {error}", file=sys.stderr, flush=True)
        _print_tail(run, sup.codes, sup.blame)
    return code


def _warm_start(run: RunDir) -> Optional[dict]:
    """The checkpoint the run's parameters started from (checkpoint.init_from, its latest warm start: host 0's
    init_from event), kept by every later launch that resumes it; None for a run that started from random init."""
    starts = [e for e in runfiles.read_jsonl(run.file(runfiles.EVENTS)) if e.get("event") == "init_from"]
    return {k: starts[-1].get(k) for k in ("path", "checkpoint_dir", "step")} if starts else None


def _next_attempt(run: RunDir) -> int:
    """Attempt numbers go on across launches of the same run (the ledger tells attempts apart by them)."""
    attempts = [r.get("attempt", -1) for r in goodput.read(run.file(GOODPUT))
                if r.get("kind") == "attempt_start"]
    return max(attempts, default=-1) + 1


def _take_over(run: RunDir) -> None:
    """The run's last supervisor died holding the lock (the kernel released it): say so, record it, and stop
    the Ray processes of the local pod it left behind (their trainers exit with their dead actors)."""
    dead = run.taken_over or {}
    _say(f"the run's previous supervisor (pid {dead.get('pid')} on {dead.get('host')}) died; taking over the "
         f"run and resuming it")
    from cluster.hygiene import kill_recorded, recorded_processes

    # only a process whose pid AND start time match the record is killed: a reused pid is someone else's
    killed, skipped = kill_recorded(recorded_processes(run.read_json(POD) or {}))
    if killed:
        _say(f"stopped the previous supervisor's local Ray processes: pids {killed}")
    if skipped:
        _say(f"left {len(skipped)} recorded pid(s) alone: "
             + "; ".join(f"{s['pid']}: {s['reason']}" for s in skipped))
    run.event("lock_taken_over", previous=dead, killed_ray_pids=killed, skipped_ray_pids=skipped)
    _forget_local_pod(run)


def _record_local_pod(run: RunDir, provider) -> None:
    """The local pod's Ray processes, so that a launch after this supervisor dies can stop them: each as
    {"pid", "start_time"}, so that takeover kills only those very processes, never a later one reusing a pid."""
    if isinstance(provider, LocalProvider):
        run.write_json(POD, {"supervisor_pid": os.getpid(), "processes": provider.processes()})


def _forget_local_pod(run: RunDir) -> None:
    try:
        os.remove(run.file(POD))
    except FileNotFoundError:
        pass


class Supervisor:
    """Runs attempts until the run completes, fails for good, or its budgets are spent.

    Each attempt: place one trainer per host (or reuse the healthy slice), clean the hosts, start, watch.
    On a failure: tear down every host at once, classify, check the budget, back off, re-provision if the
    slice's nodes are gone, and start again from the newest complete checkpoint.
    """

    def __init__(self, cfg: DictConfig, plan: Plan, run: RunDir, provider, ledger, first_attempt: int = 0,
                 peak_flops: Optional[float] = None):
        self.cfg, self.plan, self.run, self.provider, self.ledger = cfg, plan, run, provider, ledger
        self.peak_flops = peak_flops
        self.attempt = first_attempt
        s = cfg.supervisor
        self.budget = Budget(s.max_preemptions, s.max_failures, s.backoff_s, s.backoff_max_s)
        self.group: Optional[Pod] = None
        self.dirs = HostDirs(cfg, run)
        self.tail: Optional[Progress] = None
        self.sync: Optional[RunSync] = None
        self.codes: Dict[int, int] = {}
        self.failures = []
        self.blame: Optional[int] = None

    def _place(self) -> None:
        self.group = Pod(self.plan.slices, float(self.cfg.trainer.host_start_timeout_s))
        self.run.event("hosts_placed", hosts=[{k: info[k] for k in ("slice", "worker_id", "ip", "hostname",
                                                                     "node_id")} for info in self.group.infos])
        _say(f"{len(self.group.infos)} hosts placed; logs in {self.run.file('logs')}")
        if self.cfg.launcher.echo and self.tail is None:
            self.tail = Progress(self.run.path, int(self.cfg.trainer.steps)).start()

    def _heartbeat(self, i: int) -> Optional[dict]:
        return read_heartbeat(self.run.path, i)

    def supervise(self):
        plan, cfg = self.plan, self.cfg
        while True:
            if self.group is None:
                self._place()
            group = self.group
            coordinator = group.new_coordinator()
            sync_names = (lambda i: host_files(i)) if not self.dirs.shared else (lambda i: ())
            prepared = group.prepare(self.dirs.log, self.dirs.dir, self.dirs.files,
                                     lambda i: runfiles.heartbeat_file(self.dirs.dir(i), i), sync_names)
            if not self.dirs.shared:
                self.sync = RunSync(self.run.path, group.actors, [self.dirs.dir(i) for i in range(len(group.actors))],
                                    [p["sizes"] for p in prepared])
            self.ledger("attempt_start", attempt=self.attempt)
            self.run.event("attempt_start", attempt=self.attempt, coordinator=coordinator)
            refs = group.start(_trainer_argv(self.dirs, plan, coordinator, self.attempt, self.peak_flops),
                               _trainer_env(plan, group), self.dirs.log, self.dirs.dir, prepared)
            watch = Watch(group, refs, self.attempt, self._heartbeat, cfg.watchdog.timeout_s,
                          cfg.watchdog.startup_timeout_s, on_poll=self.sync.pull if self.sync else None, say=_say)
            evidence = watch.run()
            evidence.times = exit_times(self.run.path, self.attempt)  # the first host to fail is blamed
            self.codes = dict(evidence.codes)
            if len(evidence.codes) == len(group.infos) and all(c == 0 for c in evidence.codes.values()):
                return "completed", EXIT_OK, None
            detected = time.time()
            group.stop_all(grace_s=0)  # every host of the slice at once: crashes beat hangs
            if self.sync is not None:
                self.sync.pull()
            # Exit codes of the hosts we just killed are ours, not evidence; they go in the summary only.
            self.codes = {**self._final_codes(refs), **evidence.codes}
            evidence.node_states = self._node_states()
            failure = classify(evidence)
            self.blame = failure.host
            self.failures.append({"attempt": self.attempt, "cause": failure.cause, "detail": failure.detail,
                                  "host": failure.host, "last_step": watch.max_step, "time": detected})
            self.ledger("failure", attempt=self.attempt, cause=failure.cause, last_step=watch.max_step,
                        detail=failure.detail)
            self.run.event("failure", attempt=self.attempt, cause=failure.cause, detail=failure.detail,
                           blamed=failure.host, codes={str(k): v for k, v in evidence.codes.items()})
            refusal = self.budget.allow(failure)
            if refusal is not None:
                code = EXIT_USER_ERROR if failure.host is not None and evidence.codes.get(failure.host) == \
                    EXIT_USER_ERROR else EXIT_FAILED
                return "failed", code, refusal + (f"; see {self.run.host_log(failure.host)}"
                                                  if failure.host is not None else "")
            wait_s = self.budget.backoff(made_progress=self._made_progress())
            _say(f"attempt {self.attempt} failed ({failure.cause}: {failure.detail}); restarting from the newest "
                 f"checkpoint in {wait_s:.0f}s")
            time.sleep(wait_s)
            if failure.reprovision or not group.healthy():
                group.close()
                self.group = None
                bad = [group.infos[i]["node_id"] for i in evidence.drained_hosts]
                replaced = self.provider.repair(bad)
                self.run.event("reprovisioned", replaced=replaced)
            self.ledger("recovery", attempt=self.attempt, seconds=round(time.time() - detected, 4))
            self.attempt += 1

    def _final_codes(self, refs) -> Dict[int, int]:
        codes = {}
        for i, ref in enumerate(refs):
            try:
                codes[i] = int(ray.get(ref, timeout=15))
            except Exception:  # noqa: BLE001 - a lost host has no exit code
                codes[i] = HOST_LOST
        return codes

    def _node_states(self) -> Dict[str, str]:
        states = getattr(self.provider, "node_states", None)
        if states is None:
            return {}
        try:
            return states()
        except Exception:  # noqa: BLE001 - the API unreachable: no evidence from it
            return {}

    def _made_progress(self) -> bool:
        steps = [r.get("step") for r in goodput.read(self.run.file(GOODPUT))
                 if r.get("kind") == "save" and r.get("attempt") == self.attempt and r.get("step")]
        return bool(steps)

    def stop(self, graceful: bool) -> Optional[int]:
        """Ctrl-C / SIGTERM: the hosts get a preemption notice and supervisor.stop_grace_s to checkpoint at an
        agreed step. Returns that step if every host saved it."""
        if self.group is None:
            return None
        self.group.stop_all(grace_s=float(self.cfg.supervisor.stop_grace_s) if graceful else 0)
        if self.sync is not None:
            self.sync.pull()
        beats = [self._heartbeat(i) or {} for i in range(len(self.group.infos))]
        if beats and all((b.get("exit") or {}).get("reason") == REASON_PREEMPTION and b.get("attempt") == self.attempt
                         for b in beats):
            return beats[0].get("step")
        return None

    def hosts_at_stop(self) -> str:
        """Where each host was when a graceful stop did not give one checkpoint: its phase, step and exit."""
        parts = []
        for i in range(len(self.group.infos)):
            b = self._heartbeat(i) or {}
            ex = b.get("exit") or {}
            parts.append(f"host {i}: attempt {b.get('attempt')} {b.get('phase')} step {b.get('step')}"
                         + (f" exit {ex.get('code')} {ex.get('reason')}" if ex else ""))
        return "; ".join(parts)

    def close(self) -> None:
        if self.sync is not None:
            self.sync.pull()
        if self.tail is not None:
            self.tail.stop()
        if self.group is not None:
            self.group.close()


def _print_tail(run: RunDir, codes: Dict[int, int], blame: Optional[int] = None, lines: int = 15) -> None:
    bad = [blame] if blame is not None else sorted(i for i, c in codes.items() if c not in (0,))
    for i in bad[:1]:
        try:
            with open(run.host_log(i), errors="replace") as f:
                tail = f.readlines()[-lines:]
        except FileNotFoundError:
            continue
        print(f"--- last lines of {run.host_log(i)} ---", file=sys.stderr)
        sys.stderr.writelines(tail)
