"""Delete what a run left running: for a cloud run its queued resource (the TPU VMs), its Ray head VM and its Ray-token
secret in Secret Manager; for a local run the pod processes a dead launcher left behind. It shows them and asks
first (--yes: do not ask; without a terminal, --yes is required). Checkpoints, data and the run directory stay, so
the run's command typed again provisions afresh and resumes from the newest checkpoint.

The resources are found by name from the run's config.yaml (cluster.project, cluster.zone, run.name), as the launch
names them. A live launch is refused: stop it first (`tpu-launch stop RUN`).

  tpu-launch down demo          # show, ask, delete
  tpu-launch down runs/demo --yes
"""
import argparse
import os
import sys
from typing import Callable, List, Tuple

from launcher.commands.common import add_root, resolve_run
from launcher.commands.stop import run_config
from launcher.errors import UserError
from trainer import runfiles

HELP = "delete what the run left in the cloud, or a local pod left behind (checkpoints and data stay)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory, or a run name under --root")
    add_root(p)
    p.add_argument("--yes", "-y", action="store_true", help="delete without asking")


# (what, its state, how to delete it) for each thing found
Found = List[Tuple[str, str, Callable[[], None]]]


def run(args) -> int:
    from launcher.rundir import RunDir

    run_dir = resolve_run(args.run, args.root)
    name = os.path.basename(run_dir)
    if RunDir(run_dir).is_locked():
        holder = runfiles.read_json(runfiles.path(run_dir, runfiles.LOCK)) or {}
        raise UserError("RUN", f"a launch of run {name} is live (launcher pid {holder.get('pid')} on "
                        f"{holder.get('host')})", f"stop it first: tpu-launch stop {args.run}")
    cfg = run_config(run_dir)
    cloud = cfg is not None and cfg.cluster.provider != "local"
    found = _cloud(cfg, run_dir) if cloud else _local(run_dir)
    if not found:
        print(f"nothing to delete: run {name} has " + ("no queued resource, head VM or Ray-token secret in project "
                                                       f"{cfg.cluster.project}" if cloud else "no pod left running"))
        return runfiles.EXIT_OK
    print(f"run {name} left:")
    for what, state, _ in found:
        print(f"  {what} ({state})")
    if cloud:
        print(f"checkpoints and data stay: {cfg.checkpoint.dir}" + (f", {cfg.cluster.bucket}" if cfg.cluster.bucket
                                                                      else ""))
    if not args.yes and not _confirm("delete " + ("them" if len(found) > 1 else "it")):
        print("nothing deleted")
        return runfiles.EXIT_OK
    failed = 0
    for what, _, delete in found:
        print(f"deleting {what} ...", flush=True)  # a queued resource or a VM takes minutes to go
        try:
            delete()
            print(f"deleted {what}", flush=True)
        except _errors() as e:  # one resource failing to go is said; the others are still deleted
            from launcher.errors import first_line

            print(f"error: could not delete {what}: {first_line(e)}", file=sys.stderr, flush=True)
            failed += 1
    return runfiles.EXIT_FAILED if failed else runfiles.EXIT_OK


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UserError("--yes", "not deleting without confirmation: stdin is not a terminal",
                        "pass --yes to delete without asking")
    try:
        return input(f"{question}? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _errors() -> tuple:
    from google.api_core import exceptions as gexc

    from cluster.gcp import ProvisionError

    return ProvisionError, gexc.GoogleAPICallError, OSError


# A cloud run ------------------------------------------------------------------------------------------------
def _cloud(cfg, run_dir: str) -> Found:
    """The run's queued resource, head VM (only runs that had the launcher create one: no ray.address) and secret,
    each as the launch named it; a one-line UserError if the APIs cannot be asked."""
    from cluster.gcp import NOT_FOUND, GcpTpuProvider, make_client
    from cluster.head_vm import HeadVm, make_compute_client
    from cluster.secrets import RunSecret

    c, run_name = cfg.cluster, str(cfg.run.name)
    say = lambda msg: None  # noqa: E731 - what is deleted is said once, by run()
    poll_s = 0.5 if c.tpu_api_endpoint else 5.0
    found: Found = []
    try:
        tpu = GcpTpuProvider(str(c.project), str(c.zone), client=make_client(c.tpu_api_endpoint), poll_s=poll_s,
                             timeout_s=float(c.provision_timeout_s), progress=say)
        state = tpu.state(run_name)
        if state != NOT_FOUND:
            nodes = ", ".join(f"{n} {s}" for n, s in tpu.node_states(run_name).items())
            found.append((f"queued resource {tpu.qr_id(run_name)}", f"{state}; TPU nodes: {nodes or 'none'}",
                          lambda: tpu.delete(run_name, wait=True)))
        if not cfg.ray.address:
            head = HeadVm(str(c.project), str(c.zone), client=make_compute_client(c.compute_api_endpoint),
                          poll_s=0.5 if c.compute_api_endpoint else 5.0, progress=say)
            status = head.status(run_name)
            if status != NOT_FOUND:
                found.append((f"head VM {head.instance_name(run_name)}", status,
                              lambda: _delete_head(head, run_name, run_dir)))
        secret = RunSecret(str(c.project), endpoint=c.secret_manager_endpoint, progress=say)
        if secret.exists(run_name):
            found.append((f"secret {secret.name(run_name)}", "the run's Ray token", lambda: secret.delete(run_name)))
    except _errors() as e:
        from launcher.errors import first_line

        raise UserError("cluster.project", f"cannot list run {run_name}'s cloud resources in project {c.project}, "
                        f"zone {c.zone}: {first_line(e)}",
                        "check your credentials (gcloud auth application-default login) and the project") from None
    return found


def _delete_head(head, run_name: str, run_dir: str) -> None:
    """Delete the head VM, and forget its pinned SSH host key: the next launch's head is a new VM with a new key."""
    from launcher.job import KNOWN_HOSTS

    head.delete(run_name, wait=True)
    try:
        os.remove(runfiles.path(run_dir, runfiles.AUTH, KNOWN_HOSTS))
    except FileNotFoundError:
        pass


# A local run ------------------------------------------------------------------------------------------------
def _local(run_dir: str) -> Found:
    """The local pod a launcher that died left behind (no live launcher holds the lock: run() checked): its Ray
    processes recorded in pod.json, and any trainer still running under a host's heartbeat. Each is a process
    whose pid AND start time match the record (cluster/hygiene.py): a reused pid is someone else's."""
    from cluster.hygiene import leftover_trainer, recorded_processes
    from trainer.heartbeat import process_start_time

    found: Found = []
    pod = runfiles.read_json(runfiles.path(run_dir, runfiles.POD))
    recorded = recorded_processes(pod if isinstance(pod, dict) else {})
    running = [p for p in recorded if isinstance(p, dict) and isinstance(p.get("pid"), int)
               and p.get("start_time") is not None and process_start_time(p["pid"]) == p.get("start_time")]
    if running:
        found.append(("local pod", f"{len(running)} Ray processes: pids {', '.join(str(p['pid']) for p in running)}",
                      lambda: _kill_pod(run_dir, running)))
    elif pod is not None:  # a record of processes that are all gone: nothing to stop, the record goes
        _forget_pod(run_dir)
    for host in runfiles.host_ids(run_dir, runfiles.HOSTS):
        pid = leftover_trainer(runfiles.heartbeat_file(run_dir, host))
        if pid is not None:
            found.append((f"trainer of host {host}", f"pid {pid}", lambda hb=runfiles.heartbeat_file(run_dir, host):
                          _kill_trainer(hb)))
    return found


def _kill_pod(run_dir: str, running: list) -> None:
    from cluster.hygiene import kill_recorded

    _, skipped = kill_recorded(running)
    denied = [s["pid"] for s in skipped if s["reason"] == "not permitted"]  # the others are gone already
    if denied:
        raise OSError(f"not permitted to kill pids {denied}")
    _forget_pod(run_dir)


def _forget_pod(run_dir: str) -> None:
    try:
        os.remove(runfiles.path(run_dir, runfiles.POD))
    except FileNotFoundError:
        pass


def _kill_trainer(heartbeat: str) -> None:
    from cluster.hygiene import clean_host, leftover_trainer

    clean_host(heartbeat, devices=[])  # devices=[]: this machine's TPU (if any) is not the run's to free
    if leftover_trainer(heartbeat) is not None:
        raise OSError("it still runs (not permitted?)")
