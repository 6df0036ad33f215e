"""Tests for trainer.preflight: the real train step AOT-compiled for TPU topologies by libtpu, in subprocesses."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from omegaconf import OmegaConf

from cluster import catalog
from launcher.config import compose_config
from trainer.preflight import PreflightError, estimate_step_time, parse_topology, tpu_compiler_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30
V4_HBM, V5E_HBM, V5P_HBM, V6E_HBM = 32 * GIB, 16e9, 95e9, 32e9
ABSURD = ["model=base", "model.d_model=8192", "model.d_ff=32768", "model.n_heads=64", "model.n_layers=4"]
CONFIGS = {"tiny": ["model=tiny"], "base": ["model=base"], "absurd": ABSURD,
           "huge": ABSURD[:-1] + ["model.n_layers=12"],
           "tiny32": ["model=tiny", "trainer.batch_size=32"],
           "tiny4": ["model=tiny", "model.n_layers=4"],
           "tiny4-scan": ["model=tiny", "model.n_layers=4", "model.scan_layers=true"],
           "tiny-splash": ["model=tiny", "model.attention=splash"],  # seq_len 64: the kernel cannot run it
           "1b": ["model=1b"],
           # 64 rows of 2048 tokens on 16 chips: its activations only fit v6e's 32 GB when remat recomputes them
           "1b-b64": ["model=1b", "trainer.batch_size=64", "model.remat=full"],
           "1b-b64-no-remat": ["model=1b", "trainer.batch_size=64", "model.remat=none"]}
# (config, topology, extra args). base and the absurd model compile with --fast (exec_time_optimization_effort
# -1: half the compile time, memory within 1%); tiny compiles with the launcher's default options.
RUNS = {
    "tiny-v4": ("tiny", "v4:2x2x4", []),
    "tiny-v5e": ("tiny", "v5e:4x4", []),
    "base-v4": ("base", "v4:2x2x4", ["--fast"]),
    "base-v5e": ("base", "v5e:4x4", ["--fast"]),
    "absurd-v5e": ("absurd", "v5e:2x2", ["--fast"]),
    "huge-v5e": ("huge", "v5e:2x2", ["--fast"]),
    "base-v4-analytic": ("base", "v4:2x2x4", ["--analytic"]),
    "tiny32-v4-2slices": ("tiny32", "v4:2x2x4", ["--num-slices", "2"]),
    "tiny32-v4-per-core": ("tiny32", "v4:2x2x4", ["--per-core"]),
    "bad-topology": ("tiny", "v4:2x2x2x2", []),
    "bad-generation": ("tiny", "v9:2x2", []),
    "bad-mesh": ("tiny", "v4:2x2x3", []),  # 12 chips: batch 16 is not divisible by data=12
    "bad-splash": ("tiny-splash", "v4:2x2x4", []),
    "tiny4-v4": ("tiny4", "v4:2x2x4", ["--fast"]),
    "tiny4-scan-v4": ("tiny4-scan", "v4:2x2x4", ["--fast"]),
    "1b-v5p": ("1b", "v5p:2x2x4", ["--fast"]),  # v5p-32
    "1b-b64-v6e": ("1b-b64", "v6e:4x4", ["--fast"]),  # v6e-16
    "1b-b64-no-remat-v6e": ("1b-b64-no-remat", "v6e:4x4", ["--fast"]),
}
SLOW = ("base", "absurd", "huge", "1b", "1b-b64", "1b-b64-no-remat")
needs_libtpu = pytest.mark.skipif(not tpu_compiler_available(), reason='libtpu not installed: pip install '
                                                                       '"jax[tpu]==0.10.2"')


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _chip_args(topology: str):
    """The catalog's HBM and peak FLOP/s for a topology's generation, as the launcher passes them."""
    gen = topology.split(":")[0]
    tpu = next((t for t in catalog.all_types() if t.version == gen), catalog.lookup("v4-8"))  # v9: any will do
    return ["--hbm-bytes-per-chip", str(tpu.hbm_bytes_per_chip),
            "--peak-flops-per-chip", repr(float(tpu.peak_bf16_flops_per_chip))]


def _run(config_path: str, topology: str, extra):
    cmd = [sys.executable, "-m", "trainer.preflight", "--config", config_path, "--topology", topology,
           *_chip_args(topology), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every preflight run of this module, two at a time (2 cores): {run name: CompletedProcess}."""
    d = tmp_path_factory.mktemp("preflight")
    paths = {}
    for name, overrides in CONFIGS.items():
        paths[name] = str(d / f"{name}.yaml")
        OmegaConf.save(compose_config(overrides), paths[name])
    wanted = RUNS if tpu_compiler_available() else {k: v for k, v in RUNS.items() if "--analytic" in v[2]}
    # the slowest first, so the pair of workers finishes together
    order = sorted(wanted, key=lambda n: (wanted[n][0] not in SLOW, n))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(_run, paths[wanted[n][0]], wanted[n][1], wanted[n][2]) for n in order}
        return {n: f.result() for n, f in futures.items()}


def _ok(results, name) -> dict:
    proc = results[name]
    assert proc.returncode == 0, f"{name}: rc={proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stderr == "", proc.stderr[-3000:]  # libtpu's start-up noise is kept off stderr
    return json.loads(proc.stdout)


def _check_compiled(out: dict, devices: int, hbm: float):
    assert out["preflight"] == "tpu-compiler"
    assert out["devices"] == devices and out["chips"] == devices and out["devices_per_chip"] == 1
    assert out["mesh"] == {"data": devices, "fsdp": 1, "tensor": 1}
    b = out["bytes_per_device"]
    for key in ("arguments", "outputs", "generated_code", "peak_estimate"):
        assert b[key] > 0, (key, b)
    assert b["temp"] >= 0 and b["alias"] > 0  # the donated state is aliased to the new state
    assert b["peak_estimate"] >= b["arguments"]
    assert 0 < out["est_hbm_bytes_per_chip"] < hbm and out["fits"] is True
    assert out["compile_s"] > 0
    top = out["largest_buffers"]
    assert 1 <= len(top) <= 5 and all(t["bytes"] > 0 and t["shape"] and t["name"] for t in top)
    assert [t["bytes"] for t in top] == sorted((t["bytes"] for t in top), reverse=True)


# ---- compiled by libtpu for v4-32 (v4:2x2x4, 16 chips) and v5litepod-16 (v5e:4x4) ----

@needs_libtpu
@pytest.mark.parametrize("run,devices,hbm", [("tiny-v4", 16, V4_HBM), ("tiny-v5e", 16, V5E_HBM)])
def test_tiny_compiles_and_is_tiny(results, run, devices, hbm):
    out = _ok(results, run)
    _check_compiled(out, devices, hbm)
    assert out["params"] == 147776
    assert out["est_hbm_bytes_per_chip"] < 64 * 2 ** 20  # state ~2 MB + code: tiny
    assert out["compiler_options"] == {"xla_tpu_no_crash_on_oom": True}  # the default, not --fast


@needs_libtpu
@pytest.mark.parametrize("run,devices,hbm,kind", [("base-v4", 16, V4_HBM, "TPU v4"),
                                                   ("base-v5e", 16, V5E_HBM, "TPU v5 lite")])
def test_base_compiles_far_below_hbm(results, run, devices, hbm, kind):
    out = _ok(results, run)
    _check_compiled(out, devices, hbm)
    assert out["device_kind"] == kind
    params = out["params"]
    assert 80e6 < params < 90e6
    # replicated fp32 params + AdamW mu, nu: 12 bytes a parameter on every device
    assert abs(out["bytes_per_device"]["arguments"] - 12 * params) < 0.01 * 12 * params
    assert out["est_hbm_bytes_per_chip"] < 0.1 * hbm
    biggest = out["largest_buffers"][0]
    assert biggest["bytes"] == 768 * 3072 * 4 and sorted(biggest["shape"]) == [768, 3072]
    assert out["est_step_s"] > 0


@needs_libtpu
def test_absurd_model_exceeds_v5e_hbm(results):
    out = _ok(results, "absurd-v5e")
    assert out["preflight"] == "tpu-compiler" and out["devices"] == 4  # the compiler did not give up
    assert out["params"] > 3e9
    assert out["est_hbm_bytes_per_chip"] > V5E_HBM and out["fits"] is False


@needs_libtpu
def test_step_the_compiler_rejects_outright_is_reported_as_not_fitting(results):
    # ~10B params: 116 GB of state a device. Even with OOM suppressed libtpu answers "Invalid TPU program";
    # the pre-flight still says it does not fit (analytic bytes) rather than failing.
    out = _ok(results, "huge-v5e")
    assert out["preflight"] == "analytic" and "Invalid TPU program" in out["compile_error"]
    assert out["est_hbm_bytes_per_chip"] > 100e9 and out["fits"] is False and out["devices"] == 4


@needs_libtpu
def test_multislice_spans_all_slices(results):
    out = _ok(results, "tiny32-v4-2slices")
    assert out["preflight"] == "tpu-compiler" and out["num_slices"] == 2
    assert out["devices"] == 32 and out["chips"] == 32 and out["mesh"]["data"] == 32


@needs_libtpu
def test_per_core_layout_gives_two_devices_per_v4_chip(results):
    out = _ok(results, "tiny32-v4-per-core")
    assert out["devices"] == 32 and out["chips"] == 16 and out["devices_per_chip"] == 2
    assert out["est_hbm_bytes_per_chip"] == 2 * out["bytes_per_device"]["peak_estimate"]


@needs_libtpu
def test_analytic_is_within_3x_of_compiled(results):
    compiled, analytic = _ok(results, "base-v4"), _ok(results, "base-v4-analytic")
    assert analytic["preflight"] == "analytic" and analytic["compile_s"] == 0
    assert analytic["params"] == compiled["params"] and analytic["mesh"] == compiled["mesh"]
    ratio = analytic["est_hbm_bytes_per_chip"] / compiled["est_hbm_bytes_per_chip"]
    assert 1 / 3 < ratio < 3, ratio
    a, c = analytic["bytes_per_device"]["arguments"], compiled["bytes_per_device"]["arguments"]
    assert abs(a - c) < 0.01 * c
    assert analytic["largest_buffers"][0]["bytes"] == compiled["largest_buffers"][0]["bytes"]


def test_analytic_runs_without_the_compiler(results):
    out = _ok(results, "base-v4-analytic")
    assert set(out) >= {"preflight", "compile_s", "devices", "devices_per_chip", "mesh", "bytes_per_device",
                        "est_hbm_bytes_per_chip", "largest_buffers", "params"}
    assert out["est_hbm_bytes_per_chip"] < V4_HBM and out["devices"] == 16


# ---- XLA's cost analysis: the compiled step's FLOPs, the cost model's step time, the MFU it implies ----

def _check_cost(out: dict, peak_per_chip: float):
    """The cost figures hang together: compiled FLOPs = (XLA's + the splash kernel's) x devices, and MFU / HFU =
    model / compiled FLOPs over (the implied step time x the catalog's peak x chips)."""
    assert out["xla_flops_per_device"] > 0 and out["xla_step_s"] > 0 and out["model_flops_per_step"] > 0
    assert out["compiled_flops_per_step"] == pytest.approx(
        (out["xla_flops_per_device"] + out["kernel_flops_per_device"]) * out["devices"])
    assert out["implied_step_s"] >= out["xla_step_s"]
    peak = peak_per_chip * out["chips"]
    assert out["implied_mfu"] == pytest.approx(out["model_flops_per_step"] / (out["implied_step_s"] * peak), abs=1e-4)
    assert out["implied_hfu"] == pytest.approx(out["compiled_flops_per_step"] / (out["implied_step_s"] * peak),
                                               abs=1e-4)
    assert 0 < out["implied_mfu"] < 1 and 0 < out["implied_hfu"] < 1


@needs_libtpu
def test_base_step_flops_are_the_model_flops_and_attention_runs_the_splash_kernel(results):
    out = _ok(results, "base-v4")
    _check_cost(out, 275e12)
    # model.attention=auto on a TPU mesh: the Pallas splash kernel lowered to Mosaic custom calls, three a layer
    # (forward, dq, dkv); XLA counts them as zero FLOPs, so the kernel's causal FLOPs are added: 1 row a device
    assert out["attention"] == "splash" and out["mosaic_custom_calls"] == 3 * 12
    assert out["kernel_flops_per_device"] == 2 * 1 * 256 * 256 * 12 * 64 * 12 * 3
    # XLA counts norms, softmax, the loss and AdamW too: a few % over 6N x tokens + causal attention
    assert 1.0 < out["compiled_flops_per_step"] / out["model_flops_per_step"] < 1.1
    assert "xla_loop_counted_once" not in out  # nothing scanned


@needs_libtpu
def test_attention_auto_is_xla_where_the_kernel_cannot_run(results):
    out = _ok(results, "tiny-v4")  # seq_len 64: not a multiple of the kernel's 128 block
    assert out["attention"] == "xla" and out["mosaic_custom_calls"] == 0 and out["kernel_flops_per_device"] == 0
    _check_cost(out, 275e12)


@needs_libtpu
def test_scanned_step_flops_count_every_layer(results):
    """XLA counts a while loop's body once; the pre-flight measures one layer with a second, scan-unrolled compile
    and counts all four. The corrected FLOPs are the unscanned step's, within the loop's own bookkeeping."""
    loop, scan = _ok(results, "tiny4-v4"), _ok(results, "tiny4-scan-v4")
    once = scan["xla_loop_counted_once"]
    assert once["layers"] == 4 and once["unrolled_compile_s"] > 0
    assert once["flops_per_device"] < 0.5 * scan["xla_flops_per_device"]
    assert once["step_s"] < scan["xla_step_s"]
    assert abs(scan["xla_flops_per_device"] / loop["xla_flops_per_device"] - 1) < 0.05
    assert "xla_loop_counted_once" not in loop


@needs_libtpu
@pytest.mark.parametrize("run,hbm,peak,kind", [("1b-v5p", V5P_HBM, 459e12, "TPU v5"),
                                               ("1b-b64-v6e", V6E_HBM, 918e12, "TPU v6 lite")])
def test_1b_compiles_with_remat_and_splash_and_fits(results, run, hbm, peak, kind):
    out = _ok(results, run)
    _check_compiled(out, 16, hbm)  # v5p-32 / v6e-16: 16 chips, fits
    assert out["device_kind"] == kind
    assert out["params"] == 1_008_289_792  # d_model 2048, 20 layers, d_ff 8192, vocab 384
    assert out["attention"] == "splash" and out["mosaic_custom_calls"] > 0  # the kernel lowered for the TPU
    assert out["xla_loop_counted_once"]["layers"] == 20
    _check_cost(out, peak)
    # full remat recomputes each block's forward (but the matmuls whose outputs the backward pass never reads):
    # more compiled FLOPs than model FLOPs, less than 8N x tokens
    assert 1.1 < out["compiled_flops_per_step"] / out["model_flops_per_step"] < 8 / 6 + 0.05


@needs_libtpu
def test_1b_fits_v6e_only_with_remat(results):
    full, none = _ok(results, "1b-b64-v6e"), _ok(results, "1b-b64-no-remat-v6e")
    assert full["fits"] is True and full["est_hbm_bytes_per_chip"] < V6E_HBM
    assert none["fits"] is False and none["est_hbm_bytes_per_chip"] > V6E_HBM
    b_full, b_none = full["bytes_per_device"], none["bytes_per_device"]
    assert abs(b_full["arguments"] - b_none["arguments"]) < 0.01 * b_full["arguments"]  # the same train state
    # activations dominate without remat (~38 GB of temporaries a chip beside 12 GB of state); remat cuts them ~5x
    assert b_none["temp"] > 2 * b_none["arguments"] and b_none["temp"] > 3 * b_full["temp"]
    # a step that does not fit gets no loop-corrected cost (its second compile is skipped)
    assert none["xla_step_s"] is None and none["implied_mfu"] is None and "does not fit" in none["xla_cost_note"]


@needs_libtpu
@pytest.mark.parametrize("run,words", [("bad-topology", "v4:2x2x2x2"), ("bad-generation", "v9:2x2"),
                                       ("bad-mesh", "batch_size=16"),
                                       ("bad-splash", "model.attention=splash: seq_len 64 is not a multiple of 128")])
def test_bad_input_is_a_one_line_error(results, run, words):
    proc = results[run]
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preflight: error: ") and words in lines[0], proc.stderr


# ---- in-process, no jax ----

def test_parse_topology():
    assert parse_topology("v4:2x2x4") == ("v4", 16)
    assert parse_topology("v5e:4x4") == ("v5e", 16)
    with pytest.raises(PreflightError, match="v4-32"):
        parse_topology("v4-32")


def test_estimate_step_time_counts_6nd_plus_causal_attention():
    cfg = OmegaConf.create({"trainer": {"batch_size": 16}, "model": {"seq_len": 256, "d_model": 768,
                                                                      "n_heads": 12, "n_layers": 12}})
    tokens = 16 * 256
    attention = 12 * 16 * 256 * 256 * 768 * 6  # 4 b s^2 h d per layer, x3 fwd+bwd, /2 causal
    t = estimate_step_time(cfg, 85_000_000, 16, 275e12, mfu=0.5)
    assert t == pytest.approx((6 * 85_000_000 * tokens + attention) / (275e12 * 16 * 0.5))
    assert estimate_step_time(cfg, 85_000_000, 32, 275e12) == pytest.approx(
        estimate_step_time(cfg, 85_000_000, 16, 275e12) / 2)


def test_topology_without_the_chip_figures_is_one_error_line(tmp_path):
    path = str(tmp_path / "c.yaml")
    OmegaConf.save(compose_config(["model=tiny"]), path)
    proc = subprocess.run([sys.executable, "-m", "trainer.preflight", "--config", path, "--topology", "v4:2x2x1",
                           "--analytic"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["preflight: error: --topology needs --hbm-bytes-per-chip and "
                                                "--peak-flops-per-chip (the launcher passes the catalog's values)"]
