"""Checkpoint benchmark: what an async save costs the training loop, and restore throughput next to a raw read.

Everything is the trainer's own code on 1 CPU device: the train state of trainer/state.py's create_state (params
and AdamW state of a TransformerLM, default d_model 512, 6 layers, d_ff 2048: ~19M params, ~230 MB with Adam),
trainer/step.py's jitted train step, and trainer/checkpoint.py's Checkpointer (orbax, async saves). Two
targets: a local directory and `gs://` on the tests' GCS emulator (tests/gcs_emulator.py, served from a child
process by bench/_gcs.py; `checkpoint.ocdbt=false` there, as the GCS tests run it).

(a) Save: each round runs a few train steps (timed: the step time), then `Checkpointer.save`, whose return is the
    seconds the main thread was blocked (orbax copies the arrays off the device, then writes in the background),
    then waits for the background write to finish (`background_s`: save start -> written and verified). The
    figure is blocking / (checkpoint.every x step time): the share of the compute between two saves that a save
    takes from the loop (`--every`, default the config's 100). `background_s` over that interval says whether a
    save finishes before the next one would have to wait for it.
(b) Restore: a fresh Checkpointer's `restore_latest` into the trainer's abstract state (arrays ready), over a raw
    read of the same bytes: every file of the step directory read locally, or every object of it downloaded with
    google-cloud-storage (`--raw-threads` concurrent downloads, default 8). Throughput = bytes of the step
    directory / seconds; the figure is restore throughput / raw throughput (1.0: restore is as fast as reading).
    Locally both read from the page cache (the checkpoint was just written).

The targets alternate (order flipped every round), and so do restore and raw read; medians over `--rounds`.
Ends with one JSON line. Speed goals live here; the tests never assert wall-clock times.

    python bench/checkpoint.py                  # 2 rounds x 2 saves, local and gs:// (~6 min here)
    python bench/checkpoint.py --quick          # smoke: d_model 256, 4 layers, 1 round of 1 save (~1 min)
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bench._gcs import GCSServer  # noqa: E402


def _size_and_files(path: str):
    """[(name, size)] of every file (object) under `path`."""
    if path.startswith("gs://"):
        from trainer.data.storage import gcs_client

        bucket, _, prefix = path[len("gs://"):].partition("/")
        return [(b.name, int(b.size)) for b in gcs_client().list_blobs(bucket, prefix=prefix.rstrip("/") + "/")]
    out = []
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            out.append((full, os.path.getsize(full)))
    return out


def raw_read(path: str, threads: int) -> float:
    """Seconds to read every byte under `path` (local files, or gs:// objects with google-cloud-storage)."""
    files = _size_and_files(path)
    t0 = time.perf_counter()
    if path.startswith("gs://"):
        from trainer.data.storage import gcs_client

        bucket = gcs_client().bucket(path[len("gs://"):].partition("/")[0])

        def fetch(item):
            return len(bucket.blob(item[0]).download_as_bytes())

        with ThreadPoolExecutor(max(1, threads)) as pool:
            got = sum(pool.map(fetch, files))
    else:
        got = 0
        for name, _ in files:
            with open(name, "rb") as f:
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    got += len(chunk)
    seconds = time.perf_counter() - t0
    assert got == sum(size for _, size in files), (got, path)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="local,gcs", help="local and/or gcs (gs:// on the emulator)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (each: a fresh checkpoint dir)")
    p.add_argument("--saves", type=int, default=2, help="saves per round and target (the first one counts too)")
    p.add_argument("--steps-between", type=int, default=2, help="train steps run (and timed) before each save")
    p.add_argument("--every", type=int, default=100, help="checkpoint.every: steps of compute between two saves")
    p.add_argument("--raw-threads", type=int, default=8, help="concurrent downloads of the raw gs:// read")
    p.add_argument("--gcs-ocdbt", action="store_true",
                   help="gs:// in the OCDBT format (the trainer's default; locally it is always on) instead of "
                        "checkpoint.ocdbt=false, as the GCS tests run the emulator")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench"))
    p.add_argument("--quick", action="store_true", help="smoke: --d-model 256 --layers 4 --rounds 1 --saves 1")
    a = p.parse_args(argv)
    if a.quick:
        a.d_model, a.layers, a.rounds, a.saves = 256, 4, 1, 1
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if not set(targets) <= {"local", "gcs"}:
        raise SystemExit(f"--targets: local and/or gcs, not {a.targets}")

    import jax
    import numpy as np
    from omegaconf import OmegaConf

    from trainer.checkpoint import Checkpointer
    from trainer.model import ModelSpec, TransformerLM
    from trainer.optim import make_optimizer
    from trainer.sharding import batch_sharding, make_mesh
    from trainer.state import abstract_state, count_params, create_state
    from trainer.step import make_train_step

    spec = ModelSpec(vocab_size=384, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, d_ff=4 * a.d_model,
                     max_seq_len=a.seq)
    model = TransformerLM(spec)
    tx, schedule = make_optimizer(OmegaConf.load(os.path.join(ROOT, "conf", "optimizer", "adamw.yaml")), 10_000)
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    state, shardings = create_state(model, tx, mesh, a.seq, seed=0)
    target = abstract_state(model, tx, mesh, a.seq, shardings)
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    train_step = make_train_step(model, tx, schedule, mesh, shardings)
    tokens = np.random.default_rng(0).integers(0, spec.vocab_size, (a.batch, a.seq + 1), dtype=np.int32)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, batch_sharding(mesh))
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch)
    float(metrics["loss"])
    print(f"model: {count_params(state['params']) / 1e6:.1f}M params, train state {state_bytes / 1e6:.0f} MB; "
          f"compile + first step {time.perf_counter() - t0:.1f} s", flush=True)

    step_times = []

    def run_steps(state, n):
        t0 = time.perf_counter()
        for _ in range(n):
            state, metrics = train_step(state, batch)
        float(metrics["loss"])
        step_times.append((time.perf_counter() - t0) / n)
        return state

    os.makedirs(a.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="checkpoint-", dir=a.workdir)
    gcs = GCSServer().start() if "gcs" in targets else None
    results = {t: {"blocking_s": [], "background_s": [], "restore_s": [], "raw_s": [], "bytes": []}
               for t in targets}
    try:
        for r in range(a.rounds):
            for target_name in (targets if r % 2 == 0 else targets[::-1]):
                res = results[target_name]
                if target_name == "gcs":
                    directory, ocdbt = f"gs://{gcs.bucket}/bench-ckpt-{r}", a.gcs_ocdbt
                else:
                    directory, ocdbt = os.path.join(work, f"ckpt-{r}"), True
                ckpt = Checkpointer(directory, keep=2, async_save=True, ocdbt=ocdbt)
                step = 0
                for _ in range(a.saves):
                    state = run_steps(state, a.steps_between)
                    step += a.steps_between
                    t0 = time.perf_counter()
                    blocked = ckpt.save(step, state, {"samples_seen": step * a.batch, "seed": 0})
                    ckpt.wait()
                    res["blocking_s"].append(blocked)
                    res["background_s"].append(time.perf_counter() - t0)
                ckpt.close()
                step_dir = f"{directory}/{step}"
                nbytes = sum(size for _, size in _size_and_files(step_dir))
                res["bytes"].append(nbytes)
                for side in (("restore", "raw") if r % 2 == 0 else ("raw", "restore")):
                    if side == "raw":
                        res["raw_s"].append(raw_read(step_dir, a.raw_threads))
                        continue
                    restorer = Checkpointer(directory, keep=2, async_save=True, ocdbt=ocdbt)
                    t0 = time.perf_counter()
                    got_step, restored, _ = restorer.restore_latest(target)
                    jax.block_until_ready(restored)
                    res["restore_s"].append(time.perf_counter() - t0)
                    restorer.close()
                    assert got_step == step, (got_step, step)
                    del restored
                print(f"round {r + 1} {target_name}: save blocks {res['blocking_s'][-1]:.3f} s (background "
                      f"{res['background_s'][-1]:.2f} s) | restore {res['restore_s'][-1]:.2f} s, raw read "
                      f"{res['raw_s'][-1]:.2f} s of {nbytes / 1e6:.0f} MB | step {step_times[-1]:.3f} s",
                      flush=True)
                if target_name == "gcs":
                    gcs.wipe()
                else:
                    shutil.rmtree(directory, ignore_errors=True)
    finally:
        if gcs is not None:
            gcs.stop()
        shutil.rmtree(work, ignore_errors=True)

    step_time = statistics.median(step_times)
    interval = a.every * step_time
    out = {"bench": "checkpoint", "time": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
           "model": {"d_model": a.d_model, "layers": a.layers, "heads": a.heads, "seq": a.seq, "batch": a.batch,
                     "params": count_params(state["params"]), "state_bytes": state_bytes},
           "step_time_s": round(step_time, 4), "every": a.every, "interval_s": round(interval, 2),
           "rounds": a.rounds, "saves_per_round": a.saves, "gcs_ocdbt": a.gcs_ocdbt, "targets": {}}
    for name, res in results.items():
        med = {k: statistics.median(v) for k, v in res.items()}
        restore_bps, raw_bps = med["bytes"] / med["restore_s"], med["bytes"] / med["raw_s"]
        out["targets"][name] = {
            "blocking_s": round(med["blocking_s"], 4), "blocking_over_interval": round(med["blocking_s"] / interval, 5),
            "background_s": round(med["background_s"], 3),
            "background_over_interval": round(med["background_s"] / interval, 4),
            "checkpoint_bytes": int(med["bytes"]), "restore_s": round(med["restore_s"], 3),
            "raw_read_s": round(med["raw_s"], 3), "restore_MBps": round(restore_bps / 1e6, 1),
            "raw_read_MBps": round(raw_bps / 1e6, 1), "restore_over_raw": round(restore_bps / raw_bps, 3),
            "each": {k: [round(x, 4) for x in v] for k, v in res.items() if k != "bytes"}}
        print(f"{name}: a save blocks the loop {med['blocking_s']:.3f} s = {med['blocking_s'] / interval:.2%} of "
              f"the {interval:.0f} s between saves (every {a.every} x {step_time:.3f} s); restore "
              f"{restore_bps / 1e6:.0f} MB/s vs raw read {raw_bps / 1e6:.0f} MB/s = {restore_bps / raw_bps:.2f}",
              flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
