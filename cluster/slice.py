"""A TPU slice as Ray sees it: the resources, labels and env vars each host (TPU VM) advertises.

These mirror what a real TPU VM advertises to Ray 2.60 (see ray/util/tpu.py and ray's TPU accelerator
manager): `TPU` chips, `accelerator_type:TPU-V4`, a resource named after the slice, `TPU-<pod type>-head`
on worker 0, and the `ray.io/tpu-*` node labels.
"""
import re
from dataclasses import dataclass
from typing import Dict

CORES_PER_CHIP = {"v2": 2, "v3": 2, "v4": 2, "v5p": 2, "v5e": 1, "v5litepod": 1, "v6e": 1}


@dataclass(frozen=True)
class SliceSpec:
    name: str  # the TPU (slice) name; also a Ray resource on each of its hosts
    accelerator_type: str  # pod type, e.g. v4-32
    tpu_version: str  # v4, v5e, v5p, v6e
    hosts: int
    devices_per_host: int
    topology: str
    ray_accelerator: str = ""  # Ray's accelerator type, e.g. TPU-V4; default from tpu_version

    @property
    def head_resource(self) -> str:
        return f"TPU-{self.accelerator_type}-head"

    @property
    def accelerator_resource(self) -> str:
        return f"accelerator_type:{self.ray_accelerator or 'TPU-' + self.tpu_version.upper()}"

    def host_resources(self, worker_id: int) -> Dict[str, float]:
        res = {"TPU": float(self.devices_per_host), self.accelerator_resource: 1.0, self.name: 1.0}
        if worker_id == 0:
            res[self.head_resource] = 1.0
        return res

    def host_labels(self, worker_id: int) -> Dict[str, str]:
        return {"ray.io/tpu-slice-name": self.name, "ray.io/tpu-worker-id": str(worker_id),
                "ray.io/tpu-pod-type": self.accelerator_type, "ray.io/tpu-topology": self.topology}

    def host_env(self, worker_id: int) -> Dict[str, str]:
        return {"TPU_NAME": self.name, "TPU_WORKER_ID": str(worker_id),
                "TPU_ACCELERATOR_TYPE": self.accelerator_type, "TPU_TOPOLOGY": self.topology}


def slice_name_for(run_name: str) -> str:
    """A TPU-name-safe slice name for a run: lowercase letters, digits and dashes."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "run"
    return f"tpu-{name}"[:60]


def local_slice(run_name: str, hosts: int, devices_per_host: int, tpu_version: str = "v4",
                accelerator_type: str = None, name: str = None) -> SliceSpec:
    """The slice a local CPU pod pretends to be: `hosts` hosts with `devices_per_host` devices each."""
    chips = hosts * devices_per_host
    accel = accelerator_type or f"{tpu_version}-{chips * CORES_PER_CHIP.get(tpu_version, 1)}"
    return SliceSpec(name=name or slice_name_for(run_name), accelerator_type=accel, tpu_version=tpu_version,
                     hosts=hosts, devices_per_host=devices_per_host, topology=f"{devices_per_host}x{hosts}")


def catalog_slice(name: str, tpu) -> SliceSpec:
    """The slice of a catalog TPU type (cluster.catalog.TpuType): hosts, devices and topology from the catalog."""
    return SliceSpec(name=name, accelerator_type=tpu.name, tpu_version=tpu.version, hosts=tpu.hosts,
                     devices_per_host=tpu.devices_per_host, topology=tpu.topology,
                     ray_accelerator=tpu.ray_resource_name)
