"""MFU on the launcher's side: the peak FLOP/s of a run's chips handed to every trainer (`--peak-flops`), from which
each step record gets its "mfu", and the run-level MFU of summary.json.

The peak:
- a local CPU pod (cluster.provider=local, no ray.address): this machine's measured float32 matmul peak
  (trainer/peak.py, cached per machine and jax version). The pod's hosts are processes sharing this machine's
  cores, so the pod's total peak is the machine's peak, whatever the number of hosts and devices.
- a TPU slice (cloud, or a Ray cluster of TPU hosts named by cluster.accelerator_type): the catalog's peak bf16
  FLOP/s per chip x chips x slices (cluster/catalog.py), the figure MFU is quoted against on TPUs.
- an attached Ray cluster with no accelerator type: unknown; the records then carry "mfu": null.
summary.json's "mfu" is the mean of the step records' MFU in the latest launch, leaving out each attempt's first
step (its time includes compilation): each record covers trainer.log_every steps, so this is close to the
launch's model FLOPs over its stepping time.
"""
import json
import os
import subprocess
import sys
from typing import Iterable, Optional

import trainer
from trainer import peak

MEASURE_TIMEOUT_S = 300


def run_peak_flops(cfg, plan) -> Optional[float]:
    if cfg.cluster.provider == "local" and not cfg.ray.address:
        return local_peak_flops()
    if plan.tpu is not None:
        return float(plan.tpu.peak_flops) * plan.num_slices
    return None


def local_peak_flops() -> Optional[float]:
    """The cached peak of this machine, else measured now by `python -m trainer.peak` in a subprocess (a few
    seconds, once per machine): on CPU, the launcher runs no JAX itself. None, with a warning, if that fails: the
    run goes on without MFU."""
    entry = peak.cached()
    if entry is not None:
        return float(entry["peak_flops"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(trainer.__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    print("[launcher] measuring this machine's peak FLOP/s for MFU (once; cached in "
          f"{peak.cache_dir()})", flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "trainer.peak"], env=env, capture_output=True, text=True,
                              timeout=MEASURE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return _unmeasured(f"python -m trainer.peak took over {MEASURE_TIMEOUT_S}s")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return _unmeasured(f"python -m trainer.peak exit {proc.returncode}: {last[:300]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_flops"])


def _unmeasured(why: str) -> None:
    print(f"[launcher] warning: could not measure the peak FLOP/s ({why}); step records get no MFU",
          file=sys.stderr, flush=True)
    return None


def launch_mfu(metrics: Iterable[dict], since: float) -> Optional[float]:
    """The mean MFU of the step records written at or after `since` (the launch's start), compile steps left out."""
    values = [r["mfu"] for r in metrics if "split" not in r and not r.get("includes_compile")
              and isinstance(r.get("mfu"), (int, float)) and float(r.get("time", 0)) >= since]
    return sum(values) / len(values) if values else None
