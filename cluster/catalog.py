"""Cloud TPU catalog derived from per-generation rules: slice shapes, peak FLOP/s, HBM and list prices."""
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

# USD per chip-hour, list prices (on-demand, spot) in the region of each generation's example zone in
# conf/cluster/: v4 us-central2, v5e us-west4, v5p us-east5, v6e us-east1. Spot prices vary by region and
# over time; cluster.price_on_demand / cluster.price_spot override these.
PRICES_AS_OF = "2026-11-29"
PRICES_SOURCE = ("https://cloud.google.com/tpu/pricing (on-demand list prices); spot prices from the Cloud Billing "
                 "catalog SKUs as tabulated in SkyPilot's GCP catalog (skypilot-org/skypilot-catalog, "
                 "catalogs/v7/gcp/vms.csv)")
GIB = 1 << 30


class CatalogError(ValueError):
    """An accelerator type, generation or price the catalog does not know."""


@dataclass(frozen=True)
class _Generation:
    version: str  # v4, v5e, v5p, v6e
    prefix: str  # accelerator type prefix: v4, v5litepod, v5p, v6e
    suffixes: Tuple[int, ...]  # valid name suffixes (TensorCores for v4/v5p, chips for v5e/v6e)
    cores_per_chip: int  # the suffix counts TensorCores when 2
    ndims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)
    max_single_host_chips: int  # up to this many chips fit one VM; larger slices use 4-chip hosts
    peak_bf16_flops_per_chip: float
    hbm_bytes_per_chip: int
    default_runtime_version: str
    price_on_demand_per_chip_hour: float
    price_spot_per_chip_hour: float


def _pow2(lo: int, hi: int) -> Tuple[int, ...]:
    return tuple(1 << k for k in range(lo.bit_length() - 1, hi.bit_length()))


_GENERATIONS: Tuple[_Generation, ...] = (
    _Generation("v4", "v4", _pow2(8, 4096), 2, 3, 4, 275e12, 32 * GIB, "tpu-ubuntu2204-base", 3.22, 0.9215),
    _Generation("v5e", "v5litepod", (1,) + _pow2(4, 256), 1, 2, 8, 197e12, 16 * 10**9, "v2-alpha-tpuv5-lite",
                1.20, 0.4692),
    # v5p-12288 (16x16x24, 6144 chips) is the largest slice Google offers, past the last power of two.
    _Generation("v5p", "v5p", _pow2(8, 8192) + (12288,), 2, 3, 4, 459e12, 95 * 10**9, "v2-alpha-tpuv5",
                4.20, 1.56009),
    _Generation("v6e", "v6e", (1,) + _pow2(4, 256), 1, 2, 8, 918e12, 32 * 10**9, "v2-alpha-tpuv6e",
                2.70, 0.64833),
)
_CHIPS_PER_MULTI_HOST = 4


@dataclass(frozen=True)
class TpuType:
    name: str  # accelerator type, e.g. v4-32
    version: str  # v4, v5e, v5p, v6e
    chips: int
    hosts: int
    chips_per_host: int
    cores_per_chip: int
    topology: str  # e.g. 2x2x4
    peak_bf16_flops_per_chip: float
    hbm_bytes_per_chip: int
    default_runtime_version: str
    price_on_demand_per_chip_hour: float
    price_spot_per_chip_hour: float
    ray_resource_name: str  # Ray's accelerator type, e.g. TPU-V4 (resource accelerator_type:TPU-V4)
    jax_topology_name: str  # for jax.experimental.topologies.get_topology_desc, e.g. v4:2x2x4

    @property
    def devices_per_host(self) -> int:
        """JAX devices per host: one per chip (v4 and v5p run as megacore, one device per chip)."""
        return self.chips_per_host

    @property
    def peak_flops(self) -> float:
        """Peak bf16 FLOP/s of the whole slice."""
        return self.peak_bf16_flops_per_chip * self.chips

    @property
    def chips_per_host_bounds(self) -> Tuple[int, int, int]:
        """The chip grid of one host (TPU_CHIPS_PER_HOST_BOUNDS), e.g. (2, 2, 1) for a 4-chip host."""
        return (1, 1, 1) if self.chips_per_host == 1 else (2, self.chips_per_host // 2, 1)


def _most_cubic(chips: int, ndims: int) -> Tuple[int, ...]:
    """Google's default topology: the most cube-like AxB(xC), A<=B<=C, each dim <= 4 or a multiple of 4."""
    def ok(d: int) -> bool:
        return d <= 4 or d % 4 == 0

    best: Optional[Tuple[int, ...]] = None
    for a in range(1, chips + 1):
        if chips % a or not ok(a):
            continue
        rest = chips // a
        if ndims == 2:
            candidates = [(a, rest)]
        else:
            candidates = [(a, b, rest // b) for b in range(a, rest + 1) if rest % b == 0 and ok(b)]
        for dims in candidates:
            if list(dims) != sorted(dims) or not ok(dims[-1]):
                continue
            if best is None or (dims[-1] / dims[0], -dims[0]) < (best[-1] / best[0], -best[0]):
                best = dims
    assert best is not None, (chips, ndims)
    if ndims == 3 and best[0] == 1:  # a single v4/v5p host is written 2x2x1
        best = best[1:] + best[:1]
    return best


def _make(gen: _Generation, suffix: int) -> TpuType:
    chips = suffix // gen.cores_per_chip
    per_host = chips if chips <= gen.max_single_host_chips else _CHIPS_PER_MULTI_HOST
    topology = "x".join(str(d) for d in _most_cubic(chips, gen.ndims))
    return TpuType(
        name=f"{gen.prefix}-{suffix}", version=gen.version, chips=chips, hosts=chips // per_host,
        chips_per_host=per_host, cores_per_chip=gen.cores_per_chip, topology=topology,
        peak_bf16_flops_per_chip=gen.peak_bf16_flops_per_chip, hbm_bytes_per_chip=gen.hbm_bytes_per_chip,
        default_runtime_version=gen.default_runtime_version,
        price_on_demand_per_chip_hour=gen.price_on_demand_per_chip_hour,
        price_spot_per_chip_hour=gen.price_spot_per_chip_hour,
        ray_resource_name=f"TPU-{gen.prefix.upper()}", jax_topology_name=f"{gen.version}:{topology}")


_TYPES: Dict[str, TpuType] = {f"{g.prefix}-{s}": _make(g, s) for g in _GENERATIONS for s in g.suffixes}


def _sizes(gen: _Generation) -> str:
    return ", ".join(f"{gen.prefix}-{s}" for s in gen.suffixes)


def _generation(version: str) -> _Generation:
    for gen in _GENERATIONS:
        if isinstance(version, str) and version.strip().lower() in (gen.version, gen.prefix):
            return gen
    known = ", ".join(f"{g.version} ({g.prefix}-{g.suffixes[0]} ... {g.prefix}-{g.suffixes[-1]})" for g in _GENERATIONS)
    raise CatalogError(f"unknown TPU generation '{version}': known generations are {known}")


def lookup(name: str) -> TpuType:
    """The catalog entry for an accelerator type such as 'v4-32' or 'v5litepod-16'; CatalogError if unknown."""
    if not isinstance(name, str):
        raise CatalogError(f"accelerator type must be a string like 'v4-32', got {name!r}")
    key = name.strip().lower()
    if key in _TYPES:
        return _TYPES[key]
    match = re.fullmatch(r"(v[0-9a-z]+)-.*", key)
    try:
        gen = _generation(match.group(1) if match else key)
    except CatalogError as e:
        raise CatalogError(f"unknown accelerator type '{name}': {str(e).split(': ', 1)[1]}") from None
    raise CatalogError(f"unknown accelerator type '{name}': {gen.version} sizes are {_sizes(gen)}")


def all_types(version: Optional[str] = None) -> List[TpuType]:
    """Every catalog type, by generation then size; only one generation's ('v4', 'v5e', ...) when given."""
    if version is None:
        return list(_TYPES.values())
    gen = _generation(version)
    return [t for t in _TYPES.values() if t.version == gen.version]


def cost_per_hour(tpu: Union[TpuType, str], num_slices: int = 1, on_demand: Optional[float] = None,
                  spot: Optional[float] = None) -> Dict[str, float]:
    """USD per hour for num_slices slices, on demand and spot: catalog list prices per chip-hour unless
    on_demand / spot (USD per chip-hour, e.g. cluster.price_on_demand / cluster.price_spot) override them."""
    t = tpu if isinstance(tpu, TpuType) else lookup(tpu)
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise CatalogError(f"num_slices must be a positive integer, got {num_slices!r}")
    rates = {"on_demand": t.price_on_demand_per_chip_hour if on_demand is None else on_demand,
             "spot": t.price_spot_per_chip_hour if spot is None else spot}
    for kind, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
            raise CatalogError(f"{kind} price must be a non-negative number of USD per chip-hour, got {rate!r}")
    return {kind: float(rate) * t.chips * num_slices for kind, rate in rates.items()}
