"""Step benchmark: the trainer's steady step time next to a bare jitted step of the same model, and both MFUs.

Side A is the real CLI (`python -m launcher`) on a local pod: its step time is read from the run's
`metrics.jsonl` (the step records past the first, which includes compilation; eval and checkpoint saves are not
step time there). Side B is a minimal bare-JAX program in its own process: the same TransformerLM and the same
AdamW (trainer/optim.py), one `jax.jit` train step with the batch sharded over the same number of devices, random
tokens, timed over the same number of steps after a warm-up. The sides alternate, `--rounds` times each; the
medians are compared (`ratio`), and so is each round's pair, run back to back (`paired_ratio`, the median of the
rounds' own ratios: blind to the machine's drift between rounds). MFU is model FLOPs per step (trainer/flops.py: 6 x params x tokens + causal attention at
half) over step time x the peak FLOP/s of a jitted float32 matmul measured in this run (trainer/peak.py's measure:
the machine's peak, as launcher/mfu.py takes it for a local pod).

Two layouts: `1x1` (one host, one device; bare: one device) and `2x2` (two hosts x two devices; bare: one process
with four devices). Model (default: d_model 512, 4 layers, 8 heads, d_ff 2048, seq 256, batch 8) and steps are
flags. Ends with one JSON line. Speed goals live here; the tests never assert wall-clock times.

    python bench/step.py                    # 1x1 and 2x2, 2 rounds of 12 timed steps (~8 min here)
    python bench/step.py --layouts 1x1 --rounds 1 --steps 6   # smoke
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _quiet import wait_until_quiet  # noqa: E402 - bench/_quiet.py, next to this file

BARE = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args['devices']}"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from omegaconf import OmegaConf
from trainer.model import ModelSpec, TransformerLM
from trainer.optim import make_optimizer

cfg = OmegaConf.load(args["config"])
spec = ModelSpec.from_config(cfg.model)
model = TransformerLM(spec)
tx, _ = make_optimizer(cfg.optimizer, int(cfg.trainer.steps))
mesh = Mesh(np.array(jax.devices()), ("data",))
rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", None))
params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, spec.max_seq_len), jnp.int32))["params"]),
                 out_shardings=rep)(jax.random.key(0))
opt_state = jax.jit(tx.init, out_shardings=rep)(params)

def step(params, opt_state, tokens):
    def loss_fn(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

step = jax.jit(step, donate_argnums=(0, 1))
batch, seq = int(cfg.trainer.batch_size), int(cfg.model.seq_len)
tokens = jax.device_put(np.random.default_rng(0).integers(0, spec.vocab_size, (batch, seq + 1), dtype=np.int32), rows)
for _ in range(2):  # compile + warm-up
    params, opt_state, loss = step(params, opt_state, tokens)
loss.block_until_ready()
t0 = time.perf_counter()
for _ in range(args["steps"]):
    params, opt_state, loss = step(params, opt_state, tokens)
float(loss)
print(json.dumps({"step_time_s": (time.perf_counter() - t0) / args["steps"]}))
'''

# The machine's peak, as launcher/mfu.py takes it for a local pod: one jitted matmul on one CPU device (XLA runs it
# on every core); a pod's hosts and devices share those cores, so their total peak is the same whatever the layout.
PEAK = "import json; from trainer.peak import measure; print(json.dumps({'peak_flops': measure()}))"


def _env() -> Dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + os.environ["PYTHONPATH"]
                                                if os.environ.get("PYTHONPATH") else ""), "JAX_PLATFORMS": "cpu"}


def _overrides(a, hosts: int, devices: int, run_dir: str) -> List[str]:
    steps = 1 + a.steps  # two step records: step 1 (includes compilation), then one over the a.steps timed steps
    return [f"run.name=bench-step-{hosts}x{devices}", f"run.dir={run_dir}", "+cluster=local",
            f"cluster.hosts={hosts}", f"cluster.devices_per_host={devices}", "model=tiny",
            f"model.d_model={a.d_model}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}",
            f"model.d_ff={4 * a.d_model}", f"model.seq_len={a.seq}", f"model.max_seq_len={a.seq}",
            f"trainer.batch_size={a.batch}", f"trainer.steps={steps}", f"trainer.log_every={steps}",
            "trainer.eval_every=0", "trainer.eval_batches=1", f"checkpoint.every={steps}",
            "checkpoint.async_save=true", *a.set]


def trainer_side(a, hosts: int, devices: int, workdir: str) -> Dict[str, float]:
    run_dir = tempfile.mkdtemp(prefix=f"step-{hosts}x{devices}-", dir=workdir)
    argv = [sys.executable, "-m", "launcher", *_overrides(a, hosts, devices, run_dir)]
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"the launcher failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if "step_time_s" in r and not r.get("includes_compile")]
    if not steps:
        raise SystemExit(f"no timed step record in {run_dir}/metrics.jsonl")
    return {"step_time_s": steps[-1]["step_time_s"], "data_wait_s": steps[-1].get("data_wait_s", 0.0),
            "config": os.path.join(run_dir, "config.yaml")}


def bare_side(a, devices: int, config: str) -> float:
    payload = json.dumps({"devices": devices, "steps": a.steps, "config": config})
    proc = subprocess.run([sys.executable, "-c", BARE, payload], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"the bare step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["step_time_s"]


def peak_flops() -> float:
    proc = subprocess.run([sys.executable, "-c", PEAK], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_flops"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="1x1,2x2", help="HOSTSxDEVICES,... (bare side: one process, H*D devices)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides per layout")
    p.add_argument("--steps", type=int, default=12, help="timed steps per run (after compile and warm-up)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--set", action="append", default=[], help="another launcher override, KEY=VALUE")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench"))
    a = p.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)

    from omegaconf import OmegaConf
    from trainer.flops import flops_per_step
    from trainer.model import ModelSpec

    out = {"bench": "step", "time": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
           "model": {"d_model": a.d_model, "layers": a.layers, "heads": a.heads, "seq": a.seq, "batch": a.batch},
           "layouts": {}}
    for layout in a.layouts.split(","):
        hosts, devices = (int(x) for x in layout.split("x"))
        ours, bare, waits = [], [], []
        for r in range(a.rounds):
            wait_until_quiet()
            t = trainer_side(a, hosts, devices, a.workdir)
            ours.append(t["step_time_s"])
            waits.append(t["data_wait_s"])
            wait_until_quiet()  # the local pod's Ray processes may still be exiting: not the bare step's time
            bare.append(bare_side(a, hosts * devices, t["config"]))
            print(f"{layout} round {r + 1}: trainer {ours[-1]:.4f} s/step (data wait {waits[-1]:.4f}) | "
                  f"bare jit {bare[-1]:.4f} s/step", flush=True)
        spec = ModelSpec.from_config(OmegaConf.load(t["config"]).model)
        flops = flops_per_step(spec, a.batch, a.seq)
        peak = peak_flops()
        o, b = statistics.median(ours), statistics.median(bare)
        out["layouts"][layout] = {
            "trainer_step_s": round(o, 4), "bare_step_s": round(b, 4), "ratio": round(o / b, 4),
            # each round's sides run back to back: their ratio is blind to the machine's drift between rounds
            "round_ratios": [round(x / y, 4) for x, y in zip(ours, bare)],
            "paired_ratio": round(statistics.median(x / y for x, y in zip(ours, bare)), 4),
            "trainer_data_wait_s": round(statistics.median(waits), 5),
            "model_flops_per_step": flops, "peak_flops": peak,
            "trainer_mfu": round(flops / o / peak, 4), "bare_mfu": round(flops / b / peak, 4),
            "each": {"trainer": [round(x, 4) for x in ours], "bare": [round(x, 4) for x in bare]}}
        print(f"{layout}: trainer / bare = {o / b:.3f} (median of the rounds' own ratios "
              f"{statistics.median(x / y for x, y in zip(ours, bare)):.3f}) | MFU trainer {flops / o / peak:.1%}, "
              f"bare {flops / b / peak:.1%} (this machine's matmul peak {peak / 1e9:.1f} GFLOP/s)",
              flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
