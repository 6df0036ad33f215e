"""Stop a live run the way Ctrl-C in its terminal does: every host checkpoints at one agreed step, the run ends
`stopped` naming that step, and typing the run's command again resumes there with no lost step.

A run supervised on this machine: its launcher (the pid in the run's lock) gets SIGTERM. A cloud run supervised by
a Ray job on its head: the job is stopped through the head's job server (Ray sends the launcher SIGTERM), reached
as the launch reaches it (ray.address, or the run's head VM through an SSH tunnel). Then it waits for the launch to
end and prints its outcome (--no-wait: return at once).

Exit 0: the run stopped with a checkpoint (or ended by itself meanwhile), or was not live (nothing to stop: stop is
idempotent, so `tpu-launch stop RUN && tpu-launch down RUN` works whatever the run's state); 1: it ended without
every host saving (it resumes from the newest complete checkpoint); 2: no such run, or its launcher is out of reach.

  tpu-launch stop demo                  # checkpoint, stop, print the step it saved
  tpu-launch stop runs/demo --no-wait
"""
import argparse
import os
import signal
import socket
import time
from typing import Optional

from launcher.commands.common import add_root, resolve_run
from launcher.errors import UserError
from trainer import runfiles

HELP = "checkpoint at one agreed step on every host and stop (as Ctrl-C in its terminal)"
POLL_S = 0.2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory, or a run name under --root")
    add_root(p)
    p.add_argument("--no-wait", action="store_true", help="ask the run to stop and return at once")


def run(args) -> int:
    run_dir = resolve_run(args.run, args.root)
    cfg = run_config(run_dir)
    if cfg is not None and cfg.cluster.provider != "local" and cfg.launcher.submit:
        return _stop_job(cfg, run_dir, args.no_wait)
    return _stop_local(run_dir, args.no_wait)


def run_config(run_dir: str):
    """The run's config.yaml (its latest launch), or None for a run directory without one. Its run.dir is set to
    `run_dir` as found here: a relative one names the run from wherever it was launched."""
    path = runfiles.path(run_dir, runfiles.CONFIG)
    if not os.path.exists(path):
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    cfg.run.dir = run_dir
    return cfg


def _not_live(run_dir: str) -> int:
    summary = runfiles.read_json(runfiles.path(run_dir, runfiles.SUMMARY)) or {}
    last = f" (its last launch ended {summary['status']})" if summary.get("status") else ""
    print(f"run {os.path.basename(run_dir)} is not live{last}: nothing to stop")
    return runfiles.EXIT_OK


# A run supervised on this machine ---------------------------------------------------------------------------
def _holder(run_dir: str) -> Optional[dict]:
    """The lock's record of its holder ({"pid", "host", "since"}); the launcher writes it just after taking the
    lock, so a lock held but still empty is read again for a moment."""
    deadline = time.time() + 5
    while True:
        holder = runfiles.read_json(runfiles.path(run_dir, runfiles.LOCK))
        if (isinstance(holder, dict) and isinstance(holder.get("pid"), int)) or time.time() > deadline:
            return holder if isinstance(holder, dict) else None
        time.sleep(POLL_S)


def _is_launcher(pid: int) -> bool:
    """Whether pid runs the launcher (`python -m launcher` or `tpu-launch`): the lock names its holder, and this
    guards against signalling anything else should the record be stale."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(a in (b"launcher", b"launcher.cli") or a.endswith(b"tpu-launch") for a in argv)


def _stop_local(run_dir: str, no_wait: bool) -> int:
    from launcher.rundir import RunDir

    lock = RunDir(run_dir)
    if not lock.is_locked():
        return _not_live(run_dir)
    holder = _holder(run_dir) or {}
    pid, host = holder.get("pid"), holder.get("host")
    if host != socket.gethostname():
        raise UserError("RUN", f"run {os.path.basename(run_dir)} is live on host {host} (launcher pid {pid}), "
                        "not on this machine", f"run `tpu-launch stop {run_dir}` on {host}")
    if not isinstance(pid, int) or not _is_launcher(pid):
        raise UserError("RUN", f"the lock of run {os.path.basename(run_dir)} is held, but pid {pid} it names is "
                        "not a launcher", f"see who holds {runfiles.path(run_dir, runfiles.LOCK)} (fuser)")
    summary_file = runfiles.path(run_dir, runfiles.SUMMARY)
    before = _mtime(summary_file)
    os.kill(pid, signal.SIGTERM)  # the launcher's graceful path: Terminated -> Supervisor.stop(graceful=True)
    print(f"asked the launcher of run {os.path.basename(run_dir)} (pid {pid}) to stop: every host checkpoints at "
          f"one agreed step", flush=True)
    if no_wait:
        return runfiles.EXIT_OK
    try:
        while lock.is_locked():
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print("no longer waiting; the launcher goes on stopping the run", flush=True)
        return runfiles.EXIT_OK
    if _mtime(summary_file) == before:
        print(f"the launcher of run {os.path.basename(run_dir)} ended without writing its summary (killed?); "
              f"the next launch resumes from the newest complete checkpoint")
        return runfiles.EXIT_FAILED
    return _outcome(os.path.basename(run_dir), runfiles.read_json(summary_file) or {})


def _mtime(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _outcome(name: str, summary: dict) -> int:
    status, step = summary.get("status"), summary.get("stopped_at_step")
    if status == "stopped" and step is not None:
        print(f"stopped run {name} at step {step}: every host saved a checkpoint there; type the run's command "
              f"again to resume from it")
        return runfiles.EXIT_OK
    if status == "completed":
        print(f"run {name} completed (step {summary.get('final_step')}) before it could stop")
        return runfiles.EXIT_OK
    print(f"run {name} ended {status}: {summary.get('error')}")
    return runfiles.EXIT_FAILED


# A cloud run supervised by a Ray job on its head ------------------------------------------------------------
def _stop_job(cfg, run_dir: str, no_wait: bool) -> int:
    from launcher.__main__ import use_run_token

    use_run_token(cfg)  # before Ray is imported: the token the launch reaches the head's job server with
    from launcher import job

    head = None
    try:
        if cfg.ray.address:
            url = job.job_server_url(str(cfg.ray.address), int(cfg.ray.dashboard_port))
        else:
            head = job.HeadForRun(cfg)
            url = head.reach()
            if url is None:
                return _not_live(run_dir)
        client = job.connect(url, wait_s=10.0)
        job_id = job.live_job(client, cfg.run.name)
        if job_id is None:
            return _not_live(run_dir)
        client.stop_job(job_id)  # SIGTERM to the job's launcher: the graceful stop (job.stop_env gives it time)
        print(f"asked the supervisor job {job_id} of run {cfg.run.name} to stop: every host checkpoints at one "
              f"agreed step", flush=True)
        if no_wait:
            return runfiles.EXIT_OK
        try:
            while client.get_job_status(job_id) in job.LIVE:
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("no longer waiting; the job goes on stopping the run", flush=True)
            return runfiles.EXIT_OK
        return _job_outcome(cfg.run.name, client.get_job_logs(job_id))
    finally:
        if head is not None:
            head.close()


def _job_outcome(name: str, logs: str) -> int:
    """The launcher's last word in the job's output: its stopped/completed line (the summary is on the head)."""
    lines = [line for line in logs.splitlines() if line.startswith(("error: ", "[launcher] completed"))]
    if not lines:
        print(f"the supervisor job of run {name} ended without saying how (see `ray job logs`)")
        return runfiles.EXIT_FAILED
    last = lines[-1]
    print(last)
    return runfiles.EXIT_OK if "saved a checkpoint at step" in last or last.startswith("[launcher]") \
        else runfiles.EXIT_FAILED
