"""This machine's peak FLOP/s for MFU on CPU: a jitted float32 matmul, measured once per machine and cached.

`python -m trainer.peak` prints `{"peak_flops": ..., "key": {...}, ...}` as one JSON line, measuring only if the
cache has no entry for this machine. The launcher runs it in a short subprocess before a local pod starts, so
the pod does not disturb the measurement (and the launcher itself imports no JAX). The cache lives in
$TPU_LAUNCHER_CACHE/peak (else ~/.cache/tpu-launcher/peak), one file per key: the CPU model, the CPU count,
the architecture and the jax/jaxlib versions (a new XLA may multiply faster).

The matmul runs on one JAX CPU device, which XLA's CPU backend computes with every core of the machine: that
is the machine's peak, and also the peak of a local pod, whose hosts share those cores.
"""
import argparse
import hashlib
import json
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

from trainer.cache import cache_dir as shared_cache_dir
from trainer.runfiles import read_json, write_json

MATMUL_N = 2048  # 2 x 2048^3 = 17 GFLOP per matmul: well above dispatch overhead, a fraction of a second
MIN_REPEATS, MIN_SECONDS = 3, 1.0


def cache_dir() -> str:
    return shared_cache_dir("peak")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: the platform's processor string names the CPU instead
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "none"


def machine_key() -> dict:
    return {"cpu": _cpu_model(), "cpus": os.cpu_count(), "arch": platform.machine(), "jax": _version("jax"),
            "jaxlib": _version("jaxlib")}


def cache_file(key: dict, root: Optional[str] = None) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root or cache_dir(), f"{digest}.json")


def cached(root: Optional[str] = None) -> Optional[dict]:
    """The cached entry for this machine, or None."""
    key = machine_key()
    entry = read_json(cache_file(key, root))
    if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("peak_flops"), (int, float)) \
            and entry["peak_flops"] > 0:
        return entry
    return None


def measure(n: int = MATMUL_N) -> float:
    """The best FLOP/s of a jitted n x n float32 matmul over a few repeats (the first, compiling call excluded)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best, repeats, t_start = float("inf"), 0, time.perf_counter()
    while repeats < MIN_REPEATS or time.perf_counter() - t_start < MIN_SECONDS:
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        repeats += 1
    return 2.0 * n ** 3 / best


def peak(root: Optional[str] = None) -> dict:
    """The cached entry, or a fresh measurement written to the cache."""
    entry = cached(root)
    if entry is not None:
        return dict(entry, source="cache")
    key = machine_key()
    t0 = time.time()
    entry = {"key": key, "peak_flops": measure(), "matmul_n": MATMUL_N, "measured_at": t0,
             "measure_s": round(time.time() - t0, 3)}
    write_json(cache_file(key, root), entry)
    return dict(entry, source="measured")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.peak", description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=None, help="default: $TPU_LAUNCHER_CACHE/peak or ~/.cache/tpu-launcher/peak")
    args = p.parse_args(argv)
    print(json.dumps(peak(args.cache_dir), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
