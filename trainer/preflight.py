"""Launch pre-flight on this CPU: AOT-compile the real train step for a TPU topology to size its HBM use."""
# compile_for_topology builds the trainer's own mesh, shardings, model, optimizer and jitted train step over
# compile-only TPU devices from libtpu (jax.experimental.topologies), lowers it with ShapeDtypeStructs (no array
# is ever materialised) and reads XLA's per-device memory analysis, and XLA's cost analysis of the compiled step
# (FLOPs and its cost model's step time, hence the MFU the step would reach at the catalog's peak).
# analytic_estimate needs no libtpu.
# CLI: python -m trainer.preflight --config RESOLVED.yaml --topology v4:2x2x4 [--num-slices N] [--analytic]
#      [--fast] [--per-core] [--verbose]: one JSON object on stdout; on failure one line
#      "preflight: error: ..." on stderr and exit 2.
# Run it as a subprocess: it must own the process's jax (JAX_PLATFORMS=cpu is set before jax is first imported,
# so libtpu only compiles and never opens a TPU); importing this module does not import jax.
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from trainer.mesh_shape import AXES, resolve_mesh_shape
from trainer.runfiles import EXIT_USER_ERROR

# Generations whose chips hold two TensorCores: libtpu's default chip config gives one device per core;
# Cloud TPU VMs run them as megacore (one device per chip), which is what the trainer will see.
_MEGACORE = ("v4", "v5p")
_TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


class Chip(NamedTuple):
    """What the fit and step-time figures need of a chip; the launcher passes the catalog's values
    (cluster/catalog.py), the one place they are written down."""
    hbm_bytes: int
    peak_flops: float

_TOP_BUFFERS = 5


class PreflightError(Exception):
    """A user-facing failure (bad topology name, mesh that does not fit the topology, ...)."""


# -- helpers shared by both paths --------------------------------------------------------------------------
def _mesh_sizes(mesh) -> Dict[str, int]:
    """Axis sizes as the launcher reports them: `dcn` only when there are several slices."""
    return {a: int(s) for a, s in mesh.shape.items() if a != "dcn" or int(s) > 1}


def parse_topology(topology_name: str) -> Tuple[str, int]:
    """'v4:2x2x4' -> ('v4', 16 chips). Raises PreflightError for names this pre-flight does not know."""
    m = _TOPOLOGY_RE.match(str(topology_name).strip())
    if not m:
        raise PreflightError(f"topology '{topology_name}' is not GEN:AxB[xC] with GEN one of v4, v5e, v5p, v6e "
                             f"(e.g. v4:2x2x4 for v4-32, v5e:4x4 for v5litepod-16)")
    return m.group(1), math.prod(int(x) for x in m.group(2).split("x"))


def _mesh_request(cfg) -> Dict[str, int]:
    return {a: int(cfg.mesh[a]) for a in AXES}


def _model_parts(cfg, mesh=None, **spec_changes):
    """The trainer's model spec, model (given the mesh, as the trainer gives it), optimizer and schedule."""
    from trainer.model import ModelSpec, TransformerLM
    from trainer.optim import make_optimizer

    spec = ModelSpec.from_config(cfg.model)
    if spec_changes:
        spec = dataclasses.replace(spec, **spec_changes)
    tx, schedule = make_optimizer(cfg.optimizer, int(cfg.trainer.steps))
    return spec, TransformerLM(spec, mesh), tx, schedule


def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _largest(entries: List[Tuple[str, tuple, str, int]]) -> List[Dict[str, Any]]:
    entries = sorted(entries, key=lambda e: (-e[3], e[0]))[:_TOP_BUFFERS]
    return [{"name": n, "shape": list(s), "dtype": d, "bytes": b} for n, s, d, b in entries]


# -- compiled path -----------------------------------------------------------------------------------------
def tpu_compiler_available() -> bool:
    """True when libtpu (pip install "jax[tpu]") is installed: checked without loading it or jax."""
    try:
        spec = importlib.util.find_spec("libtpu")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.isfile(os.path.join(d, "libtpu.so")) for d in spec.submodule_search_locations)


def _prepare_env():
    """Before jax loads: CPU as the only backend (libtpu just compiles; on a TPU VM the chips stay free), and no
    libtpu single-process lock (/tmp/libtpu_lockfile), which compile-only use does not need: without this two
    pre-flights at once (or one beside a TPU job) fail with "ABORTED: ... libtpu multi-process lockfile"."""
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _topology_devices(gen: str, topology_name: str, num_slices: int, megacore: bool = True):
    """Compile-only TPU devices. v4/v5p are asked for libtpu's megacore chip config (one device per chip, as a
    Cloud TPU VM runs them); without it libtpu gives one device per TensorCore (2 per chip)."""
    _prepare_env()
    from jax.experimental import topologies

    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    note = None
    if megacore and gen in _MEGACORE:
        try:
            return topologies.get_topology_desc(platform="tpu", topology_name=topology_name,
                                                chip_config_name="megacore", **kwargs).devices, note
        except Exception as e:  # noqa: BLE001 - fall back to libtpu's default (one device per TensorCore)
            note = f"megacore chip config unavailable ({_first_line(e)}): one device per TensorCore"
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology_name, **kwargs).devices
    except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError for bad names
        raise PreflightError(f"topology '{topology_name}': {_first_line(e)}") from None
    return devices, note


def _chips(devices) -> int:
    return len({(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices})


def compile_for_topology(cfg, topology_name: str, chip: Chip, num_slices: int = 1, *, megacore: bool = True,
                         fast: bool = False) -> dict:
    """AOT-compile the trainer's real train step for a TPU topology and report XLA's per-device memory.

    The mesh is cfg.mesh (one axis may be -1) resolved against every device of every slice, exactly as
    trainer.sharding.make_mesh does on the pod (with num_slices > 1 the leading axes span the slices over DCN,
    as they do there; no extra 'dcn' axis is invented). peak_estimate is XLA's peak_memory_in_bytes when it
    reports one, else arguments + outputs - alias + temp; generated_code is added to it for the HBM estimate.
    megacore=False keeps libtpu's default v4/v5p layout (one device per TensorCore; est_hbm_bytes_per_chip then
    counts both). fast=True compiles with exec_time_optimization_effort=-1 (about half the compile time; the
    memory figures moved < 1% for model=base, the step's run time is not what is measured here).
    """
    _prepare_env()
    import jax
    import jax.numpy as jnp

    from trainer.sharding import batch_sharding, make_mesh
    from trainer.state import abstract_state, count_params, state_shardings
    from trainer.step import make_train_step

    gen, chips_per_slice = parse_topology(topology_name)
    if num_slices < 1:
        raise PreflightError(f"num_slices must be >= 1, got {num_slices}")
    devices, note = _topology_devices(gen, topology_name, num_slices, megacore)
    chips = _chips(devices)
    per_chip = len(devices) // chips
    try:
        mesh = make_mesh(_mesh_request(cfg), devices)
    except ValueError as e:
        raise PreflightError(f"{e} (topology {topology_name} x {num_slices} slice(s) gives {len(devices)} "
                             f"devices)") from None
    from trainer.model import training_attention

    spec = _model_parts(cfg)[0]
    batch, seq_len = int(cfg.trainer.batch_size), int(cfg.model.seq_len)
    _check_batch(batch, mesh.shape)
    try:
        attention = training_attention(spec, mesh, seq_len)
    except ValueError as e:
        raise PreflightError(str(e)) from None

    def lower(**spec_changes):
        _, model, tx, schedule = _model_parts(cfg, mesh, **spec_changes)
        shardings = state_shardings(model, tx, mesh, seq_len)
        state = abstract_state(model, tx, mesh, seq_len, shardings)
        tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding(mesh))
        step = make_train_step(model, tx, schedule, mesh, shardings)
        return step.lower(state, {"inputs": tokens, "targets": tokens}), state

    t0 = time.perf_counter()
    lowered, state = lower()
    # A step that does not fit HBM fails to compile (RESOURCE_EXHAUSTED ... exceeds available HBM) unless the
    # OOM is suppressed: with it the analysis still reports the bytes, and "fits" says whether they fit.
    options = {"xla_tpu_no_crash_on_oom": True}
    if fast:
        options["exec_time_optimization_effort"] = -1.0
    try:
        try:
            compiled = lowered.compile(compiler_options=options)
        except Exception as e:  # noqa: BLE001 - an older/newer libtpu may not know the option
            if "no such compile option" not in str(e).lower():
                raise
            options.pop("xla_tpu_no_crash_on_oom")
            compiled = lowered.compile(compiler_options=options or None)
    except Exception as e:  # noqa: BLE001 - JaxRuntimeError
        return _rejected(cfg, e, topology_name, gen, chip, num_slices, chips, len(devices), per_chip,
                         _mesh_sizes(mesh), time.perf_counter() - t0)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is None:
        raise PreflightError("the TPU compiler returned no memory analysis")

    b = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
         "temp": int(mem.temp_size_in_bytes), "generated_code": int(mem.generated_code_size_in_bytes),
         "alias": int(mem.alias_size_in_bytes)}
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    if peak <= 0:
        peak = b["arguments"] + b["outputs"] - b["alias"] + b["temp"]
    b["peak_estimate"] = peak + b["generated_code"]

    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path({"params": state["params"],
                                                              "opt_state": state["opt_state"]})[0]:
        if not leaf.shape:
            continue
        shard = leaf.sharding.shard_shape(leaf.shape)
        leaves.append((_path_name(path), tuple(shard), str(leaf.dtype), math.prod(shard) * leaf.dtype.itemsize))

    out = {"preflight": "tpu-compiler", "topology": topology_name, "generation": gen, "num_slices": num_slices,
           "compile_s": round(compile_s, 3), "chips": chips, "devices": len(devices), "devices_per_chip": per_chip,
           "device_kind": devices[0].device_kind,
           "compiler_options": options, "mesh": _mesh_sizes(mesh),
           "bytes_per_device": b, "est_hbm_bytes_per_chip": b["peak_estimate"] * per_chip,
           "hbm_bytes_per_chip": chip.hbm_bytes, "largest_buffers": _largest(leaves),
           "params": count_params(state["params"]), "attention": attention,
           "mosaic_custom_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"')}
    if chips != chips_per_slice * num_slices:
        out["note"] = f"topology description has {chips} chips, expected {chips_per_slice * num_slices}"
    if note:
        out["note"] = note
    _add_fit_and_time(out, cfg, chip)
    out.update(_xla_cost(compiled, spec, lambda: lower(scan_unroll=2)[0].compile(compiler_options=options or None),
                         measure_loop=out["fits"]))
    out["kernel_flops_per_device"] = _splash_flops_per_device(spec, batch, seq_len, out["mesh"]) \
        if attention == "splash" else 0.0
    _add_mfu(out, cfg, chip)
    return out


# -- XLA's cost analysis -----------------------------------------------------------------------------------
_COST_KEYS = {"flops": "flops", "optimal_seconds": "step_s", "bytes accessed": "bytes"}


def _cost(compiled) -> Optional[Dict[str, float]]:
    """flops, step_s (the cost model's optimal_seconds) and bytes accessed of one device's program, as XLA's cost
    analysis of the compiled TPU executable gives them; None if it gives none of them."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without a cost analysis
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not isinstance(ca, dict) or "flops" not in ca:
        return None
    cost = {name: float(ca[key]) for key, name in _COST_KEYS.items() if key in ca}
    if cost.get("step_s", 0) <= 0:  # e.g. -7 for a 2-slice step: the cost model times no cross-slice collective
        cost.pop("step_s", None)
    return cost


def _xla_cost(compiled, spec, compile_unrolled, measure_loop: bool = True) -> dict:
    """XLA's FLOPs, step time and bytes for one device's program. XLA's cost analysis counts a while loop's body
    once, however many times it runs (jax-ml/jax#18672), so for a scanned stack of L layers it reports
    a + b (a: everything outside the loops, b: one layer forward and backward). A second compile with the scan
    unrolled by 2 reports a + c*b (c = 2 + L mod 2: jax runs an odd layer outside the loop), which gives b, and
    the step's a + L*b. `xla_loop_counted_once` keeps the uncorrected figures and the second compile's time.
    measure_loop=False (a step that does not fit) skips that compile: no figures for a scanned step then."""
    out = {"xla_flops_per_device": None, "xla_step_s": None, "xla_bytes_per_device": None}
    once = _cost(compiled)
    if once is None:
        return out
    total = dict(once)
    if spec.scan_layers and spec.n_layers > 1:
        if not measure_loop:
            out["xla_cost_note"] = "the step does not fit: its per-layer cost was not measured"
            return out
        t0 = time.perf_counter()
        try:
            twice = _cost(compile_unrolled())
        except Exception as e:  # noqa: BLE001 - JaxRuntimeError: report the step without its cost
            out["xla_cost_note"] = f"the scan-unrolled compile for the per-layer cost failed: {_first_line(e)}"
            return out
        layers, counted = spec.n_layers, 2 + spec.n_layers % 2
        if twice is None:
            return out
        for k in total:
            if k in twice:
                per_layer = (twice[k] - once[k]) / (counted - 1)
                total[k] = once[k] + (layers - 1) * per_layer
        out["xla_loop_counted_once"] = {"layers": layers, "flops_per_device": once.get("flops"),
                                        "step_s": once.get("step_s"), "unrolled_compile_s":
                                        round(time.perf_counter() - t0, 3)}
    out.update(xla_flops_per_device=total.get("flops"), xla_step_s=total.get("step_s"),
               xla_bytes_per_device=total.get("bytes"))
    if out["xla_step_s"] is None:
        out["xla_cost_note"] = "XLA's cost model gave no step time for this program (no optimal_seconds > 0)"
    return out


def _splash_flops_per_device(spec, batch: int, seq_len: int, mesh: Dict[str, int]) -> float:
    """The splash kernel's FLOPs on one device, which XLA's cost analysis cannot see (a Mosaic custom call counts
    zero): per layer forward 2 x 2 x rows x seq^2 x heads x head_dim halved for the causal blocks it skips, the
    backward twice that, and one more forward when remat recomputes the block."""
    rows = batch // (int(mesh.get("dcn", 1)) * int(mesh.get("data", 1)) * int(mesh.get("fsdp", 1)))
    heads = spec.n_heads // int(mesh.get("tensor", 1))
    forward = 2 * rows * seq_len * seq_len * heads * spec.head_dim * spec.n_layers
    return float(forward * (3 + (spec.remat != "none")))


def _add_mfu(out: dict, cfg, chip: Chip):
    """model_flops_per_step (trainer/flops.py: 6 x N x tokens + causal attention at half) next to the compiled
    step's FLOPs (XLA's count plus the splash kernel's, every device: compiled_flops_per_step), and what both
    reach at the catalog's peak in implied_step_s, the step time of XLA's cost model (its optimal_seconds: each
    op at the chip's compute or memory roofline) plus the kernel's FLOPs at peak: implied_mfu (model FLOPs) and
    implied_hfu (compiled FLOPs, rematerialisation and all)."""
    from trainer.flops import flops_per_step
    from trainer.model import ModelSpec

    model_flops = flops_per_step(ModelSpec.from_config(cfg.model), int(cfg.trainer.batch_size),
                                 int(cfg.model.seq_len))
    out["model_flops_per_step"] = model_flops
    for key in ("xla_flops_per_device", "xla_step_s", "xla_bytes_per_device"):
        out.setdefault(key, None)
    out.setdefault("kernel_flops_per_device", 0.0)
    per_device, step_s, kernel = out["xla_flops_per_device"], out["xla_step_s"], out["kernel_flops_per_device"]
    peak_per_device = float(chip.peak_flops) / int(out.get("devices_per_chip", 1))
    flops = per_device is not None
    out["compiled_flops_per_step"] = (per_device + kernel) * out["devices"] if flops else None
    ok = flops and step_s is not None and step_s > 0
    out["implied_step_s"] = step_s + kernel / peak_per_device if ok else None
    peak = float(chip.peak_flops) * int(out["chips"])
    out["implied_mfu"] = round(model_flops / (out["implied_step_s"] * peak), 4) if ok else None
    out["implied_hfu"] = round(out["compiled_flops_per_step"] / (out["implied_step_s"] * peak), 4) if ok else None


def _rejected(cfg, error: BaseException, topology_name: str, gen: str, chip: Chip, num_slices: int, chips: int,
              devices: int,
              per_chip: int, mesh: Dict[str, int], compile_s: float) -> dict:
    """The compiler refused the step. Far too big a step (past ~128 GiB a device even with OOM suppressed) comes
    back as "INVALID_ARGUMENT: Invalid TPU program": if the analytic estimate says it cannot fit either, report
    that estimate (fits: false) with the compiler's words; any other failure is an error."""
    msg = _first_line(error)
    if "RESOURCE_EXHAUSTED" in msg or "Invalid TPU program" in msg:
        out = analytic_estimate(cfg, devices, mesh)
        est = out["bytes_per_device"]["peak_estimate"] * per_chip
        if est > chip.hbm_bytes:
            out.update(topology=topology_name, generation=gen, num_slices=num_slices, chips=chips,
                       devices_per_chip=per_chip, est_hbm_bytes_per_chip=est,
                       hbm_bytes_per_chip=chip.hbm_bytes, compile_s=round(compile_s, 3), compile_error=msg,
                       note="the TPU compiler rejected the step; analytic estimate")
            _add_fit_and_time(out, cfg, chip)
            _add_mfu(out, cfg, chip)
            return out
    raise PreflightError(f"TPU compiler: {msg}") from None


def _check_batch(batch: int, mesh: Dict[str, int]):
    split = int(mesh["data"]) * int(mesh["fsdp"])
    if batch % split:
        raise PreflightError(f"trainer.batch_size={batch} is not divisible by mesh data x fsdp = {split}")


def _add_fit_and_time(out: dict, cfg, chip: Chip):
    out["fits"] = out["est_hbm_bytes_per_chip"] <= out["hbm_bytes_per_chip"]
    out["est_step_s"] = round(estimate_step_time(cfg, out["params"], out["chips"], chip.peak_flops), 6)


# -- analytic path -----------------------------------------------------------------------------------------
def _shard_factor(names, mesh: Dict[str, int]) -> int:
    """How many ways LOGICAL_RULES split a parameter with these logical axis names over the mesh."""
    from trainer.sharding import LOGICAL_RULES

    rules = dict(LOGICAL_RULES)
    used, factor = set(), 1
    for name in names or ():
        target = rules.get(name)
        for axis in (target if isinstance(target, tuple) else (target,)):
            if axis is not None and axis not in used:
                used.add(axis)
                factor *= int(mesh.get(axis, 1))
    return factor


def analytic_estimate(cfg, devices: int, mesh: dict) -> dict:
    """Per-device bytes without libtpu, from the real model's and optimizer's state shapes and logical axis names.

    arguments = the train state as the trainer builds it (fp32 params, AdamW mu and nu with the params' logical
    axes, step counters), each leaf's bytes divided by its shard factor under LOGICAL_RULES for this mesh
    (a dimension the mesh axis does not divide stays whole). outputs alias the donated state.
    temp = gradients (one more fp32 copy of the sharded params) + with fsdp > 1, one layer's all-gathered fp32
    weights + activations kept for the backward pass for the local batch b = batch / (data x fsdp), sequence s,
    width d, d_ff f, h heads, t = tensor, compute dtype of c bytes:
        n_layers * (b*s*(10*d + 2*f/t) * c  +  2 * b*(h/t)*s*s * 4)  +  3 * b*s*(vocab/t) * 4
    (per layer: norms, q/k/v, attention output, residuals and the MLP's two d_ff tensors; fp32 attention logits
    and probabilities of the causal softmax; then the fp32 logits, softmax and its gradient at the head).
    peak_estimate = arguments + temp. It errs high: XLA frees gradients into the update in place (for
    model=base it is ~1.3x the compiled peak).
    """
    import jax
    import flax.linen as nn

    from trainer.state import _boxed_init

    mesh = {a: int(mesh.get(a, 1)) for a in AXES}
    if math.prod(mesh.values()) != int(devices):
        raise PreflightError(f"mesh {mesh} does not cover {devices} devices")
    spec, model, tx, _ = _model_parts(cfg)
    batch, seq_len = int(cfg.trainer.batch_size), int(cfg.model.seq_len)
    _check_batch(batch, mesh)
    boxed = jax.eval_shape(_boxed_init(model, tx, seq_len), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)

    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=is_spec)
    leaves, state_bytes, param_bytes, n_params, layer_gather = [], 0, 0, 0, 0
    for (path, leaf), pspec in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], flat_specs):
        name = _path_name(path)
        shard_shape = _shard_shape(leaf.shape, tuple(pspec), mesh)
        nbytes = math.prod(shard_shape) * leaf.dtype.itemsize
        state_bytes += nbytes
        leaves.append((name, shard_shape, str(leaf.dtype), nbytes))
        if name.startswith("params/"):
            n_params += math.prod(leaf.shape)
            param_bytes += nbytes
            if mesh["fsdp"] > 1 and name.startswith("params/block_0/"):
                layer_gather += math.prod(_shard_shape(leaf.shape, tuple(pspec), {**mesh, "fsdp": 1})) \
                    * leaf.dtype.itemsize

    s, t = spec, mesh["tensor"]
    local_b = batch // (mesh["data"] * mesh["fsdp"])
    c = 2 if s.dtype == "bfloat16" else 4
    act_layer = local_b * seq_len * (10 * s.d_model + 2 * s.d_ff // t) * c \
        + 2 * local_b * max(1, s.n_heads // t) * seq_len * seq_len * 4
    act_head = 3 * local_b * seq_len * max(1, s.vocab_size // t) * 4
    activations = s.n_layers * act_layer + act_head
    arguments = state_bytes + 8 + 2 * local_b * seq_len * 4  # + step, rng key data, the int32 batch
    temp = param_bytes + layer_gather + activations
    b = {"arguments": arguments, "outputs": arguments, "temp": temp, "generated_code": 0, "alias": arguments,
         "peak_estimate": arguments + temp}
    return {"preflight": "analytic", "compile_s": 0, "devices": int(devices), "devices_per_chip": 1,
            "mesh": mesh, "bytes_per_device": b, "est_hbm_bytes_per_chip": b["peak_estimate"],
            "largest_buffers": _largest(leaves), "params": n_params, "activation_bytes": activations}


def _shard_shape(shape, names, mesh) -> tuple:
    from trainer.sharding import LOGICAL_RULES

    rules, out, used = dict(LOGICAL_RULES), [], set()
    for dim, name in zip(shape, tuple(names) + (None,) * (len(shape) - len(names))):
        target = rules.get(name) if name is not None else None
        f = 1
        for axis in (target if isinstance(target, tuple) else (target,)):
            if axis is not None and axis not in used:
                used.add(axis)
                f *= mesh.get(axis, 1)
        out.append(dim // f if dim % f == 0 else dim)
    return tuple(out)


# -- step time ---------------------------------------------------------------------------------------------
def estimate_step_time(cfg, params: int, chips: int, peak_flops_per_chip: float, mfu: float = 0.4) -> float:
    """Seconds per step: (6 * params * tokens + attention) / (peak * chips * mfu).

    Attention (MaxText): 4 * batch * seq^2 * n_heads * head_dim per layer forward (QK^T and AV), x3 for
    forward + backward, halved for the causal mask.
    """
    batch, seq = int(cfg.trainer.batch_size), int(cfg.model.seq_len)
    m = cfg.model
    head_dim = int(m.d_model) // int(m.n_heads)
    attention = 4 * batch * seq * seq * int(m.n_heads) * head_dim * int(m.n_layers) * 3 / 2
    flops = 6 * int(params) * batch * seq + attention
    return flops / (float(peak_flops_per_chip) * int(chips) * float(mfu))


# -- CLI ---------------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _analytic_for_topology(cfg, topology_name: str, chip: Chip, num_slices: int, megacore: bool = True) -> dict:
    gen, chips = parse_topology(topology_name)
    per_chip = 1 if megacore or gen not in _MEGACORE else 2  # megacore: one device per chip, as on a TPU VM
    devices = chips * num_slices * per_chip
    try:
        mesh = resolve_mesh_shape(_mesh_request(cfg), devices)
    except ValueError as e:
        raise PreflightError(f"{e} (topology {topology_name} x {num_slices} slice(s) gives {devices} "
                             f"devices)") from None
    out = analytic_estimate(cfg, devices, mesh)
    out.update(topology=topology_name, generation=gen, num_slices=num_slices, chips=chips * num_slices,
               devices_per_chip=per_chip, est_hbm_bytes_per_chip=out["bytes_per_device"]["peak_estimate"] * per_chip,
               hbm_bytes_per_chip=chip.hbm_bytes)
    _add_fit_and_time(out, cfg, chip)
    _add_mfu(out, cfg, chip)
    return out


def _analytic_for_devices(cfg, devices: int) -> dict:
    """A pod with no TPU type (local CPU devices): memory per device only; no HBM to fit."""
    try:
        mesh = resolve_mesh_shape(_mesh_request(cfg), devices)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    out = analytic_estimate(cfg, devices, mesh)
    out.update(est_hbm_bytes_per_chip=out["bytes_per_device"]["peak_estimate"], hbm_bytes_per_chip=None,
               fits=None, devices_per_chip=1)
    return out


def run(cfg, topology_name: str, chip: Chip, num_slices: int = 1, analytic: bool = False, megacore: bool = True,
        fast: bool = False) -> dict:
    """The compiled pre-flight when libtpu is installed (else, or with analytic=True, the analytic one)."""
    parse_topology(topology_name)
    if not analytic and tpu_compiler_available():
        return compile_for_topology(cfg, topology_name, chip, num_slices, megacore=megacore, fast=fast)
    out = _analytic_for_topology(cfg, topology_name, chip, num_slices, megacore)
    if not analytic:
        out["note"] = 'libtpu not installed (pip install "jax[tpu]"): analytic estimate'
    return out


class _QuietStderr:
    """Send fd 2 (libtpu's C++ start-up warnings) to a temp file; replay it only when asked."""

    def __init__(self, replay: bool):
        self.replay = replay

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.tmp = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self.tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if self.replay:
            self.tmp.seek(0)
            sys.stderr.write(self.tmp.read().decode("utf-8", "replace"))
        self.tmp.close()
        return False


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.preflight", description=__doc__)
    parser.add_argument("--config", required=True, help="a resolved run config YAML (launcher --cfg output)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU topology, e.g. v4:2x2x4 (v4-32), v5e:4x4")
    where.add_argument("--devices", type=int, help="no TPU type (a plain local pod): analytic, N devices")
    parser.add_argument("--hbm-bytes-per-chip", type=int, help="with --topology: the chip's HBM (catalog)")
    parser.add_argument("--peak-flops-per-chip", type=float, help="with --topology: bf16 peak FLOP/s (catalog)")
    parser.add_argument("--num-slices", type=int, default=1)
    parser.add_argument("--analytic", action="store_true", help="skip the TPU compiler: analytic estimate")
    parser.add_argument("--per-core", action="store_true",
                        help="v4/v5p: one device per TensorCore (libtpu's default) instead of megacore")
    parser.add_argument("--fast", action="store_true",
                        help="compile with exec_time_optimization_effort=-1: ~2x faster, same memory to <1%%")
    parser.add_argument("--verbose", action="store_true", help="show libtpu's start-up log on stderr")
    args = parser.parse_args(argv)
    _prepare_env()
    try:
        from omegaconf import OmegaConf

        if not os.path.isfile(args.config):
            raise PreflightError(f"--config {args.config}: no such file")
        cfg = OmegaConf.load(args.config)
        if args.topology and not (args.hbm_bytes_per_chip and args.peak_flops_per_chip):
            raise PreflightError("--topology needs --hbm-bytes-per-chip and --peak-flops-per-chip (the launcher "
                                 "passes the catalog's values)")
        chip = Chip(args.hbm_bytes_per_chip, args.peak_flops_per_chip) if args.topology else None
        with _QuietStderr(replay=args.verbose):
            out = (run(cfg, args.topology, chip, args.num_slices, args.analytic, not args.per_core, args.fast)
                   if args.topology else _analytic_for_devices(cfg, args.devices))
    except Exception as e:  # noqa: BLE001 - one line for the launcher, whatever went wrong
        kind = "" if isinstance(e, PreflightError) else f"{type(e).__name__}: "
        print(f"preflight: error: {kind}{_first_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
