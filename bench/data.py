"""Data benchmark: the trainer's loader on gs:// with 50 ms added to every GCS request, next to the trainer it feeds.

The data is the embedded corpus (trainer/data/corpus.py's prepare_stdlib, as the GCS tests prepare it) written to
the tests' GCS emulator (tests/gcs_emulator.py, served from a child process by bench/_gcs.py). The loader is the
trainer's BatchStream (trainer/data/stream.py: ranged reads through trainer/data/storage.py and its retry policy,
concurrent for one batch, `--prefetch` batches ahead in a thread, as data.prefetch). Its requests go through the
tests' proxy (tests/gcs_fault_proxy.py, no faults) with `latency_s` = `--latency-ms` (default 50: a distant
bucket) and, for comparison, with none (the same proxy hop, 0 ms added).

The consumer is a simulated trainer: the real jitted train step (trainer/step.py on trainer/state.py's state) of
model=small (d_model 128, 3 layers, seq 128) at the config's batch 16 on 1 CPU device, fed like trainer/loop.py
feeds it (next(stream), to a global array, step), except that it waits for each step to finish before it asks
for the next batch, so that the time spent in next(stream) is time the device would sit idle for want of data
(trainer/loop.py dispatches steps asynchronously: its data_wait_s also counts time in next(stream) while the
device is still busy with the step before). With `--compute sleep` it sleeps for the step time instead (no CPU
taken from the loader). Each round, per latency:

  - loader alone: batches pulled as fast as it gives them, no consumer -> loader tokens/s;
  - the trainer's consumption: the step on a fixed batch, no data -> step time, tokens/s it can consume;
  - the trainer fed by the loader: share of its wall time spent waiting in next(stream).

The figures: wait share (0 = the loader keeps up), and loader tokens/s over the trainer's consumption tokens/s
(>= 1: it can keep up). The latencies alternate (order flipped every round), and so do loader and trainer runs;
medians over `--rounds`. Ends with one JSON line. Speed goals live here; the tests never assert wall-clock times.

    python bench/data.py                       # 3 rounds, 40 timed steps per run (~4 min here)
    python bench/data.py --quick               # smoke: 1 round, 12 steps (~30 s)
    python bench/data.py --compute sleep --step-time 0.05
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bench._gcs import GCSServer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-ms", type=float, default=50.0, help="added to every GCS request (also run with 0)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="timed steps (batches) per run, after one warm-up")
    p.add_argument("--compute", choices=("jit", "sleep"), default="jit",
                   help="the consumer's step: the real jitted train step, or a sleep of --step-time")
    p.add_argument("--step-time", type=float, default=None,
                   help="with --compute sleep: seconds per step (default: the jitted step's, measured here)")
    p.add_argument("--batch", type=int, default=16, help="global batch (trainer.batch_size)")
    p.add_argument("--prefetch", type=int, default=2, help="data.prefetch")
    p.add_argument("--max-bytes", type=int, default=1_500_000, help="corpus bytes prepared (as the GCS tests)")
    p.add_argument("--quick", action="store_true", help="smoke: --rounds 1 --steps 12")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.steps = 1, 12

    import jax
    import numpy as np
    from omegaconf import OmegaConf

    from trainer.data.corpus import prepare_stdlib
    from trainer.data.stream import BatchStream
    from trainer.model import ModelSpec, TransformerLM
    from trainer.optim import make_optimizer
    from trainer.sharding import batch_sharding, make_mesh
    from trainer.state import create_state
    from trainer.step import make_train_step

    m = OmegaConf.load(os.path.join(ROOT, "conf", "model", "small.yaml"))
    spec = ModelSpec(vocab_size=int(m.vocab_size), d_model=int(m.d_model), n_layers=int(m.n_layers),
                     n_heads=int(m.n_heads), d_ff=int(m.d_ff), max_seq_len=int(m.max_seq_len),
                     positions=str(m.positions), dtype=str(m.dtype))
    seq = int(m.seq_len)
    model = TransformerLM(spec)
    tx, schedule = make_optimizer(OmegaConf.load(os.path.join(ROOT, "conf", "optimizer", "adamw.yaml")), 10_000)
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    sharding = batch_sharding(mesh)
    state, shardings = create_state(model, tx, mesh, seq, seed=0)
    train_step = make_train_step(model, tx, schedule, mesh, shardings)
    tokens_per_step = a.batch * seq

    def to_global(local):  # as trainer/loop.py's _global
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v, np.int32), (a.batch, seq))
                for k, v in local.items()}

    rows = np.random.default_rng(0).integers(0, spec.vocab_size, (a.batch, seq + 1), dtype=np.int32)
    fixed = to_global({"inputs": rows[:, :-1], "targets": rows[:, 1:]})
    state, metrics = train_step(state, fixed)  # compile
    float(metrics["loss"])

    def step(state, batch):
        """One step, finished before it returns: the time in next(stream) after it is time the device would
        sit idle for want of data (trainer/loop.py does not wait for each step, so its data_wait_s also counts
        time in next(stream) while the device still computes the step before)."""
        if a.compute == "sleep":
            time.sleep(a.step_time)
            return state, None
        state, metrics = train_step(state, batch)
        metrics["loss"].block_until_ready()
        return state, metrics

    def compute_only(state):
        """Seconds per step on a fixed batch, no data: what the trainer can consume."""
        state, _ = step(state, fixed)  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, _ = step(state, fixed)
        return state, (time.perf_counter() - t0) / a.steps

    if a.compute == "sleep" and a.step_time is None:
        a.compute = "jit"
        state, a.step_time = compute_only(state)
        a.compute = "sleep"
    latencies = [0.0, a.latency_ms / 1000.0]

    gcs = GCSServer(latencies=latencies).start()
    try:
        data = f"gs://{gcs.bucket}/data/stdlib"
        t0 = time.perf_counter()
        manifest = prepare_stdlib(data, max_bytes=a.max_bytes)
        n_records = sum(s["records"] for s in manifest["splits"]["train"]["shards"])
        print(f"data: {n_records} train records of {manifest['record_len']} tokens in "
              f"{len(manifest['splits']['train']['shards'])} shards on the emulator "
              f"({time.perf_counter() - t0:.1f} s to prepare); model=small, batch {a.batch}, seq {seq}, "
              f"compute={a.compute}", flush=True)

        def open_stream(latency, seed):
            gcs.use(gcs.proxies[latency])
            return BatchStream(data, "train", a.batch, seq, 0, 1, seed, prefetch=a.prefetch)

        def loader_alone(latency, seed):
            with open_stream(latency, seed) as stream:
                next(stream)  # warm-up: the first batch has no head start
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    next(stream)
                seconds = time.perf_counter() - t0
                reads = stream.stats["reads"] / (a.steps + 1)
            return a.steps * tokens_per_step / seconds, reads

        def fed(state, latency, seed):
            """The trainer loop fed by the loader: (state, wait share, seconds per step)."""
            with open_stream(latency, seed) as stream:
                state, _ = step(state, to_global(next(stream)))  # warm-up
                wait = 0.0
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    t_data = time.perf_counter()
                    batch = to_global(next(stream))
                    wait += time.perf_counter() - t_data
                    state, _ = step(state, batch)
                seconds = time.perf_counter() - t0
            return state, wait / seconds, seconds / a.steps

        res = {lat: {"loader_tps": [], "consume_tps": [], "wait_share": [], "fed_step_s": [], "step_s": [],
                     "reads_per_batch": []} for lat in latencies}
        for r in range(a.rounds):
            for i, lat in enumerate(latencies if r % 2 == 0 else latencies[::-1]):
                seed = 1000 * r + i
                out = res[lat]
                for side in (("loader", "trainer") if (r + i) % 2 == 0 else ("trainer", "loader")):
                    if side == "loader":
                        tps, reads = loader_alone(lat, seed)
                        out["loader_tps"].append(tps)
                        out["reads_per_batch"].append(reads)
                    else:
                        state, step_s = compute_only(state)
                        out["step_s"].append(step_s)
                        out["consume_tps"].append(tokens_per_step / step_s)
                        state, share, fed_s = fed(state, lat, seed + 500)
                        out["wait_share"].append(share)
                        out["fed_step_s"].append(fed_s)
                print(f"round {r + 1}, +{lat * 1000:.0f} ms: loader alone {out['loader_tps'][-1]:.0f} tok/s "
                      f"({out['reads_per_batch'][-1]:.1f} reads/batch) | trainer consumes "
                      f"{out['consume_tps'][-1]:.0f} tok/s (step {out['step_s'][-1]:.3f} s); fed by the loader: "
                      f"step {out['fed_step_s'][-1]:.3f} s, {out['wait_share'][-1]:.1%} waiting for data",
                      flush=True)
    finally:
        gcs.stop()

    result = {"bench": "data", "time": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
              "model": "small", "batch": a.batch, "seq": seq, "prefetch": a.prefetch, "compute": a.compute,
              "step_time_s": round(a.step_time, 4) if a.compute == "sleep" else None, "steps": a.steps,
              "rounds": a.rounds, "latency": {}}
    for lat, out in res.items():
        med = {k: statistics.median(v) for k, v in out.items()}
        key = f"{lat * 1000:.0f}ms"
        result["latency"][key] = {
            "wait_share": round(med["wait_share"], 4), "loader_tokens_per_s": round(med["loader_tps"]),
            "trainer_tokens_per_s": round(med["consume_tps"]),
            "loader_over_trainer": round(med["loader_tps"] / med["consume_tps"], 3),
            "step_s": round(med["step_s"], 4), "fed_step_s": round(med["fed_step_s"], 4),
            "fed_over_step": round(med["fed_step_s"] / med["step_s"], 3),
            "reads_per_batch": round(med["reads_per_batch"], 1),
            "each": {k: [round(x, 4) for x in v] for k, v in out.items()}}
        print(f"+{key}: {med['wait_share']:.1%} of the fed trainer's time waiting for data; loader "
              f"{med['loader_tps']:.0f} tok/s / trainer {med['consume_tps']:.0f} tok/s = "
              f"{med['loader_tps'] / med['consume_tps']:.2f}", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
