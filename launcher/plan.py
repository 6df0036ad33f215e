"""The launch plan: topology, mesh, memory per chip (from the TPU compiler, or analytic), cost and step time, and
the compiled step's FLOPs and the MFU XLA's cost model implies for it (trainer/preflight.py).

`launcher.dry_run=true` writes it to ${run.dir}/plan.json and stops (exit 2 with the launch's error when the step
does not fit); a cloud launch computes it first and refuses to provision a step that does not fit in the chips' HBM.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from omegaconf import DictConfig, OmegaConf

from cluster import catalog
from launcher.errors import UserError
from launcher.validate import Plan
from trainer import runfiles

GiB = 1024 ** 3
# The compiled step's cost from the pre-flight: XLA's FLOPs per device (loop-corrected; a Mosaic kernel's count
# zero), the splash kernel's, the whole step's, trainer/flops.py's model FLOPs, XLA's cost-model step time and
# with the kernel at peak, and the MFU / HFU that time implies at the catalog's peak.
COST_KEYS = ("xla_flops_per_device", "kernel_flops_per_device", "compiled_flops_per_step", "model_flops_per_step",
             "xla_step_s", "implied_step_s", "implied_mfu", "implied_hfu")


def tpu_compiler_installed() -> bool:
    """libtpu (the `tpu` extra) present: the step can be AOT-compiled for a TPU topology on this CPU."""
    return importlib.util.find_spec("libtpu") is not None


def _preflight(cfg: DictConfig, tpu, num_slices: int, analytic: bool, devices: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
        path = f.name
    argv = [sys.executable, "-m", "trainer.preflight", "--config", path, "--num-slices", str(num_slices), "--fast"]
    argv += (["--topology", tpu.jax_topology_name, "--hbm-bytes-per-chip", str(tpu.hbm_bytes_per_chip),
              "--peak-flops-per-chip", repr(float(tpu.peak_bf16_flops_per_chip))]
             if tpu is not None else ["--devices", str(devices)])
    if analytic:
        argv.append("--analytic")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["preflight failed"])[-1].removeprefix("preflight: error: ")
        raise UserError("launcher.preflight", last, "fix the model/mesh config, or skip with launcher.preflight=false")
    return json.loads(proc.stdout)


def make_plan(cfg: DictConfig, plan: Plan, compile: bool = True) -> dict:
    tpu = plan.tpu
    analytic = not (compile and tpu is not None and tpu_compiler_installed())
    pre = _preflight(cfg, tpu, plan.num_slices, analytic, plan.devices)
    out = {
        "run": cfg.run.name, "provider": cfg.cluster.provider,
        "accelerator_type": plan.slice.accelerator_type, "num_slices": plan.num_slices,
        "hosts": plan.slice.hosts * plan.num_slices, "chips_per_host": plan.slice.devices_per_host,
        "devices": plan.devices, "mesh": plan.mesh, "params": pre.get("params"),
        "est_hbm_bytes_per_chip": pre.get("est_hbm_bytes_per_chip"),
        "hbm_bytes_per_chip": tpu.hbm_bytes_per_chip if tpu else None,
        "peak_flops_per_chip": tpu.peak_bf16_flops_per_chip if tpu else None,
        "preflight": pre.get("preflight"), "compile_s": pre.get("compile_s", 0.0),
        "largest_buffers": pre.get("largest_buffers", []),
        "cost_per_hour_usd": None, "est_step_time_s": None, "attention": pre.get("attention"),
    }
    for key in COST_KEYS:
        out[key] = pre.get(key)
    # a scanned model's second compile, for the per-layer cost XLA counts once in the loop (trainer/preflight.py)
    out["cost_compile_s"] = (pre.get("xla_loop_counted_once") or {}).get("unrolled_compile_s", 0.0)
    out["fits"] = (out["est_hbm_bytes_per_chip"] <= out["hbm_bytes_per_chip"]
                   if tpu and out["est_hbm_bytes_per_chip"] is not None else None)
    if tpu is not None:
        out["cost_per_hour_usd"] = catalog.cost_per_hour(tpu, plan.num_slices, on_demand=cfg.cluster.price_on_demand,
                                                         spot=cfg.cluster.price_spot)
        out["est_step_time_s"] = pre.get("est_step_s")  # MaxText-style FLOPs at 40% MFU (trainer/preflight.py)
    return out


def refuse_if_unfit(p: dict) -> None:
    if p["fits"] is False:
        top = ", ".join(f"{b.get('name')} {b.get('bytes', 0) / GiB:.2f} GiB" for b in p["largest_buffers"][:3])
        raise UserError("model", f"the train step needs {p['est_hbm_bytes_per_chip'] / GiB:.1f} GiB per chip but a "
                        f"{p['accelerator_type']} chip has {p['hbm_bytes_per_chip'] / GiB:.1f} GiB (largest: {top})",
                        "use a smaller model or batch, shard more (mesh.fsdp), or a larger slice")


def describe(p: dict) -> str:
    est = p["est_hbm_bytes_per_chip"]
    lines = [f"plan for {p['run']}: {p['accelerator_type']} x {p['num_slices']} slice(s), {p['hosts']} hosts, "
             f"{p['devices']} devices, mesh {p['mesh']}, {p['params']:,} params" if p["params"] else
             f"plan for {p['run']}: {p['hosts']} hosts, mesh {p['mesh']}"]
    if est is not None:
        cap = f" of {p['hbm_bytes_per_chip'] / GiB:.1f} GiB" if p["hbm_bytes_per_chip"] else ""
        more = f" + {p['cost_compile_s']:.1f}s unrolled for the layers' cost" if p.get("cost_compile_s") else ""
        lines.append(f"  memory per chip: {est / GiB:.3f} GiB{cap} ({p['preflight']}, compile {p['compile_s']:.1f}s"
                     f"{more})"
                     + ("" if p["fits"] is None else f" -> {'fits' if p['fits'] else 'DOES NOT FIT'}"))
    if p["cost_per_hour_usd"]:
        c = p["cost_per_hour_usd"]
        lines.append(f"  cost: ${c['on_demand']:.2f}/h on demand, ${c['spot']:.2f}/h spot")
    if p.get("compiled_flops_per_step"):
        kernel = " + splash kernel" if p.get("kernel_flops_per_device") else ""
        lines.append(f"  compiled step: {p['compiled_flops_per_step']:.3e} FLOPs (XLA cost analysis{kernel}) vs model "
                     f"{p['model_flops_per_step']:.3e} (6N x tokens + causal attention)")
        peak = f" of {p['peak_flops_per_chip'] / 1e12:g} TFLOP/s per chip" if p.get("peak_flops_per_chip") else ""
        lines.append(f"  XLA cost model: {p['implied_step_s']:.3g}s per step -> MFU {p['implied_mfu']:.1%} "
                     f"(HFU {p['implied_hfu']:.1%}) at the catalog's peak{peak}" if p.get("implied_step_s") else
                     "  XLA cost model: no step time for this program (no MFU)")
    elif p.get("model_flops_per_step"):
        lines.append(f"  model FLOPs per step: {p['model_flops_per_step']:.3e} (no XLA cost analysis: "
                     f"{p['preflight']})")
    if p["est_step_time_s"]:
        lines.append(f"  est. step time at 40% MFU: {p['est_step_time_s']:.3g}s")
    return "\n".join(lines)


def write_plan(run_dir: str, p: dict) -> str:
    path = os.path.join(run_dir, runfiles.PLAN)
    runfiles.write_json(path, p)
    return path
