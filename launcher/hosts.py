"""Ray side of a run: reserve a whole slice (one bundle per host) and start one trainer process per host.

`HostActor` lives on a host's Ray node and owns that host's trainer subprocess; `SliceGroup` gang-schedules
the actors by slice (a STRICT_SPREAD placement group whose bundles need the slice's resource, bundle 0 the
`TPU-<type>-head` resource) and maps each to its TPU worker id, which becomes its JAX process id.
"""
import os
import random
import signal
import socket
import subprocess
import sys
from typing import Dict, List, Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.hygiene import clean_host
from cluster.local import CPU_DEVICES_ENV
from cluster.maintenance import GCE_METADATA_URL, METADATA_URL_ENV, MaintenanceWatch
from cluster.slice import SliceSpec
from launcher.runsync import WHOLE, list_event_files, read_new


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def coordinator_port(rng: Optional[random.Random] = None, host: str = "") -> int:
    """A free port for the JAX coordinator, if this host is worker 0.

    Taken below the kernel's ephemeral range (and above Ray's worker ports, 10002-19999): a port from bind(0)
    is free now but may be handed to another process's outgoing connection in the seconds before the trainer
    binds it ("Failed to add port to server"); a port outside that range is never handed out implicitly.
    The coordinator listens on `host` (the node's address) only, so the port is checked there.
    """
    rng = rng or random.SystemRandom()
    low, high = 20000, _ephemeral_low() - 1
    if high <= low:
        low, high = 20000, 29999
    for _ in range(200):
        port = rng.randint(low, high)
        try:
            with socket.socket(socket.AF_INET6 if ":" in host or (not host and socket.has_ipv6)
                               else socket.AF_INET) as s:
                s.bind((host, port))
            return port
        except OSError:
            continue
    raise HostStartError(f"no free port in {low}-{high} for the JAX coordinator")


class HostStartError(Exception):
    """Ray could not place one trainer on every host of the slice."""


@ray.remote(num_cpus=0, max_concurrency=4)
class HostActor:
    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None

    def info(self) -> Dict:
        ip = ray.util.get_node_ip_address()
        return {"worker_id": int(os.environ.get("TPU_WORKER_ID", "-1")), "ip": ip, "port": coordinator_port(host=ip),
                "hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                "actor_pid": os.getpid()}

    def prepare(self, log_path: str, cwd: str, files: Optional[Dict[str, str]] = None,
                heartbeat_file: Optional[str] = None, sync_names: List[str] = ()) -> Dict:
        """Before every start: clean the host (cluster/hygiene.py): a trainer of an earlier attempt still
        running (its pid in `heartbeat_file`) is killed, and on a TPU VM whatever holds the TPU. Then write
        `files` (path -> text: a host-local run directory's config, when the host does not share the
        supervisor's filesystem) and drop a stale result.json there. Returns the hygiene actions and the
        current sizes of `sync_names` (RunSync starts from there, so nothing is synced twice)."""
        self.stop(grace_s=0)
        cleaned = clean_host(heartbeat_file)
        if files:
            for name in WHOLE:
                try:
                    os.remove(os.path.join(cwd, name))
                except FileNotFoundError:
                    pass
            for path, text in files.items():
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        os.makedirs(cwd, exist_ok=True)
        sizes = {}
        for name in sync_names:
            try:
                sizes[name] = os.path.getsize(os.path.join(cwd, name))
            except OSError:
                sizes[name] = 0
        return {"cleaned": cleaned, "sizes": sizes}

    def run(self, argv: List[str], env: Dict[str, str], log_path: str, cwd: str, cleaned: List[str] = ()) -> int:
        """Run the trainer to completion; its output goes to log_path. Returns its exit code (a signal n as
        128+n, as a shell reports it)."""
        full_env = {**os.environ, **env}
        cpu_devices = os.environ.get(CPU_DEVICES_ENV)
        if cpu_devices:  # a stand-in host (local pod, test VM): CPU devices in place of TPU chips
            argv = [*argv, "--devices", cpu_devices]
            full_env["JAX_PLATFORMS"] = "cpu"
        with open(log_path, "ab", buffering=0) as log:
            for action in cleaned:
                log.write(f"[hygiene] {action}\n".encode())
            self.proc = subprocess.Popen([sys.executable, *argv], env=full_env, cwd=cwd, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
            watch = self._watch_maintenance(log, cpu_devices)
            try:
                code = self.proc.wait()
            finally:
                if watch is not None:
                    watch.stop()
        return 128 - code if code < 0 else code

    def _watch_maintenance(self, log, stand_in: Optional[str]) -> Optional[MaintenanceWatch]:
        """On a TPU VM (or wherever LAUNCHER_METADATA_URL points), a GCE maintenance or preemption notice
        becomes SIGTERM to the trainer: the preemption notice all hosts honour at one agreed step."""
        url = os.environ.get(METADATA_URL_ENV) or (None if stand_in else GCE_METADATA_URL)
        if not url:
            return None

        def notice(what: str) -> None:
            log.write(f"[host] GCE notice: {what}; sending the trainer SIGTERM (checkpoint and restart)\n".encode())
            self.signal(signal.SIGTERM)

        return MaintenanceWatch(url, notice).start()

    def signal(self, signum: int) -> bool:
        """Send a signal to the trainer's process group (SIGTERM: preemption notice; SIGUSR1: stack dump)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            os.killpg(self.proc.pid, signum)
            return True
        except ProcessLookupError:
            return False

    def fresh_port(self) -> int:
        return coordinator_port(host=ray.util.get_node_ip_address())

    def pull(self, root: str, offsets: Dict[str, int]):
        """New bytes of this host's run-directory files (see launcher/runsync.py)."""
        return read_new(root, offsets)

    def event_files(self, root: str) -> List[str]:
        """This host's TensorBoard event files (launcher/runsync.py asks host 0 before each pull)."""
        return list_event_files(root)

    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def stop(self, grace_s: float = 5.0) -> Optional[int]:
        """SIGTERM the trainer's process group (a preemption notice: it saves at an agreed step and exits),
        SIGKILL after grace_s; grace_s=0: SIGKILL at once."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        try:
            if grace_s <= 0:
                raise subprocess.TimeoutExpired("trainer", 0)
            os.killpg(self.proc.pid, signal.SIGTERM)
            os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped (SIGSTOP) trainer must see it too
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        return self.proc.returncode


class SliceGroup:
    """One HostActor per host of a slice, placed by the slice's resources; index i = JAX process i."""

    def __init__(self, spec: SliceSpec, timeout_s: float):
        self.spec = spec
        bundles = [{"TPU": float(spec.devices_per_host), spec.name: 1.0} for _ in range(spec.hosts)]
        bundles[0][spec.head_resource] = 1.0
        self.pg = placement_group(bundles, strategy="STRICT_SPREAD", name=f"slice-{spec.name}")
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise HostStartError(
                f"could not reserve {spec.hosts} hosts of slice {spec.name} ({spec.accelerator_type}) in "
                f"{timeout_s:.0f}s: the Ray cluster has {_slice_hosts(spec)} of them") from None
        actors = [HostActor.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            resources={"TPU": float(spec.devices_per_host)}, name=None).remote() for i in range(spec.hosts)]
        infos = ray.get([a.info.remote() for a in actors], timeout=timeout_s)
        order = sorted(range(len(actors)), key=lambda i: infos[i]["worker_id"])
        self.actors = [actors[i] for i in order]
        self.infos = [infos[i] for i in order]
        ids = [info["worker_id"] for info in self.infos]
        if ids != list(range(spec.hosts)):
            self.close()
            raise HostStartError(f"slice {spec.name}: hosts report TPU worker ids {ids}, "
                                 f"expected 0..{spec.hosts - 1}")

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001
            pass


class Pod:
    """Every slice of a run, reserved slice by slice; JAX process id = slice index x hosts + TPU worker id."""

    def __init__(self, slices: List[SliceSpec], timeout_s: float):
        self.groups: List[SliceGroup] = []
        try:
            for spec in slices:
                self.groups.append(SliceGroup(spec, timeout_s))
        except BaseException:
            self.close()
            raise
        self.actors = [a for g in self.groups for a in g.actors]
        self.infos = [dict(info, slice=i) for i, g in enumerate(self.groups) for info in g.infos]

    @property
    def coordinator(self) -> str:
        head = self.infos[0]
        return f"{head['ip']}:{head['port']}"

    def slice_of(self, process_id: int) -> int:
        return self.infos[process_id]["slice"]

    def prepare(self, log_path_for, cwd_for, files_for=lambda i: None, heartbeat_for=lambda i: None,
                sync_names_for=lambda i: (), timeout_s: float = 120) -> List[Dict]:
        """Clean every host and write its files (HostActor.prepare), all before any trainer starts."""
        return ray.get([actor.prepare.remote(log_path_for(i), cwd_for(i), files_for(i), heartbeat_for(i),
                                             list(sync_names_for(i)))
                        for i, actor in enumerate(self.actors)], timeout=timeout_s)

    def start(self, argv_for, env_for, log_path_for, cwd_for, prepared: Optional[List[Dict]] = None):
        """Start every host's trainer; returns the ObjectRefs of their exit codes, by process id."""
        return [actor.run.remote(argv_for(i), env_for(i), log_path_for(i), cwd_for(i),
                                 (prepared[i]["cleaned"] if prepared else []))
                for i, actor in enumerate(self.actors)]

    def new_coordinator(self, timeout_s: float = 30) -> str:
        """A fresh coordinator port on host 0 for the next attempt (the last one's may linger in TIME_WAIT)."""
        port = ray.get(self.actors[0].fresh_port.remote(), timeout=timeout_s)
        self.infos[0]["port"] = port
        return self.coordinator

    def signal(self, hosts, signum: int) -> None:
        refs = [self.actors[i].signal.remote(signum) for i in hosts]
        try:
            ray.get(refs, timeout=10)
        except Exception:  # noqa: BLE001 - a dead host cannot be signalled
            pass

    def stop_all(self, grace_s: float = 5.0) -> None:
        refs = [a.stop.remote(grace_s) for a in self.actors]
        try:
            ray.get(refs, timeout=grace_s + 10)
        except Exception:  # noqa: BLE001 - a dead host has nothing left to stop
            pass

    def healthy(self, timeout_s: float = 10) -> bool:
        """Every host's actor (and so its Ray node) still answers: the slice can be reused as it is."""
        try:
            ray.get([a.pid.remote() for a in self.actors], timeout=timeout_s)
            return True
        except Exception:  # noqa: BLE001 - a dead actor, node or timeout: not reusable
            return False

    def close(self) -> None:
        for g in self.groups:
            g.close()


def _slice_hosts(spec: SliceSpec) -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive") and spec.name in n.get("Resources", {}))

