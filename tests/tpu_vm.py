"""Test helper: TPU VMs on this machine. A READY node's hosts boot by running the node's own `startup-script`.

`BootedHosts` is the Cloud TPU API server's (tests/tpu_api_server.py) stand-in for GCE: when a node turns
READY it runs, for each host, the node metadata's `startup-script` (cluster/bootstrap.py) with bash, in a
session of its own, in an environment that stands in for a TPU VM:

- the host's env vars (TPU_NAME, TPU_WORKER_ID, ... and LAUNCHER_CPU_DEVICES: cluster.local.cpu_host_env),
  the bootstrap's own log/workdir overrides (TPU_LAUNCHER_BOOTSTRAP_LOG, TPU_LAUNCHER_WORKDIR) pointing into
  the host's directory, and PYTHONPATH at this checkout (standing in for the installed wheel);
- a PATH shim dir (`bin/`), each shim logging its call to the host's `calls.log`:
  `curl` runs the real curl with http://metadata.google.internal/ pointed at a local metadata server (the
  node's metadata attributes, a fake service-account token) and https://storage.googleapis.com/ at the GCS
  emulator, so the wheel and its hash-locked requirements really come from the run's bucket (and the script
  really checks their sha256); `python3 -m pip` only records the install, with its arguments, and installs
  nothing;
  `rm -f /tmp/libtpu_lockfile`, `fuser` and `lsof` only record the TPU host cleanup (never kill or delete
  on a shared machine);
  `ray stop --force` is a no-op (it would stop the test's own Ray head); `ray start` runs the real
  `ray start` with the script's arguments, adds what Ray's own TPU detection would on a TPU VM (TPU chips,
  `TPU-<type>-head` on worker 0, accelerator_type, the `ray.io/tpu-*` labels: SliceSpec.host_resources /
  host_labels) and what a shared test machine needs (1 CPU, a small object store, free ports, no log
  monitor of its own: the head's reads the shared session logs; one `ray start` at a time). The Ray node
  itself runs with PATH minus the shims.

On delete or preempt the host's session (the script and every Ray process it started) is killed with
SIGKILL, as a VM going away; `nodes` drops the node. After a host's script exits, the bootstrap's steps are
checked (log lines, recorded calls: the lock installed with `--require-hashes --no-deps`, then the wheel with
`--no-deps`, nothing else; the fetched wheel and lock); any failure lands in `errors`.
"""
from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional

from cluster import catalog
from cluster.bootstrap import HEAD_ADDRESS_ATTR, HEAD_PORT_ATTR
from cluster.local import cpu_host_env
from cluster.slice import SliceSpec, catalog_slice
from launcher.wheel import LOCK_LINE, LOCK_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METADATA_HOST = "http://metadata.google.internal/"
STORAGE_HOST = "https://storage.googleapis.com/"
FAKE_TOKEN = "ya29.fake-tpu-vm-token"
BOOT_TIMEOUT_S = 180
OBJECT_STORE_BYTES = 80 * 1024 * 1024


class MetadataServer:
    """The GCE metadata server of every fake TPU VM: GET /vm/<node>/<worker>/computeMetadata/v1/instance/...

    Serves `attributes/<key>` from the node's metadata (read per request, as the real one), the default
    service account's token, `hostname` and the VM's internal IP (`network-interfaces/0/ip`: `internal_ip`, this
    machine's address where the test's Ray head listens; the startup script refuses to start Ray without one);
    like GCE, requires `Metadata-Flavor: Google`.
    """

    def __init__(self, internal_ip: str = "127.0.0.1"):
        self.internal_ip = internal_ip
        self.metadata: Dict[str, Dict[str, str]] = {}  # node name -> its metadata attributes
        self.requests: List[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                status, body = server.answer(self.path, self.headers.get("Metadata-Flavor"))
                data = body.encode()
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, name="tpu-vm-metadata", daemon=True).start()

    def answer(self, path: str, flavor: Optional[str]) -> tuple:
        parts = path.split("?", 1)[0].strip("/").split("/")
        if len(parts) < 6 or parts[0] != "vm" or parts[3:6] != ["computeMetadata", "v1", "instance"]:
            return 404, "not found"
        if flavor != "Google":
            return 403, "Missing Metadata-Flavor:Google header."
        node, worker, rest = parts[1], parts[2], parts[6:]
        attrs = self.metadata.get(node, {})
        if len(rest) == 2 and rest[0] == "attributes" and rest[1] in attrs:
            return 200, attrs[rest[1]]
        if rest == ["service-accounts", "default", "token"]:
            return 200, json.dumps({"access_token": FAKE_TOKEN, "expires_in": 3599, "token_type": "Bearer"})
        if rest == ["hostname"]:
            return 200, f"t1v-n-{node}-w-{worker}.internal"
        if rest == ["network-interfaces", "0", "ip"]:
            return 200, self.internal_ip
        return 404, "not found"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


_LOG = 'printf "%s\\n" "$(basename "$0") $*" >>{calls}\n'

_CURL = """#!/bin/bash
# curl on a fake TPU VM: the metadata server and storage.googleapis.com are this machine's test servers.
{log}args=()
for a in "$@"; do
  case "$a" in
    {md_host}*) a={md_url}/"${{a#{md_host}}}" ;;
    {gcs_host}*) a={gcs_url}/"${{a#{gcs_host}}}" ;;
  esac
  args+=("$a")
done
exec {curl} "${{args[@]}}"
"""

_PYTHON3 = """#!/bin/bash
# python3 on a fake TPU VM: `-m pip` is recorded only, with its arguments (the project is importable through
# PYTHONPATH); the checks read what the startup script asked pip for.
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = pip ]; then
  {log}  exit 0
fi
exec {python} "$@"
"""

_RECORD_ONLY = """#!/bin/bash
# {name} on a fake TPU VM: recorded only; the TPU host cleanup must not touch this shared machine.
{log}"""

_RM = """#!/bin/bash
# rm on a fake TPU VM: removing /tmp/libtpu_lockfile is recorded only (it is this shared machine's file).
{log}[ "$*" = "-f /tmp/libtpu_lockfile" ] && exit 0
exec {rm} "$@"
"""

_RAY = """#!{python}
# ray on a fake TPU VM: `ray stop` is a no-op (the test's Ray head runs on this machine); `ray start` runs the
# real one with the script's arguments plus what Ray's TPU detection would add on a TPU VM and what a shared
# test machine needs.
import fcntl, json, os, socket, subprocess, sys

CALLS, REAL_RAY, LOCK = {calls!r}, {real_ray!r}, {lock!r}
DETECTED_RESOURCES, DETECTED_LABELS = {resources!r}, {labels!r}
args = sys.argv[1:]
with open(CALLS, "a") as f:
    f.write("ray " + " ".join(args) + "\\n")
if args[:1] == ["stop"]:
    sys.exit(0)
if args[:1] != ["start"]:
    os.execv(REAL_RAY, [REAL_RAY, *args])

def take(flag):
    for k, a in enumerate(args):
        if a == flag and k + 1 < len(args):
            value = args[k + 1]
            del args[k:k + 2]
            return value
        if a.startswith(flag + "="):
            del args[k]
            return a.split("=", 1)[1]
    return None

resources = {{**DETECTED_RESOURCES, **json.loads(take("--resources") or "{{}}")}}
labels = dict(DETECTED_LABELS)
for pair in filter(None, (take("--labels") or "").split(",")):
    key, value = pair.split("=", 1)
    labels[key] = value  # the script's labels override detected ones, as in Ray
with socket.socket() as s:
    s.bind(("", 0))
    agent_port = s.getsockname()[1]
cmd = [REAL_RAY, *args, "--resources=" + json.dumps(resources, separators=(",", ":")),
       "--labels=" + ",".join(f"{{k}}={{v}}" for k, v in labels.items()),
       "--num-cpus=1", "--object-store-memory={store}", "--dashboard-agent-listen-port=%d" % agent_port,
       "--min-worker-port=0", "--max-worker-port=0", "--include-log-monitor=False", "--disable-usage-stats"]
with open(CALLS, "a") as f:
    f.write("run " + " ".join(cmd[1:]) + "\\n")
# One `ray start` at a time on this machine (Ray gives a node 30 s to register; parallel starts on a loaded
# 2-core machine miss that), as ray.cluster_utils adds nodes one by one.
# The node runs with the VM's own PATH: these shims are the startup script's only.
here = os.path.dirname(os.path.abspath(__file__))
env = dict(os.environ, PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != here))
with open(LOCK, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    sys.exit(subprocess.call(cmd, env=env))
"""


class TpuVmHost:
    """One host (TPU VM) of a node: its directory, shims and the session running its startup script."""

    def __init__(self, root: Path, spec: SliceSpec, worker_id: int, metadata_url: str, storage_url: str,
                 ray_start_lock: Path):
        self.spec, self.worker_id, self.ray_start_lock = spec, worker_id, ray_start_lock
        self.dir = root / f"host-{worker_id}"
        self.bin, self.workdir = self.dir / "bin", self.dir / "work"
        self.boot_log, self.calls_log = self.dir / "bootstrap.log", self.dir / "calls.log"
        self.metadata_url, self.storage_url = metadata_url.rstrip("/"), storage_url.rstrip("/")
        self.proc: Optional[subprocess.Popen] = None
        self.killed = self.gone = False

    def _write_shims(self) -> None:
        self.bin.mkdir(parents=True, exist_ok=True)
        q = shlex.quote
        log = _LOG.format(calls=q(str(self.calls_log)))
        md_url = f"{self.metadata_url}/vm/{self.spec.name}/{self.worker_id}"
        real_curl = _which("curl", exclude=self.bin)
        shims = {
            "curl": _CURL.format(log=log, md_host=METADATA_HOST, md_url=q(md_url), gcs_host=STORAGE_HOST,
                                 gcs_url=q(self.storage_url), curl=q(real_curl)),
            "python3": _PYTHON3.format(log=log, python=q(sys.executable)),
            "ray": _RAY.format(python=sys.executable, calls=str(self.calls_log),
                               real_ray=os.path.join(os.path.dirname(sys.executable), "ray"),
                               lock=str(self.ray_start_lock),
                               resources=self.spec.host_resources(self.worker_id),
                               labels=self.spec.host_labels(self.worker_id), store=OBJECT_STORE_BYTES),
        }
        shims["rm"] = _RM.format(log=log, rm=q(_which("rm", exclude=self.bin)))
        for name in ("fuser", "lsof"):
            shims[name] = _RECORD_ONLY.format(name=name, log=log)
        for name, text in shims.items():
            path = self.bin / name
            path.write_text(text)
            path.chmod(0o755)

    def env(self) -> Dict[str, str]:
        pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
        # A VM starts with no Ray token of this machine's: its script must fetch the run's from Secret Manager.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        return {**inherited, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": pythonpath, **cpu_host_env(self.spec, self.worker_id),
                "TPU_LAUNCHER_BOOTSTRAP_LOG": str(self.boot_log), "TPU_LAUNCHER_WORKDIR": str(self.workdir)}

    def boot(self, script: str) -> None:
        """Run the startup script (as GCE does at boot) in a new session: the VM's process tree."""
        self._write_shims()
        self.calls_log.write_text("")
        (self.dir / "startup-script").write_text(script)
        with open(self.boot_log, "ab") as out:
            self.proc = subprocess.Popen(["bash", str(self.dir / "startup-script")], cwd=self.dir, env=self.env(),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def calls(self) -> List[str]:
        return self.calls_log.read_text().splitlines() if self.calls_log.exists() else []

    def check(self, head: str) -> List[str]:
        """What the bootstrap should have done, but did not (empty when it all ran)."""
        log = self.boot_log.read_text() if self.boot_log.exists() else ""
        calls, problems = self.calls(), []
        wheels = sorted(self.workdir.glob("*.whl"))
        if "[bootstrap]" not in log or f"joined {head}" not in log:
            problems.append("no '[bootstrap] ... joined' line in its log")
        if not any(c.startswith("curl ") and "service-accounts/default/token" in c for c in calls) or \
                not any(c.startswith("curl ") and "-H @/dev/fd/" in c and "storage" in c for c in calls):
            problems.append("did not fetch the wheel with the service account's token (in a header from a pipe)")
        if len(wheels) != 1 or not zipfile.is_zipfile(wheels[0]) or \
                "cluster/bootstrap.py" not in zipfile.ZipFile(wheels[0]).namelist():
            problems.append(f"no project wheel fetched into its workdir: {wheels}")
        lock = self.workdir / LOCK_NAME
        pins = lock.read_text().splitlines() if lock.is_file() else []
        if not pins or not all(LOCK_LINE.match(p) for p in pins):
            problems.append(f"no hash-locked requirements fetched into its workdir: {pins[:3]}")
        if log.count("[bootstrap] fetched ") < 2 or "does not match the staged" in log:
            problems.append("did not fetch and verify both the wheel and the lock")
        installs = [c.split() for c in calls if c.startswith("python3 -m pip install")]
        locked = [k for k, a in enumerate(installs)
                  if "--require-hashes" in a and "--no-deps" in a and "-r" in a
                  and a[a.index("-r") + 1:][:1] == [str(lock)]]
        if not locked:
            problems.append(f"did not pip install the lock with --require-hashes --no-deps: {installs}")
        if wheels:
            wheel = [k for k, a in enumerate(installs) if str(wheels[0]) in a and "--no-deps" in a]
            if not wheel or (locked and wheel[0] < locked[0]):
                problems.append(f"did not pip install the wheel with --no-deps after the lock: {installs}")
        if len(installs) != 2:
            problems.append(f"pip installed something besides the lock and the wheel: {installs}")
        if "ray stop --force" not in calls or "rm -f /tmp/libtpu_lockfile" not in calls:
            problems.append("did not clean the TPU host")
        if not any(c.startswith(f"ray start --address={head} ") for c in calls):
            problems.append("did not `ray start` against the head")
        ip = head.rsplit(":", 1)[0]  # the VMs' internal IP (MetadataServer): the head's, this machine's address
        if not any(c.startswith(f"ray start --address={head} --node-ip-address={ip} ") for c in calls):
            problems.append(f"did not `ray start` on its internal IP {ip} from the metadata server")
        token = self.workdir / "ray_token"
        if not token.is_file() or (token.stat().st_mode & 0o077) or "wrote the Ray token" not in log:
            problems.append("did not fetch the run's Ray token from Secret Manager into a 0600 file")
        return [f"{self.spec.name} host {self.worker_id}: {p}; log tail: {log[-800:]!r}" for p in problems]

    def session_pids(self) -> List[int]:
        """Processes of this VM: members of the script's session (Ray's processes stay in it after the script
        ends) that carry this host's environment (a guard against a reused pid on a shared machine)."""
        if self.proc is None or self.gone:
            return []
        sid, marker, pids = self.proc.pid, f"TPU_LAUNCHER_WORKDIR={self.workdir}".encode(), []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
                if int(fields[3]) != sid or fields[0] == "Z":
                    continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def kill(self, timeout_s: float = 30) -> None:
        """The VM goes away: SIGKILL its whole session, then wait until none of it is left."""
        if self.proc is None or self.gone:
            return
        self.killed = True
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is None:  # the script still runs: its pid is certainly this VM's group
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pids = self.session_pids()
            if not pids and self.proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.spec.name} host {self.worker_id}: processes {pids} survived SIGKILL")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        self.gone = True


def _which(name: str, exclude: Path) -> str:
    for d in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(d, name)
        if d and Path(d) != exclude and os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    raise FileNotFoundError(name)


class BootedHosts:
    """Boots a READY node's hosts from its startup script into the Ray cluster named in its metadata;
    kills them on delete (and, wired to `on_preempt`, on preemption).

    The API server calls back from its own thread; the work runs on the test's thread, in `pump()`.
    `nodes`: node name -> its live TpuVmHosts; `booted`: every host ever booted; `errors`: what went wrong.
    """

    def __init__(self, cluster, root, storage_url: Optional[str] = None):
        self.cluster, self.root = cluster, Path(root)
        self.storage_url = storage_url or os.environ.get("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
        self.nodes: Dict[str, List[TpuVmHost]] = {}
        self.booted: List[TpuVmHost] = []
        self.lock, self.errors, self.todo = threading.Lock(), [], queue.Queue()
        # the VMs' internal IP: the address of the head's GCS, this machine's (where Ray would put them by default)
        self.metadata = MetadataServer(internal_ip=cluster.address.rsplit(":", 1)[0])

    def on_ready(self, node: dict) -> None:
        self.todo.put((self._boot, node))

    def on_delete(self, node: dict) -> None:
        self.todo.put((self._remove, node))

    def pump(self) -> None:
        while not self.todo.empty():
            fn, node = self.todo.get()
            fn(node)

    def _boot(self, node: dict) -> None:
        try:
            md = node.get("metadata", {})
            head = f"{md[HEAD_ADDRESS_ATTR]}:{md[HEAD_PORT_ATTR]}"
            assert head == self.cluster.address, (head, self.cluster.address)
            script = md.get("startup-script")
            assert script, f"node {node['name']} has no startup-script in its metadata (no cluster.bucket?)"
            name = node["name"].rsplit("/", 1)[-1]
            spec = catalog_slice(name, catalog.lookup(node["acceleratorType"]))
            assert len(node["networkEndpoints"]) == spec.hosts
            self.metadata.metadata[name] = dict(md)
            with self.lock:  # a re-created node of the same name boots fresh VMs: a directory of their own
                vm_root = self.root / f"{name}.{sum(h.spec.name == name for h in self.booted) // spec.hosts}"
            hosts = [TpuVmHost(vm_root, spec, i, self.metadata.url, self.storage_url, self.root / "ray-start.lock")
                     for i in range(spec.hosts)]
            for host in hosts:
                host.boot(script)
                threading.Thread(target=self._watch, args=(host, head), daemon=True,
                                 name=f"tpu-vm-{name}-{host.worker_id}").start()
            with self.lock:
                self.nodes[name] = hosts
                self.booted.extend(hosts)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))

    def _watch(self, host: TpuVmHost, head: str) -> None:
        try:
            rc = host.proc.wait(timeout=BOOT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.errors.append(f"{host.spec.name} host {host.worker_id}: startup script still running "
                               f"after {BOOT_TIMEOUT_S}s")
            return
        if host.killed:
            return  # deleted while booting
        if rc != 0:
            log = host.boot_log.read_text() if host.boot_log.exists() else ""
            self.errors.append(f"{host.spec.name} host {host.worker_id}: startup script exited {rc}: {log[-1500:]}")
        else:
            self.errors.extend(host.check(head))

    def _remove(self, node: dict) -> None:
        name = node["name"].rsplit("/", 1)[-1]
        with self.lock:
            hosts = self.nodes.pop(name, [])
        for host in hosts:
            try:
                host.kill()
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))

    def close(self) -> None:
        """Kill every host still up (test teardown) and stop the metadata server."""
        with self.lock:
            hosts = [h for hs in self.nodes.values() for h in hs]
            self.nodes.clear()
        for host in hosts:
            host.kill()
        self.metadata.stop()
