"""MFU: the model-FLOPs formula against a hand count, the machine peak measured once and cached, and the MFU of a
real pod run's step records and summary."""
import json
import os

import jax
import pytest
from omegaconf import OmegaConf

from launcher.mfu import launch_mfu, local_peak_flops
from podutil import read_json, read_jsonl
from trainer import peak
from trainer.flops import flops_per_step, lookup_params, matmul_params, mfu
from trainer.model import ModelSpec, TransformerLM

HAND = ModelSpec(vocab_size=10, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=32)


def test_flops_per_step_is_the_hand_count():
    # per layer: q, k, v 3 x 8 x 8 = 192; out 8 x 8 = 64; mlp 2 x 8 x 16 = 256; two norms 16  -> 528
    # 2 layers 1056, final norm 8, lm_head 8 x 10 = 80                                          -> N = 1144
    assert matmul_params(HAND) == 1144
    assert lookup_params(HAND) == 80  # the token embedding, 10 x 8; rotary positions have no table
    # batch 2 x seq 4 = 8 tokens: 6 x 1144 x 8 = 54912; causal attention, half of 12 x L x T x d_attn per token:
    # 6 x 2 x 4 x 8 = 384 per token, 3072 for 8                                                 -> 57984
    assert flops_per_step(HAND, batch=2, seq_len=4) == 57984.0
    learned = ModelSpec(**{**HAND.__dict__, "positions": "learned"})
    assert lookup_params(learned) == 80 + 32 * 8 and matmul_params(learned) == 1144


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_counted_and_left_out_parameters_are_all_of_the_model(positions):
    spec = ModelSpec(**{**HAND.__dict__, "positions": positions})
    params = TransformerLM(spec).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 4), jax.numpy.int32))["params"]
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == matmul_params(spec) + lookup_params(spec)


def test_mfu_is_flops_over_time_times_peak():
    assert mfu(1e12, 2.0, 1e13) == pytest.approx(0.05)
    assert mfu(1e12, 2.0, None) is None
    records = [{"step": 1, "mfu": 0.001, "includes_compile": True, "time": 10},
               {"step": 2, "mfu": 0.2, "time": 11}, {"step": 4, "mfu": 0.4, "time": 12},
               {"split": "val", "step": 4, "time": 12}, {"step": 2, "mfu": 0.9, "time": 5}]  # an earlier launch
    assert launch_mfu(records, since=10) == pytest.approx(0.3)
    assert launch_mfu(records, since=100) is None


def test_machine_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(tmp_path))
    assert peak.cached() is None
    measured = local_peak_flops()  # python -m trainer.peak in a subprocess: a real matmul
    assert measured > 1e8  # any CPU of this century multiplies float32 faster than 0.1 GFLOP/s
    key = peak.machine_key()
    path = peak.cache_file(key)
    assert os.path.dirname(path) == str(tmp_path / "peak")
    entry = read_json(path)
    assert entry["key"] == key and entry["peak_flops"] == measured
    # the second call reads the cache: it returns what the cache says, not a new measurement
    with open(path, "w") as f:
        json.dump(dict(entry, peak_flops=12345.0), f)
    assert local_peak_flops() == 12345.0
    # another jax version (or CPU, or core count) is another machine
    assert peak.cache_file(dict(key, jax="0.0.1")) != path and peak.cache_file(dict(key, cpus=999)) != path


def test_a_pod_runs_step_records_carry_mfu(trained_run):
    cfg = OmegaConf.load(os.path.join(trained_run, "config.yaml"))
    summary = read_json(os.path.join(trained_run, "summary.json"))
    steps = [r for r in read_jsonl(os.path.join(trained_run, "metrics.jsonl")) if "split" not in r]
    assert steps and all("mfu" in r for r in steps)
    # the local pod's peak is this machine's, measured once for the session (the run's launcher cached it)
    assert summary["peak_flops"] == peak.cached()["peak_flops"]
    step_flops = flops_per_step(ModelSpec.from_config(cfg.model), cfg.trainer.batch_size, cfg.model.seq_len)
    for r in steps:
        assert 0 < r["mfu"] <= 1, r
        assert r["mfu"] == pytest.approx(step_flops / (r["step_time_s"] * summary["peak_flops"]), rel=1e-9)
    steady = [r["mfu"] for r in steps if not r.get("includes_compile")]
    assert len(steady) < len(steps) and summary["mfu"] == pytest.approx(sum(steady) / len(steady))
