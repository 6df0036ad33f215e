"""The supervisor: bring the slice up, start one trainer per host, watch them, write summary.json.

On any host failing, every other host of the slice is stopped at once (crashes beat hangs).
"""
import copy
import logging
import os
import signal
import sys
import time
from typing import Dict, Optional

import ray
from omegaconf import DictConfig
from ray.util.tpu import get_tpu_coordinator_env_vars

from cluster.cloud import CloudProvider
from cluster.gcp import ProvisionError
from cluster.local import AttachedProvider, LocalProvider
from launcher.config import to_yaml
from launcher.errors import EXIT_FAILED, EXIT_OK, EXIT_USER_ERROR
from launcher.hosts import HostStartError, Pod, wait_for_exit
from launcher.logtail import LogTail
from launcher.runsync import RunSync
from launcher.stage import stage_for_cloud
from launcher.rundir import RunDir
from launcher.validate import Plan

log = logging.getLogger("launcher")


def _say(msg: str) -> None:
    print(f"[launcher] {msg}", flush=True)


def _provider(cfg: DictConfig, plan: Plan):
    c = cfg.cluster
    if c.provider == "gcp":
        wheel_url = None
        if c.bucket:
            from launcher.wheel import stage_wheel

            wheel_url = stage_wheel(c.bucket)
            _say(f"project wheel staged at {wheel_url}")
        return CloudProvider(plan.slice, cfg.ray.address, c.project, c.zone,
                             c.runtime_version or plan.tpu.default_runtime_version, cfg.run.name, plan.num_slices,
                             c.capacity, c.network, c.subnetwork, c.service_account, dict(c.labels),
                             endpoint=c.tpu_api_endpoint, wheel_url=wheel_url, timeout_s=float(c.provision_timeout_s),
                             poll_s=0.5 if c.tpu_api_endpoint else 5.0, delete_on_exit=bool(c.delete_on_exit),
                             progress=_say)
    if cfg.ray.address:
        return AttachedProvider(cfg.ray.address)
    return LocalProvider(plan.slices, int(cfg.cluster.cpus_per_host), bool(cfg.ray.dashboard))


class HostDirs:
    """Where each host's trainer keeps its run directory: run.dir itself when the hosts share this filesystem
    (local pods), else a host-local directory whose files RunSync pulls back (cloud TPU VMs)."""

    def __init__(self, cfg: DictConfig, run: RunDir):
        shared = cfg.cluster.shared_run_dir
        self.shared = (cfg.cluster.provider == "local") if shared is None else bool(shared)
        self.cfg, self.run = cfg, run

    def dir(self, i: int) -> str:
        if self.shared:
            return self.run.path
        return os.path.join(self.cfg.cluster.host_run_root, self.cfg.run.name, f"host-{i}")

    def config(self, i: int) -> str:
        return os.path.join(self.dir(i), "config.yaml")

    def log(self, i: int) -> str:
        return os.path.join(self.dir(i), "logs", f"host-{i}.log")

    def files(self, i: int):
        if self.shared:
            return None
        host_cfg = copy.deepcopy(self.cfg)
        host_cfg.run.dir = self.dir(i)
        return {self.config(i): to_yaml(host_cfg)}


def _trainer_argv(dirs: HostDirs, plan: Plan, coordinator: str, attempt: int):
    def argv_for(i: int):
        argv = ["-m", "trainer.main", "--config", dirs.config(i), "--process-id", str(i),
                "--num-processes", str(plan.slice.hosts * plan.num_slices), "--coordinator", coordinator,
                "--attempt", str(attempt)]
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


class Terminated(Exception):
    """The launcher got SIGTERM: stop the hosts, record the run as failed, exit."""


def _on_sigterm(signum, frame):
    raise Terminated()


def launch(cfg: DictConfig, plan: Plan, started_at: float) -> int:
    run = RunDir(cfg.run.dir)
    run.acquire()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _launch(cfg, plan, run, started_at)
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.release()


def _launch(cfg: DictConfig, plan: Plan, run: RunDir, started_at: float) -> int:
    previous = run.read_json("summary.json") or {}
    if cfg.cluster.provider != "local" and cfg.cluster.bucket:
        stage_for_cloud(cfg, say=_say)
    run.write_text("config.yaml", to_yaml(cfg))
    if os.path.exists(run.file("result.json")):
        os.replace(run.file("result.json"), run.file("result.previous.json"))
    run.event("command_start", time=started_at, argv=sys.argv[1:])
    _say(f"run {cfg.run.name} -> {run.path}")
    _say(f"{plan.num_slices} x {plan.slice.accelerator_type} ({', '.join(s.name for s in plan.slices)}): "
         f"{plan.slice.hosts} hosts x {plan.slice.devices_per_host} devices per slice, mesh {plan.mesh}")
    provider = _provider(cfg, plan)
    status, code, restarts = "failed", EXIT_FAILED, 0
    codes: Dict[int, int] = {}
    group: Optional[Pod] = None
    tail: Optional[LogTail] = None
    sync: Optional[RunSync] = None
    error: Optional[str] = None
    try:
        t0 = time.time()
        address = provider.up()
        # Inside a Ray job the job's runtime env (set at submission) already carries PYTHONPATH.
        runtime_env = None if cfg.launcher.in_job else {"env_vars": {"PYTHONPATH": project_pythonpath()}}
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, runtime_env=runtime_env)
        run.event("ray_ready", seconds=round(time.time() - t0, 4), address=address)
        group = Pod(plan.slices, float(cfg.trainer.host_start_timeout_s))
        run.event("hosts_placed", hosts=[{k: info[k] for k in ("slice", "worker_id", "ip", "hostname", "node_id")}
                                         for info in group.infos])
        _say(f"{len(group.infos)} hosts placed; coordinator {group.coordinator}; logs in {run.file('logs')}")
        if cfg.launcher.echo:
            tail = LogTail(run.host_log(0)).start()
        dirs = HostDirs(cfg, run)
        if not dirs.shared:
            sync = RunSync(run.path, group.actors, [dirs.dir(i) for i in range(len(group.actors))])
        refs = group.start(_trainer_argv(dirs, plan, group.coordinator, attempt=0), _trainer_env(plan, group),
                           dirs.log, dirs.dir, dirs.files)
        codes = wait_for_exit(refs, on_poll=sync.pull if sync else None)
        if any(c != 0 for c in codes.values()):
            group.stop_all()
        bad = {i: c for i, c in codes.items() if c != 0}
        if not bad and len(codes) == len(group.infos):
            status, code = "completed", EXIT_OK
        else:
            first = min(bad)
            code = EXIT_USER_ERROR if bad[first] == EXIT_USER_ERROR else EXIT_FAILED
            error = f"host {first} exited with code {bad[first]}; see {run.host_log(first)}"
    except (HostStartError, ProvisionError) as e:
        error = str(e)
    except (KeyboardInterrupt, Terminated) as e:
        error = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        if group is not None:
            group.stop_all()
    finally:
        if sync is not None:
            sync.pull()
        if tail is not None:
            tail.stop()
        if group is not None:
            group.close()
        try:
            ray.shutdown()
        finally:
            try:
                provider.down()
            except ProvisionError as e:
                error = error or f"could not delete the TPU resources: {e}"
                print(f"error: could not delete the TPU resources: {e}", file=sys.stderr)
    result = run.read_json("result.json") or {}
    if status == "completed" and not result:
        status, code, error = "failed", EXIT_FAILED, "host 0 finished without writing result.json"
    summary = {
        "status": status, "run": cfg.run.name, "final_step": result.get("final_step"),
        "final_loss": result.get("final_loss"), "eval": result.get("eval"), "val": result.get("val"),
        "hosts": plan.slice.hosts * plan.num_slices, "num_slices": plan.num_slices, "devices": plan.devices,
        "mesh": plan.mesh,
        "accelerator_type": plan.slice.accelerator_type, "params": result.get("params"),
        "restarts": restarts, "resumed_from_step": result.get("resumed_from_step"),
        "params_digest": result.get("params_digest"), "exit_codes": {str(k): v for k, v in codes.items()},
        "wall_s": round(time.time() - started_at, 3), "launches": int(previous.get("launches", 0)) + 1,
        "error": error,
    }
    run.write_json("summary.json", summary)
    run.event("command_end", status=status, wall_s=summary["wall_s"])
    if status == "completed":
        ev = summary["eval"] or {}
        _say(f"completed: step {summary['final_step']}, test loss {ev.get('eval_loss', float('nan')):.4f}, "
             f"ppl {ev.get('eval_ppl', float('nan')):.2f}, acc {ev.get('eval_acc', float('nan')):.4f}, "
             f"{summary['wall_s']:.1f}s; summary: {run.file('summary.json')}")
    else:
        print(f"error: {error}", file=sys.stderr, flush=True)
        _print_tail(run, codes)
    return code


def _print_tail(run: RunDir, codes: Dict[int, int], lines: int = 15) -> None:
    bad = sorted(i for i, c in codes.items() if c not in (0,))
    for i in bad[:1]:
        try:
            with open(run.host_log(i), errors="replace") as f:
                tail = f.readlines()[-lines:]
        except FileNotFoundError:
            continue
        print(f"--- last lines of {run.host_log(i)} ---", file=sys.stderr)
        sys.stderr.writelines(tail)
