"""Mesh axis sizes from config (one axis may be -1 = fill): pure Python, so the launcher needs no JAX."""
from typing import Dict

AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Dict[str, int], num_devices: int) -> Dict[str, int]:
    """Fill the one -1 axis so the product equals num_devices; raise ValueError naming the axis otherwise."""
    sizes = {a: int(shape[a]) for a in AXES}
    fill = [a for a in AXES if sizes[a] == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh.{fill[1]}: only one mesh axis may be -1 (got {', '.join(fill)})")
    for a in AXES:
        if sizes[a] == 0 or sizes[a] < -1:
            raise ValueError(f"mesh.{a}: size must be a positive integer or -1, got {sizes[a]}")
    known = _prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh.{fill[0]}: cannot fill: {num_devices} devices are not divisible by "
                             f"the other axes' product {known}")
        sizes[fill[0]] = num_devices // known
    product = _prod(sizes.values())
    if product != num_devices:
        raise ValueError(f"mesh: data x fsdp x tensor = {product} but the pod has {num_devices} devices "
                         f"(set one axis to -1 to fill)")
    return sizes


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out
