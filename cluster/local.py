"""The local provider: one Ray node per host on this machine, each advertising a TPU VM's resources.

Uses `ray.cluster_utils.Cluster`: a real head (GCS) plus one real raylet per host, so Ray schedules,
fails and drains them exactly as it does TPU VMs. Trainers then run on those nodes as CPU processes.
Every node runs with `node_ip_address=127.0.0.1`, so all of the pod's ports listen on loopback only, and
with the run's Ray token (launcher/auth.py sets it in the environment the nodes inherit).
"""
import logging
import os
import socket
import time
from typing import List, Optional, Union

from cluster.slice import SliceSpec

log = logging.getLogger("cluster.local")


CPU_DEVICES_ENV = "LAUNCHER_CPU_DEVICES"
LOOPBACK = "127.0.0.1"  # every Ray process of a local pod listens here only (its head, nodes, agents, dashboard)
# Ray turns 127.0.0.1 in an address into this machine's outward IP unless its multi-machine mode is off; the
# pod's own processes (agents, workers) must reach each other on loopback, so each node runs with it off.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray processes a local pod has no use for, each a Python process that costs ~0.6-1.4 s of CPU at start on a
# machine whose cores the hosts share: the autoscaler's monitor (there is no autoscaler; drains and node status
# come from the GCS) and the log monitor (trainers log to the run directory; the driver takes no worker logs).
LEAN = {"no_monitor": True, "include_log_monitor": False}
# Ray's bookkeeping processes (GCS, dashboard, agents) run at the lowest CPU priority, below the trainers whose
# cores they share: Ray starts its workers, and so each host's actor and the trainer it spawns, at nice 15
# (Ray's worker_niceness), so at Ray's own 0 every wake-up of theirs would preempt a training step on a 2-core
# machine. Raylets keep 0: they start the workers, and a host is lost if its raylet stops answering.
DAEMON_NICE = 19


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def yield_cpu(pids, spare=()) -> None:
    """Every thread of these processes (but those named in spare) at DAEMON_NICE: on Linux a priority is a
    thread's, and a thread or process started later takes its creator's. (Not the host actors: a threaded actor
    runs each attempt's `run` on any of its threads, and the trainer it spawns takes that thread's priority.)"""
    import psutil  # comes with ray[default]

    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.name() in spare:
                continue
            for thread in proc.threads():
                if os.getpriority(os.PRIO_PROCESS, thread.id) < DAEMON_NICE:
                    os.setpriority(os.PRIO_PROCESS, thread.id, DAEMON_NICE)
        except (psutil.Error, OSError):  # exited meanwhile, or not ours to change: it keeps its priority
            continue


def cpu_host_env(spec: SliceSpec, worker_id: int) -> dict:
    """A TPU VM's env vars, plus the number of CPU devices its trainer should fake (this host has no TPU)."""
    return {**spec.host_env(worker_id), CPU_DEVICES_ENV: str(spec.devices_per_host)}


class LocalProvider:
    """Brings one or more slices up as local Ray nodes (own cluster) and tears them down."""

    def __init__(self, slices: Union[SliceSpec, List[SliceSpec]], cpus_per_host: int = 1, dashboard: bool = False):
        self.slices = [slices] if isinstance(slices, SliceSpec) else list(slices)
        self.cpus_per_host, self.dashboard = cpus_per_host, dashboard
        self.cluster = None
        self.nodes = []
        self.hosts = []  # (slice, worker id) of each node in self.nodes

    def up(self) -> str:
        """Start the head and all hosts; returns the Ray address to connect to."""
        from ray.cluster_utils import Cluster

        t0 = time.time()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": self.dashboard, "object_store_memory": 80 * 1024 * 1024,
            "node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK, "env_vars": dict(LOOPBACK_ENV),
            # a free port, not Ray's fixed default: several local pods (or tests) may run on one machine
            "dashboard_agent_listen_port": _free_port(), **LEAN})
        for spec in self.slices:
            for worker_id in range(spec.hosts):
                self.nodes.append(self.add_host(spec, worker_id, wait=False))
                self.hosts.append((spec, worker_id))
        self.cluster.wait_for_nodes()
        yield_cpu([p["pid"] for p in self.processes()], spare=("raylet",))
        log.info("local pod: %d hosts up in %.1fs", len(self.nodes), time.time() - t0)
        return self.cluster.address

    def add_host(self, spec: SliceSpec, worker_id: int, wait: bool = True):
        return self.cluster.add_node(
            wait=wait, num_cpus=self.cpus_per_host, resources=spec.host_resources(worker_id),
            labels=spec.host_labels(worker_id), env_vars={**cpu_host_env(spec, worker_id), **LOOPBACK_ENV},
            object_store_memory=80 * 1024 * 1024, node_ip_address=LOOPBACK, include_log_monitor=False)

    def repair(self, bad_node_ids=()) -> List[str]:
        """Replace each host whose Ray node died or is listed in bad_node_ids (drained): the local stand-in
        for re-provisioning a preempted TPU VM. Returns the replaced nodes' ids."""
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        replaced, fresh = [], []
        for k, node in enumerate(self.nodes):
            if node.node_id in alive and node.node_id not in set(bad_node_ids):
                continue
            try:
                self.cluster.remove_node(node, allow_graceful=False)
            except Exception:  # noqa: BLE001 - already gone
                pass
            spec, worker_id = self.hosts[k]
            self.nodes[k] = self.add_host(spec, worker_id, wait=False)
            replaced.append(node.node_id)
            fresh.append(self.nodes[k])
        if replaced:
            self.cluster.wait_for_nodes()
            # the new nodes only: the others' children now include host workers and trainers
            yield_cpu([p["pid"] for p in self.processes(fresh)], spare=("raylet",))
        return replaced

    def processes(self, nodes=None) -> List[dict]:
        """This pod's running Ray processes (head and raylets) as {"pid", "start_time"}, recorded so a later
        launch can clean up after a supervisor that died without shutting them down. The start time
        (cluster/hygiene.py::process_start_time) tells a recorded process from a later one reusing its pid.
        nodes: only these nodes' processes (default: the head's and every host's)."""
        import psutil  # comes with ray[default]

        from cluster.hygiene import process_start_time

        pids = []
        if nodes is None:
            nodes = ([self.cluster.head_node] if self.cluster and self.cluster.head_node else []) + self.nodes
        for node in nodes:
            for infos in node.all_processes.values():
                for info in infos:
                    if info.process is not None and info.process.poll() is None:
                        pids.append(info.process.pid)
        # The raylets start their agents (dashboard agent, runtime-env agent) as children Ray does not list in
        # all_processes: without them a takeover would kill the raylets and leave the agents running as orphans.
        for pid in list(pids):
            try:
                pids.extend(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                continue  # it exited meanwhile: nothing of it to record
        procs = []
        for pid in dict.fromkeys(pids):
            start_time = process_start_time(pid)
            if start_time is not None:
                procs.append({"pid": pid, "start_time": start_time})
        return procs

    def down(self) -> None:
        if self.cluster is not None:
            try:
                self.cluster.shutdown()
            finally:
                self.cluster = None
                self.nodes = []
                self.hosts = []


class AttachedProvider:
    """An existing Ray cluster (`ray.address`) whose TPU hosts are already up; nothing to create or delete."""

    def __init__(self, address: str):
        self.address = address

    def up(self) -> Optional[str]:
        return self.address

    def repair(self, bad_node_ids=()) -> List[str]:
        return []  # the cluster's own autoscaler replaces lost hosts

    def down(self) -> None:
        pass
