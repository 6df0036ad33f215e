"""The cloud pod provider: provision the slice through the Cloud TPU API and let its hosts join the Ray head.

The Ray head must be reachable from the TPU VMs (`ray.address`: a Ray cluster in the same VPC). Each VM's
startup script (cluster/bootstrap.py) reads the head's address from node metadata and joins it; the
launcher then reserves the slice in Ray exactly as for a local pod. Nothing here shells out to gcloud.
"""
import json
from typing import Any, Dict, List, Optional

from cluster.bootstrap import HEAD_ADDRESS_ATTR, HEAD_PORT_ATTR, startup_script
from cluster.gcp import GcpTpuProvider, make_client, tpu_name
from cluster.slice import SliceSpec


class CloudProvider:
    """up(): ensure the run's queued resource, wait until ACTIVE; down(): delete it (unless kept)."""

    def __init__(self, spec: SliceSpec, ray_address: str, project: str, zone: str, runtime_version: str,
                 run_name: str, num_slices: int = 1, capacity: str = "on_demand", network: Optional[str] = None,
                 subnetwork: Optional[str] = None, service_account: Optional[str] = None,
                 labels: Optional[Dict[str, str]] = None, endpoint: Optional[str] = None,
                 staged: Optional[Any] = None, timeout_s: float = 3600, poll_s: float = 5.0,
                 delete_on_exit: bool = True, progress=print, token_metadata: Optional[Dict[str, str]] = None):
        self.spec, self.ray_address, self.run_name = spec, ray_address, run_name
        self.runtime_version, self.num_slices, self.capacity = runtime_version, num_slices, capacity
        self.network, self.subnetwork, self.service_account = network, subnetwork, service_account
        # staged: launcher.wheel.Staged, the wheel and lock (and their sha256) the TPU VMs' startup script installs
        self.labels, self.staged, self.delete_on_exit = dict(labels or {}), staged, delete_on_exit
        self.api = GcpTpuProvider(project, zone, client=make_client(endpoint), poll_s=poll_s, timeout_s=timeout_s,
                                  progress=progress)
        self.nodes: List[dict] = []
        self.token_metadata = dict(token_metadata or {})

    def metadata(self) -> Dict[str, str]:
        host, _, port = self.ray_address.rpartition(":")
        # token_metadata: which Secret Manager secret holds the run's Ray token (its name, never the token)
        md = {HEAD_ADDRESS_ATTR: host, HEAD_PORT_ATTR: port, "launcher-run": self.run_name, **self.token_metadata}
        if self.staged:
            md["startup-script"] = startup_script(
                self.staged, host, int(port), json.dumps({self.spec.name: 1}),
                json.dumps({"ray.io/tpu-slice-name": self.spec.name}))
        return md

    def up(self) -> str:
        self.api.ensure(self.run_name, self.spec.accelerator_type, self.runtime_version, self.num_slices,
                        self.capacity, self.network, self.subnetwork, self.service_account, self.labels,
                        self.metadata())
        self.nodes = self.api.wait_active(self.run_name)
        return self.ray_address

    def repair(self, bad_node_ids=()) -> List[str]:
        """Provision again: preempted, failed or suspended resources are deleted and re-created (ensure)."""
        self.up()
        return [n.get("name", "") for n in self.nodes]

    def node_states(self) -> Dict[str, str]:
        return self.api.node_states(self.run_name)

    def down(self) -> None:
        if self.delete_on_exit:
            self.api.delete(self.run_name, wait=True)


def cloud_slice_name(run_name: str) -> str:
    """The TPU node name of a single-slice run: also the Ray resource its hosts advertise."""
    return tpu_name(run_name)
