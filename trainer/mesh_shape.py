"""Mesh axis sizes from config (one axis may be -1 = fill): pure Python, so the launcher needs no JAX.

Multislice runs add a leading `dcn` axis (one entry per slice, data-parallel across the data-center
network); data x fsdp x tensor then describe one slice.
"""
from typing import Dict

AXES = ("data", "fsdp", "tensor")
MESH_AXES = ("dcn",) + AXES


def resolve_mesh_shape(shape: Dict[str, int], num_devices: int) -> Dict[str, int]:
    """Fill the one -1 axis so the product equals num_devices; raise ValueError naming the axis otherwise.

    With shape["dcn"] = S > 1 slices, data x fsdp x tensor must fill num_devices / S, and "dcn" is returned too.
    """
    dcn = int(shape.get("dcn", 1) or 1)
    if dcn < 1 or num_devices % dcn:
        raise ValueError(f"mesh.dcn: {num_devices} devices cannot be split into {dcn} slices")
    total, num_devices = num_devices, num_devices // dcn
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
        where = f"each of the {dcn} slices has" if dcn > 1 else "the pod has"
        raise ValueError(f"mesh: data x fsdp x tensor = {product} but {where} {num_devices} devices "
                         f"(set one axis to -1 to fill)")
    assert _prod(sizes.values()) * dcn == total
    return {"dcn": dcn, **sizes} if dcn > 1 else sizes


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out
