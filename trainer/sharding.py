"""Device mesh (dcn, data, fsdp, tensor) from config and the logical-axis rules that map parameters onto it.

fsdp shards parameters and optimizer state along `embed`; tensor shards heads, MLP and vocab;
the batch is split over dcn x data x fsdp (dcn: one entry per slice; size 1 on a single slice).
"""
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainer.mesh_shape import AXES, MESH_AXES, resolve_mesh_shape  # noqa: F401 - re-exported

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
    # Devices sorted by (slice, process, id): each process owns a contiguous block of the leading axes,
    # so a host's share of the batch is one contiguous block of rows, and slices are the outermost axis.
    ordered = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.process_index, d.id))
    grid = np.array(ordered, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh):
    """Map a pytree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_rows(mesh: Mesh, global_batch: int, seq_len: int) -> Tuple[int, int]:
    """The contiguous [start, stop) rows of the global batch this process must feed."""
    sharding = batch_sharding(mesh)
    idx = sharding.addressable_devices_indices_map((global_batch, seq_len))
    starts = [s[0].start or 0 for s in idx.values()]
    stops = [global_batch if s[0].stop is None else s[0].stop for s in idx.values()]
    start, stop = min(starts), max(stops)
    covered = sorted({(a, b) for a, b in zip(starts, stops)})
    if sum(b - a for a, b in covered) != stop - start and len(covered) > 1:
        raise ValueError("mesh: this process's batch rows are not contiguous; reorder the mesh axes")
    return start, stop
