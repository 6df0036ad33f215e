"""Device mesh (dcn, data, fsdp, tensor) from config and the logical-axis rules that map parameters onto it.

fsdp shards parameters and optimizer state along `embed`; tensor shards heads, MLP and vocab;
the batch is split over dcn x data x fsdp (dcn: one entry per slice; size 1 on a single slice).
On TPU the devices are laid out by their physical coordinates (jax's mesh_utils), so each mesh axis runs along
the ICI torus; a host's batch rows may then be several blocks, which `batch_shard` numbers for the data stream.
"""
import logging
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainer.mesh_shape import AXES, MESH_AXES, resolve_mesh_shape  # noqa: F401 - re-exported

log = logging.getLogger("trainer.sharding")

BATCH_AXES = ("dcn", "data", "fsdp")
LOGICAL_RULES: Tuple[Tuple[str, object], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),  # the stacked axis of scanned blocks (model.scan_layers): every host holds every layer
)


def make_mesh(shape: Dict[str, int], devices: Sequence = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"dcn": 1, **resolve_mesh_shape(shape, len(devices))}
    return Mesh(_device_grid(sizes, devices), MESH_AXES)


def _device_grid(sizes: Dict[str, int], devices: list) -> np.ndarray:
    """TPU: mesh_utils' physical layout (the hybrid one over slices when dcn > 1). Elsewhere (CPU hosts), and
    for a shape mesh_utils cannot map onto the torus: devices sorted by (slice, process, id), so each process
    owns a contiguous block of the leading axes and slices are the outermost axis."""
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        try:
            if sizes["dcn"] > 1:
                return mesh_utils.create_hybrid_device_mesh((1,) + shape[1:], (sizes["dcn"], 1, 1, 1), devices,
                                                            allow_split_physical_axes=True)
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError) as e:  # no torus mapping for this shape
            log.warning("mesh %s: no physical TPU layout (%s); devices in process order", sizes,
                        str(e).splitlines()[0])
    ordered = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.process_index, d.id))
    return np.array(ordered, dtype=object).reshape(shape)


def logical_to_sharding(logical_specs, mesh: Mesh):
    """Map a pytree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shard(mesh: Mesh, global_batch: int, seq_len: int, process: int = None) -> Tuple[int, int]:
    """(shard index, shard count) of the global batch this process feeds: it loads global_batch / count rows,
    data shard `index`, and jax places them on the rows its devices hold, in row order
    (make_array_from_process_local_data). Processes holding the same rows (a tensor axis across hosts) get the
    same index; shards are numbered by their first row, so on CPU pods process p feeds rows p*n .. (p+1)*n-1."""
    process = jax.process_index() if process is None else process
    held: Dict[int, set] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((global_batch, seq_len)).items():
        rows = index[0].indices(global_batch)
        held.setdefault(device.process_index, set()).update(range(*rows))
    shards = sorted({tuple(sorted(rows)) for rows in held.values()})
    sizes = {len(rows) for rows in shards}
    if len(sizes) != 1 or sum(len(rows) for rows in shards) != global_batch:
        raise ValueError("mesh: processes hold overlapping or uneven parts of the batch; make dcn x data x fsdp "
                         "a multiple of the number of hosts")
    return shards.index(tuple(sorted(held[process]))), len(shards)
