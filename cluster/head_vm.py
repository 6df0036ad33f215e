"""The Ray head in the cloud: one small CPU VM per run, created and deleted through the official Compute Engine client.

TPU VMs cannot reach a laptop, so a cloud run without `ray.address` gets its own head: a Compute Engine
instance named `<tpu_name(run)>-head` whose startup script (`head_startup_script`) installs the run's
wheel and its hash-locked requirements into a venv, each verified by its staged sha256 first, and runs
`ray start --head` with the run's Ray token (from Secret Manager), its ports on the internal address and the
dashboard (job server) on loopback only: the laptop reaches it through an SSH tunnel (launcher/tunnel.py).
`HeadVm.ensure` is idempotent: it reuses a live instance (PROVISIONING/STAGING/RUNNING/REPAIRING) and
deletes a dead one (TERMINATED, STOPPED, SUSPENDED, ...: preempted or stopped) before re-creating it.

Everything goes through `google.cloud.compute_v1.InstancesClient` over REST; nothing shells out to
gcloud, and neither the script nor the instance metadata holds credentials (the VM's service account
token comes from the metadata server at boot).
"""

from __future__ import annotations

import shlex
import time
from typing import Any, Callable, Optional

from google.api_core import exceptions as gexc

from cluster.bootstrap import METADATA_URL, staged_args
from cluster.gcp import ProvisionError, rest_transport_args, tpu_name, wait_operation

ALIVE = {"PROVISIONING", "STAGING", "RUNNING", "REPAIRING"}
DEAD = {"STOPPING", "PENDING_STOP", "STOPPED", "SUSPENDING", "SUSPENDED", "TERMINATED"}
NOT_FOUND = "NOT_FOUND"
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
DEFAULT_IMAGE = "projects/debian-cloud/global/images/family/debian-12"
PYTHON_ENV = "TPU_LAUNCHER_PYTHON"  # the head's venv python, exported before `ray start` (its jobs inherit it)


def make_compute_client(endpoint: Optional[str] = None) -> Any:
    """A `compute_v1.InstancesClient` over REST: default credentials, or anonymous ones against `endpoint` (tests).

    Against an endpoint, the zone-operations client that `insert(...)`/`delete(...)` operations poll is
    pointed at the same endpoint (the library builds it for the default host otherwise).
    """
    from google.cloud import compute_v1
    from google.cloud.compute_v1.services.instances.transports.rest import InstancesRestTransport

    args = rest_transport_args(endpoint)
    if endpoint:
        from google.cloud.compute_v1.services.zone_operations.transports.rest import ZoneOperationsRestTransport

        operations = compute_v1.ZoneOperationsClient(transport=ZoneOperationsRestTransport(**args))

        class _EndpointInstancesTransport(InstancesRestTransport):
            @property
            def _zone_operations_client(self) -> Any:  # what the client's extended operations poll
                return operations

        return compute_v1.InstancesClient(transport=_EndpointInstancesTransport(**args))
    return compute_v1.InstancesClient(transport=InstancesRestTransport(**args))


_HEAD_TEMPLATE = r"""#!/bin/bash
# tpu-pod-launcher head (generated): install the run's wheel in a venv, start the Ray head with its job server.
set -euo pipefail
exec >>"${{TPU_LAUNCHER_HEAD_LOG:-/var/log/tpu-launcher-head.log}}" 2>&1
echo "[head] $(date -u +%FT%TZ) starting on $(hostname)"

MD={metadata_url}
WHEEL_URL={wheel_url}
WHEEL_SHA256={wheel_sha256}
LOCK_URL={lock_url}
LOCK_SHA256={lock_sha256}
WORKDIR="${{TPU_LAUNCHER_WORKDIR:-/opt/tpu-launcher}}"
VENV="$WORKDIR/venv"
mkdir -p "$WORKDIR"
WHEEL="$WORKDIR/$(basename "$WHEEL_URL")"
LOCK="$WORKDIR/$(basename "$LOCK_URL")"
LOG_TAG=head
{fetch_verified}

# 1. A venv (the image's python3 is externally managed, PEP 668); Debian needs python3-venv for it.
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -c 'import ensurepip' >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq python3-venv python3-pip
  fi
  python3 -m venv "$VENV"
fi

# 2. The project wheel and its hash-locked requirements (ray[default], ...) from the run's bucket, each refused
#    unless its sha256 is the staged one; then exactly the locked distributions (hash-checked) and the wheel.
fetch_verified "$WHEEL_URL" "$WHEEL" "$WHEEL_SHA256"
fetch_verified "$LOCK_URL" "$LOCK" "$LOCK_SHA256"
"$VENV/bin/python" -m pip install --quiet --require-hashes --no-deps -r "$LOCK"
"$VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall "$WHEEL"

# 3. The Ray head; jobs submitted to its job server run `python -m launcher` from this venv: the launcher's job
#    entrypoint names its interpreter through {python_env} (launcher/job.py), which the job inherits from here.
export PATH="$VENV/bin:$PATH"
export {python_env}="$VENV/bin/python"
ray stop --force || true
# Ray's ports on the internal address only (TPU VMs join there; every call needs the run's token), the job server
# on loopback only: the laptop reaches it through an SSH tunnel to port 22, the one port open from outside.
{fetch_token}
fetch_ray_token "$VENV/bin/python" "$WORKDIR/ray_token"
ray start --head --port={ray_port} --node-ip-address="$INTERNAL_IP" \
  --dashboard-host=127.0.0.1 --dashboard-port={dashboard_port} \
  --include-dashboard=true --num-cpus={num_cpus} --disable-usage-stats
echo "[head] $(date -u +%FT%TZ) Ray head up on $INTERNAL_IP:{ray_port}, job server on 127.0.0.1:{dashboard_port}"
"""


def head_startup_script(staged, ray_port: int = 6379, dashboard_port: int = 8265, num_cpus: int = 0) -> str:
    """The head VM's bash startup script (metadata key `startup-script`); `num_cpus=0` keeps work off the head.

    `staged` (launcher.wheel.Staged): the wheel and lock to fetch, and the sha256 each must have.
    """
    return _HEAD_TEMPLATE.format(
        **staged_args(staged),
        metadata_url=shlex.quote(METADATA_URL), python_env=PYTHON_ENV,
        ray_port=int(ray_port), dashboard_port=int(dashboard_port), num_cpus=int(num_cpus))


def _region(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


class HeadVm:
    """Creates, watches and deletes a run's Ray head as one Compute Engine instance."""

    def __init__(self, project: str, zone: str, client: Any = None, machine_type: str = "n2-standard-4",
                 image: str = DEFAULT_IMAGE, network: Optional[str] = None, subnetwork: Optional[str] = None,
                 service_account: Optional[str] = None, poll_s: float = 5.0, timeout_s: float = 900,
                 progress: Callable[[str], None] = print, disk_gb: int = 20, external_ip: bool = True):
        self.project, self.zone, self.poll_s, self.timeout_s, self.progress = project, zone, poll_s, timeout_s, progress
        self.machine_type, self.image, self.disk_gb, self.external_ip = machine_type, image, disk_gb, external_ip
        self.network, self.subnetwork, self.service_account = network, subnetwork, service_account
        self.client = client if client is not None else make_compute_client()

    # names ---------------------------------------------------------------------------------------
    @staticmethod
    def instance_name(run_name: str) -> str:
        return f"{tpu_name(run_name)}-head"

    # API calls -----------------------------------------------------------------------------------
    def _get(self, run_name: str) -> Optional[Any]:
        try:
            return self.client.get(project=self.project, zone=self.zone, instance=self.instance_name(run_name))
        except gexc.NotFound:
            return None

    def _wait_operation(self, operation: Any, what: str) -> None:
        wait_operation(operation, what, self.timeout_s, self.poll_s)

    @staticmethod
    def _dict(instance: Any) -> dict:
        nics = list(instance.network_interfaces)
        configs = list(nics[0].access_configs) if nics else []
        return {"name": instance.name, "status": instance.status,
                "internal_ip": nics[0].network_i_p if nics else "",
                "external_ip": configs[0].nat_i_p if configs else ""}

    @staticmethod
    def _script(instance: Any) -> Optional[str]:
        for item in instance.metadata.items:
            if item.key == "startup-script":
                return item.value
        return None

    # public API ----------------------------------------------------------------------------------
    def ensure(self, run_name: str, startup_script: str, labels: Optional[dict] = None,
               metadata: Optional[dict] = None) -> dict:
        """Make sure the run's head VM exists and is live (reuse, or delete a dead one and re-create)."""
        name = self.instance_name(run_name)
        instance = self._get(run_name)
        if instance is not None:
            if instance.status in ALIVE:
                note = ""
                if self._script(instance) != startup_script:
                    note = (f"; its startup script differs (an older wheel?): `tpu-launch down {run_name}` deletes "
                            f"the run's cloud resources (checkpoints stay) and the next launch creates them afresh")
                self.progress(f"head: reusing head VM {name} ({instance.status}){note}")
                return self._dict(instance)
            self.progress(f"head: {name} is {instance.status}; deleting it to re-create")
            self.delete(run_name, wait=True)
        self._create(run_name, startup_script, labels, metadata)
        instance = self._get(run_name)
        if instance is None:
            raise ProvisionError(f"head VM {name} does not exist after its creation (deleted?)")
        return self._dict(instance)

    def _instance(self, run_name: str, startup_script: str, labels: Optional[dict],
                  metadata: Optional[dict] = None) -> Any:
        from google.cloud import compute_v1

        region = _region(self.zone)
        machine_type = self.machine_type if "/" in self.machine_type \
            else f"zones/{self.zone}/machineTypes/{self.machine_type}"
        network = self.network or "default"
        nic = compute_v1.NetworkInterface(network=network if "/" in network else f"global/networks/{network}")
        if self.subnetwork:
            nic.subnetwork = self.subnetwork if "/" in self.subnetwork \
                else f"regions/{region}/subnetworks/{self.subnetwork}"
        if self.external_ip:  # egress for apt/pip without Cloud NAT; no port opens without a firewall rule
            nic.access_configs = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
        disk = compute_v1.AttachedDisk(boot=True, auto_delete=True, initialize_params=(
            compute_v1.AttachedDiskInitializeParams(source_image=self.image, disk_size_gb=int(self.disk_gb))))
        return compute_v1.Instance(
            name=self.instance_name(run_name), machine_type=machine_type, disks=[disk], network_interfaces=[nic],
            labels={**(labels or {}), "launcher-run": tpu_name(run_name), "launcher-role": "head"},
            metadata=compute_v1.Metadata(items=[compute_v1.Items(key="startup-script", value=startup_script)] + [
                compute_v1.Items(key=k, value=str(v)) for k, v in sorted((metadata or {}).items())]),
            service_accounts=[compute_v1.ServiceAccount(email=self.service_account or "default", scopes=SCOPES)],
        )

    def _create(self, run_name: str, startup_script: str, labels: Optional[dict],
                metadata: Optional[dict] = None) -> None:
        name = self.instance_name(run_name)
        self.progress(f"head: creating head VM {name} ({self.machine_type} in {self.zone})")
        try:
            operation = self.client.insert(project=self.project, zone=self.zone,
                                           instance_resource=self._instance(run_name, startup_script, labels, metadata))
        except gexc.Conflict:  # 409: AlreadyExists
            self.progress(f"head: {name} already exists (created concurrently); reusing it")
            return
        except gexc.GoogleAPICallError as exc:
            raise ProvisionError(f"could not create head VM {name}: {exc.message}") from exc
        self._wait_operation(operation, f"create head VM {name}")

    def wait_running(self, run_name: str) -> dict:
        """Follow the head VM until it is RUNNING with an internal IP; its name, status and IPs."""
        name = self.instance_name(run_name)
        start = time.monotonic()
        last = ""
        while True:
            instance = self._get(run_name)
            if instance is None:
                raise ProvisionError(f"head VM {name} does not exist (deleted?)")
            info = self._dict(instance)
            line = info["status"] + (f" {info['internal_ip']}" if info["internal_ip"] else "")
            if line != last:
                self.progress(f"head: {name}: {line} ({time.monotonic() - start:.0f}s)")
                last = line
            if info["status"] in DEAD:
                detail = instance.status_message
                raise ProvisionError(f"head VM {name} is {info['status']}" + (f": {detail}" if detail else ""))
            if info["status"] == "RUNNING" and info["internal_ip"]:
                return info
            if time.monotonic() - start > self.timeout_s:
                raise ProvisionError(f"timed out after {self.timeout_s:.0f}s waiting for head VM {name} ({line})")
            time.sleep(self.poll_s)

    def address(self, run_name: str, ray_port: int = 6379) -> str:
        """The Ray address of the run's head, `INTERNAL_IP:PORT` (what TPU VMs in the VPC join)."""
        instance = self._get(run_name)
        if instance is None:
            raise ProvisionError(f"head VM {self.instance_name(run_name)} does not exist")
        ip = self._dict(instance)["internal_ip"]
        if not ip:
            raise ProvisionError(f"head VM {self.instance_name(run_name)} has no internal IP yet ({instance.status})")
        return f"{ip}:{int(ray_port)}"

    def status(self, run_name: str) -> str:
        """The head VM's status (RUNNING, TERMINATED, ...), NOT_FOUND when there is none."""
        instance = self._get(run_name)
        return NOT_FOUND if instance is None else instance.status

    def delete(self, run_name: str, wait: bool = True) -> None:
        """Delete the run's head VM (and its boot disk); a missing one is fine."""
        name = self.instance_name(run_name)
        try:
            operation = self.client.delete(project=self.project, zone=self.zone, instance=name)
        except gexc.NotFound:
            return
        except gexc.GoogleAPICallError as exc:  # e.g. a delete already under way
            if self._get(run_name) is None:
                return
            raise ProvisionError(f"could not delete head VM {name}: {exc.message}") from exc
        self.progress(f"head: deleting head VM {name}")
        if not wait:
            return
        try:
            self._wait_operation(operation, f"delete head VM {name}")
        except ProvisionError:
            if self._get(run_name) is not None:
                raise
            return
        deadline = time.monotonic() + self.timeout_s
        while self._get(run_name) is not None:
            if time.monotonic() > deadline:
                raise ProvisionError(f"timed out waiting for head VM {name} to be deleted")
            time.sleep(self.poll_s)


def default_service_account(project: str, endpoint: Optional[str] = None) -> str:
    """The project's default Compute Engine service account (what VMs run as without `cluster.service_account`),
    from the Compute API's project resource."""
    from google.cloud import compute_v1
    from google.cloud.compute_v1.services.projects.transports.rest import ProjectsRestTransport

    transport = ProjectsRestTransport(**rest_transport_args(endpoint))
    try:
        account = compute_v1.ProjectsClient(transport=transport).get(project=project).default_service_account
    except gexc.GoogleAPICallError as exc:
        raise ProvisionError(f"could not read project {project}'s default service account: {exc.message}") from exc
    if not account:
        raise ProvisionError(f"project {project} has no default Compute Engine service account; set "
                             "cluster.service_account")
    return account
