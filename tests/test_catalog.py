"""Tests for cluster/catalog.py: public table, per-generation rules, errors, cost, Ray/libtpu agreement, YAMLs."""
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from typing import Any, Callable

import pytest
import yaml

from cluster import catalog
from cluster.catalog import CatalogError, TpuType, all_types, cost_per_hour, lookup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_CONF = os.path.join(REPO, "conf", "cluster")
ALL = all_types()
PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}  # accelerator-type prefix per generation


def prefix(t: TpuType) -> str:
    return t.name.rsplit("-", 1)[0]


# ---- the public table (FIELD-NOTES "TPU catalog", from the Cloud TPU docs) ----

@pytest.mark.parametrize("name,chips,hosts,chips_per_host", [
    ("v4-8", 4, 1, 4), ("v4-32", 16, 4, 4),
    ("v5litepod-8", 8, 1, 8), ("v5litepod-16", 16, 4, 4), ("v5litepod-256", 256, 64, 4),
    ("v5p-8", 4, 1, 4), ("v5p-32", 16, 4, 4), ("v5p-128", 64, 16, 4),
    ("v6e-8", 8, 1, 8), ("v6e-16", 16, 4, 4), ("v6e-32", 32, 8, 4), ("v6e-256", 256, 64, 4),
])
def test_public_table_rows(name, chips, hosts, chips_per_host):
    t = lookup(name)
    assert (t.name, t.chips, t.hosts, t.chips_per_host, t.devices_per_host) == (name, chips, hosts, chips_per_host,
                                                                                 chips_per_host)


@pytest.mark.parametrize("version,tflops,hbm,runtime", [
    ("v4", 275, 32 * 2**30, "tpu-ubuntu2204-base"), ("v5e", 197, 16 * 10**9, "v2-alpha-tpuv5-lite"),
    ("v5p", 459, 95 * 10**9, "v2-alpha-tpuv5"), ("v6e", 918, 32 * 10**9, "v2-alpha-tpuv6e"),
])
def test_per_chip_figures(version, tflops, hbm, runtime):
    for t in all_types(version):
        assert t.peak_bf16_flops_per_chip == tflops * 1e12
        assert t.hbm_bytes_per_chip == hbm
        assert t.default_runtime_version == runtime
        assert t.peak_flops == pytest.approx(tflops * 1e12 * t.chips)


@pytest.mark.parametrize("name,topology", [
    ("v4-8", "2x2x1"), ("v4-16", "2x2x2"), ("v4-32", "2x2x4"), ("v4-64", "2x4x4"), ("v4-128", "4x4x4"),
    ("v4-4096", "8x16x16"), ("v5p-8", "2x2x1"), ("v5p-12288", "16x16x24"),
    ("v5litepod-1", "1x1"), ("v5litepod-4", "2x2"), ("v5litepod-8", "2x4"), ("v5litepod-16", "4x4"),
    ("v5litepod-32", "4x8"), ("v5litepod-64", "8x8"), ("v5litepod-128", "8x16"), ("v5litepod-256", "16x16"),
    ("v6e-8", "2x4"), ("v6e-16", "4x4"), ("v6e-256", "16x16"),
])
def test_documented_topologies(name, topology):
    t = lookup(name)
    assert t.topology == topology
    assert t.jax_topology_name == f"{t.version}:{topology}"


def test_field_notes_jax_topology_names():
    assert lookup("v4-8").jax_topology_name == "v4:2x2x1"
    assert lookup("v4-16").jax_topology_name == "v4:2x2x2"
    assert lookup("v5litepod-4").jax_topology_name == "v5e:2x2"
    assert lookup("v5litepod-16").jax_topology_name == "v5e:4x4"
    assert lookup("v5p-16").jax_topology_name == "v5p:2x2x2"
    assert lookup("v6e-4").jax_topology_name == "v6e:2x2"
    assert lookup("v6e-16").jax_topology_name == "v6e:4x4"


# ---- rules over every size ----

def test_valid_sizes_per_generation():
    def suffixes(v):
        return [int(t.name.rsplit("-", 1)[1]) for t in all_types(v)]

    assert suffixes("v4") == [2**k for k in range(3, 13)]  # v4-8 ... v4-4096
    assert suffixes("v5p") == [2**k for k in range(3, 14)] + [12288]  # v5p-8 ... v5p-8192, v5p-12288
    assert suffixes("v5e") == [1] + [2**k for k in range(2, 9)]  # v5litepod-1, -4 ... -256
    assert suffixes("v6e") == [1] + [2**k for k in range(2, 9)]
    assert [t.name for t in ALL] == [t.name for v in ("v4", "v5e", "v5p", "v6e") for t in all_types(v)]
    assert len({t.name for t in ALL}) == len(ALL) == 38


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_rules(t):
    dims = [int(d) for d in t.topology.split("x")]
    suffix = int(t.name.rsplit("-", 1)[1])
    assert prefix(t) == PREFIX[t.version]
    assert t.hosts * t.chips_per_host == t.chips
    assert math.prod(dims) == t.chips
    assert len(dims) == (3 if t.version in ("v4", "v5p") else 2)
    assert all(d <= 4 or d % 4 == 0 for d in dims)  # Google: each dim <= 4 or a multiple of 4
    if t.version in ("v4", "v5p"):
        assert t.cores_per_chip == 2 and suffix == 2 * t.chips  # name counts TensorCores
        assert t.chips_per_host == 4
    else:
        assert t.cores_per_chip == 1 and suffix == t.chips  # name counts chips
        assert t.chips_per_host == (t.chips if t.chips <= 8 else 4)
    assert t.hosts == 1 or t.chips_per_host == 4
    assert t.devices_per_host == t.chips_per_host
    assert math.prod(t.chips_per_host_bounds) == t.chips_per_host
    assert t.jax_topology_name == f"{t.version}:{t.topology}"
    assert t.ray_resource_name == f"TPU-{prefix(t).upper()}"
    assert 0 < t.price_spot_per_chip_hour < t.price_on_demand_per_chip_hour
    assert lookup(t.name) is t and lookup(f" {t.name.upper()} ") is t


def test_type_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        lookup("v4-8").chips = 8  # type: ignore[misc]


# ---- errors ----

@pytest.mark.parametrize("name,expect", [
    ("v4-33", ["v4 sizes are v4-8, v4-16", "v4-4096"]), ("v4-4", ["v4-8"]), ("v4-8192", ["v4-4096"]),
    ("v5litepod-2", ["v5litepod-1, v5litepod-4", "v5litepod-256"]), ("v5e-16", ["v5litepod-16"]),
    ("v5p-12", ["v5p-8", "v5p-12288"]), ("v5p-6144", ["v5p-8192"]), ("v6e-512", ["v6e-1", "v6e-256"]),
    ("v7x-8", ["v4 (v4-8 ... v4-4096)", "v5e (v5litepod-1", "v6e"]), ("tpu-v4-32", ["v4-8"]),
    ("", ["v4-8"]), ("v4", ["v4 sizes are"]), ("v4-", ["v4-8"]), ("v4-32x2", ["v4-32"]),
])
def test_unknown_types_raise_helpful_one_line_errors(name, expect):
    with pytest.raises(CatalogError) as err:
        lookup(name)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert msg.startswith(f"unknown accelerator type '{name}': ") and "\n" not in msg
    for part in expect:
        assert part in msg


def test_error_message_matches_brief_example():
    with pytest.raises(CatalogError, match=r"^unknown accelerator type 'v4-33': v4 sizes are v4-8, v4-16, .*v4-4096$"):
        lookup("v4-33")


@pytest.mark.parametrize("bad", [None, 32, ("v4", 8)])
def test_non_string_types_raise(bad):
    with pytest.raises(CatalogError, match="must be a string like 'v4-32'"):
        lookup(bad)


def test_all_types_by_version():
    assert {t.version for t in all_types("v5e")} == {"v5e"}
    assert all_types("v5litepod") == all_types("v5e") == all_types("V5E")
    with pytest.raises(CatalogError, match="unknown TPU generation 'v3': known generations are v4"):
        all_types("v3")


# ---- cost ----

def test_prices_module_constants():
    assert "https://cloud.google.com/tpu/pricing" in catalog.PRICES_SOURCE
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", catalog.PRICES_AS_OF)
    on_demand = {t.version: t.price_on_demand_per_chip_hour for t in ALL}
    assert on_demand == {"v4": 3.22, "v5e": 1.20, "v5p": 4.20, "v6e": 2.70}
    for t in ALL:  # spot is well under on-demand
        assert 0.2 < t.price_spot_per_chip_hour / t.price_on_demand_per_chip_hour < 0.5


def test_cost_arithmetic():
    t = lookup("v4-32")
    assert cost_per_hour(t) == pytest.approx({"on_demand": 16 * 3.22, "spot": 16 * t.price_spot_per_chip_hour})
    assert cost_per_hour("v4-32", num_slices=2) == pytest.approx({k: 2 * v for k, v in cost_per_hour(t).items()})
    assert cost_per_hour("v5litepod-256")["on_demand"] == pytest.approx(256 * 1.20)
    assert cost_per_hour("v6e-8", 3)["on_demand"] == pytest.approx(3 * 8 * 2.70)


def test_cost_overrides_win():
    base = cost_per_hour("v5p-32")
    assert cost_per_hour("v5p-32", on_demand=2.0) == pytest.approx({"on_demand": 32.0, "spot": base["spot"]})
    assert cost_per_hour("v5p-32", spot=1.0) == pytest.approx({"on_demand": base["on_demand"], "spot": 16.0})
    assert cost_per_hour("v5p-32", 2, on_demand=0, spot=0.5) == {"on_demand": 0.0, "spot": 16.0}  # 0 is a price


@pytest.mark.parametrize("kwargs,match", [
    ({"num_slices": 0}, "num_slices"), ({"num_slices": 1.5}, "num_slices"), ({"num_slices": True}, "num_slices"),
    ({"on_demand": -1.0}, "on_demand price"), ({"spot": "cheap"}, "spot price"),
])
def test_cost_rejects_bad_input(kwargs, match):
    with pytest.raises(CatalogError, match=match):
        cost_per_hour("v4-8", **kwargs)


def test_cost_of_unknown_type_raises():
    with pytest.raises(CatalogError, match="unknown accelerator type 'v4-9'"):
        cost_per_hour("v4-9")


# ---- agreement with Ray 2.60's own TPU helpers ----

def ray_fn(module: str, name: str) -> Callable[..., Any]:
    """A Ray helper, or a skip naming what this Ray version lacks."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"cannot import {module}: {e}")
    fn = getattr(mod, name, None)
    if fn is None:
        import ray
        pytest.skip(f"ray {ray.__version__} has no {module}.{name}")
    return fn


def disagreements(ours: Callable[[TpuType], Any], ray: Callable[[TpuType], Any]) -> dict:
    return {t.name: (ours(t), ray(t)) for t in ALL if ours(t) != ray(t)}


PRIV = "ray._private.accelerators.tpu"


def test_ray_version_from_resource_name():
    fn = ray_fn("ray.util.tpu", "get_tpu_version_from_type")
    assert disagreements(prefix, lambda t: fn(t.ray_resource_name)) == {}


def test_ray_resource_name_constants():
    accel = pytest.importorskip("ray.util.accelerators.accelerators")
    assert {t.ray_resource_name for t in ALL} == {accel.GOOGLE_TPU_V4, accel.GOOGLE_TPU_V5LITEPOD,
                                                  accel.GOOGLE_TPU_V5P, accel.GOOGLE_TPU_V6E}


def test_ray_node_accelerator_type(monkeypatch):
    manager = ray_fn(PRIV, "TPUAcceleratorManager")
    current = {}
    monkeypatch.setattr(manager, "get_current_node_tpu_pod_type", staticmethod(lambda: current["pod_type"]))

    def ray_answer(t):
        current["pod_type"] = t.name
        return manager.get_current_node_accelerator_type()

    assert disagreements(lambda t: t.ray_resource_name, ray_answer) == {}


def test_ray_valid_types():
    valid = ray_fn(PRIV, "VALID_TPU_TYPES")
    check = ray_fn(PRIV, "TPUAcceleratorManager").is_valid_tpu_accelerator_type
    assert {prefix(t) for t in ALL} <= set(valid)
    assert disagreements(lambda t: True, lambda t: check(t.name)) == {}


def test_ray_valid_topologies():
    check = ray_fn(PRIV, "TPUAcceleratorManager").is_valid_tpu_accelerator_topology
    # Ray 2.60's v4 table stops at 12x12x16, leaving out the documented v4-4096 slice (8x16x16).
    known_gaps = {"v4-4096": (True, False)}
    assert disagreements(lambda t: True, lambda t: check(prefix(t), t.topology)) == known_gaps


def test_ray_chips_from_accelerator_type():
    fn = ray_fn(PRIV, "get_total_chips_from_accelerator_type")
    assert disagreements(lambda t: t.chips, lambda t: fn(t.name)) == {}


def test_ray_cores_per_chip():
    fn = ray_fn(PRIV, "get_tpu_cores_per_chip")
    assert disagreements(lambda t: t.cores_per_chip, lambda t: fn(t.name)) == {}


def test_ray_chips_per_host_from_accelerator_type():
    fn = ray_fn(PRIV, "get_num_tpu_visible_chips_per_host")
    assert disagreements(lambda t: t.chips_per_host, lambda t: fn(t.name)) == {}


def test_ray_chips_per_host_from_topology():
    fn = ray_fn(PRIV, "get_chips_per_host")
    assert disagreements(lambda t: t.chips_per_host, lambda t: fn(t.topology, prefix(t))) == {}


def test_ray_chips_from_topology():
    fn = ray_fn(PRIV, "get_num_chips_from_topology")
    assert disagreements(lambda t: t.chips, lambda t: fn(t.topology)) == {}


def test_ray_pod_type_from_topology():
    fn = ray_fn(PRIV, "infer_tpu_pod_type_from_topology")
    assert disagreements(lambda t: t.name, lambda t: fn(t.topology, t.ray_resource_name)) == {}


def test_ray_workers_per_slice():
    fn = ray_fn("ray.util.tpu", "get_tpu_worker_resources")
    ours = lambda t: (t.hosts, {"CPU": 1, "TPU": t.chips_per_host})  # noqa: E731
    assert disagreements(ours, lambda t: fn(t.topology, t.ray_resource_name, tpu_resource_per_chip=1)) == {}
    assert disagreements(lambda t: 2 * t.hosts,
                         lambda t: fn(t.topology, t.ray_resource_name, num_slices=2, tpu_resource_per_chip=1)[0]) == {}


def test_ray_slices_for_workers():
    fn = ray_fn("ray.util.tpu", "get_tpu_num_slices_for_workers")
    assert disagreements(lambda t: 3, lambda t: fn(t.topology, t.ray_resource_name, 3 * t.hosts,
                                                   tpu_resource_per_chip=1)) == {}


# ---- agreement with the TPU compiler (libtpu), in a subprocess so no TPU state leaks into this one ----

_LIBTPU_PROBE = """
import json, sys
from jax.experimental import topologies
out = {}
for name, topo, bounds in json.loads(sys.argv[1]):
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topo, chips_per_host_bounds=bounds).devices
    out[name] = [len(devices), len({d.process_index for d in devices})]
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (jax[tpu]) not installed")
def test_libtpu_topologies():
    args = json.dumps([[t.name, t.jax_topology_name, list(t.chips_per_host_bounds)] for t in ALL])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # don't contend for /tmp/libtpu_lockfile
    proc = subprocess.run([sys.executable, "-c", _LIBTPU_PROBE, args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # The compile-only v4 description lists one device per TensorCore (real v4 VMs run megacore: one per chip).
    expect = {t.name: [t.chips * (t.cores_per_chip if t.version == "v4" else 1), t.hosts] for t in ALL}
    assert got == expect


# ---- conf/cluster/*.yaml ----

CLUSTER_KEYS = {"provider", "accelerator_type", "num_slices", "hosts", "devices_per_host", "tpu_version",
                "cpus_per_host", "slice_name", "project", "zone", "runtime_version", "capacity", "network",
                "subnetwork", "service_account", "labels", "bucket", "price_on_demand", "price_spot"}
CLOUD_CONFS = sorted(f[:-5] for f in os.listdir(CLUSTER_CONF) if f.endswith(".yaml") and f != "local.yaml")


def test_expected_cluster_confs_exist():
    assert {"v4-8", "v4-32", "v5litepod-16", "v5p-32", "v6e-16", "v4-32x2"} <= set(CLOUD_CONFS)


@pytest.mark.parametrize("name", CLOUD_CONFS)
def test_cluster_conf_composes_and_names_a_catalog_type(name):
    from launcher.config import compose_config

    path = os.path.join(CLUSTER_CONF, f"{name}.yaml")
    with open(path) as f:
        text = f.read()
    assert text.startswith("# ") and "\n" in text, "a one-line comment on top"
    assert set(yaml.safe_load(text)) >= CLUSTER_KEYS
    cluster = compose_config([f"+cluster={name}"]).cluster
    t = lookup(cluster.accelerator_type)
    assert cluster.provider == "gcp"
    assert cluster.tpu_version == t.version
    assert cluster.hosts is None and cluster.devices_per_host is None  # derived from the catalog
    assert cluster.runtime_version is None and cluster.zone
    assert cluster.capacity in ("on_demand", "spot", "reserved")
    assert cluster.num_slices == (2 if name.endswith("x2") else 1)
    if not name.endswith("x2"):
        assert name == t.name
