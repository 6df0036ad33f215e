"""The reference side of bench/launch.py and bench/recovery_vs.py: Ray Train's `JaxTrainer` on fake TPU hosts.

One whole command, `python bench/jaxtrainer.py SPEC.json`, started by a bench as a subprocess: it brings up a real
Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head with no CPUs, then one node per host advertising
what a TPU v4 VM advertises in Ray 2.60 -- `TPU: 4`, `accelerator_type:TPU-V4`, the slice name, `TPU-v4-<n>-head`
on worker 0, and the `ray.io/tpu-*` labels; FIELD-NOTES recipe 4), then runs
`JaxTrainer(train_loop, scaling_config=ScalingConfig(use_tpu=True, num_workers=N, topology="2x2x<N>",
accelerator_type="TPU-V4"), run_config=RunConfig(storage_path=..., failure_config=FailureConfig(max_failures=...)))`.
Each node's environment gives its workers JAX_PLATFORMS=cpu, `--xla_force_host_platform_device_count=<devices>` and
gloo collectives, so Ray Train's JAX backend joins them with `jax.distributed.initialize` as it would TPU VMs.

The train loop is the trainer's own pieces, built from the same composed config as the launcher's run: the mesh
(trainer/sharding.make_mesh from `mesh.*`), TransformerLM (`model.*`), AdamW (trainer/optim.make_optimizer), the
state created sharded (trainer/state.create_state) and the jitted sharded step (trainer/step.make_train_step); the
global batch `trainer.batch_size` x `model.seq_len`, each host feeding its own rows (random tokens: the trainer's
data loader is ours, not Ray's). Every `ckpt_every` steps rank 0 writes the (replicated) state as one .npz and every
rank calls `ray.train.report(..., checkpoint=...)` (Ray's documented rank-0-saves pattern); a new attempt restores
from `ray.train.get_checkpoint()`. Milestones go to the spec's `events` file as JSON lines (`time` is time.time()):
driver_start, cluster_up, fit_start, fit_end (driver); worker_start (the train function entered, after Ray's
backend joined jax.distributed), restore, ready (state on the mesh), first_step (first step finished), step (each
finished step, with the pid), checkpoint (rank 0, after report returned), done -- the worker's with `rank` and `pid`.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _append(path: str, record: dict) -> None:
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker (one per fake TPU host)."""
    import tempfile

    import ray.train

    events = config["events"]
    rank = ray.train.get_context().get_world_rank()
    pid = os.getpid()

    def ev(event, **kw):
        _append(events, {"event": event, "rank": rank, "pid": pid, "time": time.time(), **kw})

    ev("worker_start")
    sys.path.insert(0, config["root"])
    import jax
    import numpy as np
    from omegaconf import OmegaConf

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before the CPU backend starts
    from trainer.model import ModelSpec, TransformerLM
    from trainer.optim import make_optimizer
    from trainer.sharding import batch_shard, batch_sharding, make_mesh
    from trainer.state import abstract_state, create_state, state_shardings
    from trainer.step import make_train_step

    cfg = OmegaConf.create(config["cfg"])
    mesh = make_mesh({"dcn": cfg.mesh.get("dcn", 1), "data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                      "tensor": cfg.mesh.tensor})
    spec = ModelSpec.from_config(cfg.model)
    model = TransformerLM(spec)
    steps, batch, seq = int(cfg.trainer.steps), int(cfg.trainer.batch_size), int(cfg.model.seq_len)
    tx, schedule = make_optimizer(cfg.optimizer, steps)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        shardings = state_shardings(model, tx, mesh, seq)
        target = abstract_state(model, tx, mesh, seq, shardings)
        leaves, treedef = jax.tree_util.tree_flatten(target)
        with ckpt.as_directory() as d:
            with np.load(os.path.join(d, "state.npz")) as z:
                values = [z[f"arr_{i}"] for i in range(len(leaves))]
        state = jax.tree_util.tree_unflatten(treedef, [
            jax.make_array_from_callback(a.shape, a.sharding, lambda idx, v=v: v[idx])
            for a, v in zip(leaves, values)])
    else:
        state, shardings = create_state(model, tx, mesh, seq, int(cfg.trainer.seed))
    start = int(np.asarray(state["step"].addressable_data(0)))
    if ckpt is not None:
        ev("restore", step=start)
    train_step = make_train_step(model, tx, schedule, mesh, shardings)
    local_batch = batch // batch_shard(mesh, batch, seq)[1]
    sharding = batch_sharding(mesh)
    rng = np.random.default_rng([int(cfg.trainer.seed), rank, start])
    ev("ready", step=start)
    every = int(config["ckpt_every"])
    for step in range(start, steps):
        local = rng.integers(0, spec.vocab_size, (local_batch, seq + 1), dtype=np.int32)
        feed = {"inputs": local[:, :-1], "targets": local[:, 1:]}
        gbatch = {k: jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(v), (batch, seq))
                  for k, v in feed.items()}
        state, metrics = train_step(state, gbatch)
        loss = float(metrics["loss"])  # the step is finished
        done = step + 1
        if step == start:
            ev("first_step", step=done, loss=loss)
        ev("step", step=done)
        if every and done % every == 0 and done < steps:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    for x in jax.tree_util.tree_leaves(state):
                        if not x.sharding.is_fully_replicated:
                            raise ValueError("the reference side checkpoints replicated state only (mesh.fsdp=1, "
                                             "mesh.tensor=1)")
                    np.savez(os.path.join(tmp, "state.npz"),
                             *[np.asarray(x.addressable_data(0)) for x in jax.tree_util.tree_leaves(state)])
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"step": done, "loss": loss}, checkpoint=checkpoint)
            if rank == 0:
                ev("checkpoint", step=done)
    ev("done", step=steps)


def _node_args(hosts: int, devices: int, worker_id: int, name: str) -> dict:
    pod = f"v4-{8 * hosts}"  # v4 name suffix = TensorCores: 4 chips per host, 2 cores per chip
    topology = f"2x2x{hosts}"
    resources = {"TPU": 4.0, "accelerator_type:TPU-V4": 1.0, name: 1.0}
    if worker_id == 0:
        resources[f"TPU-{pod}-head"] = 1.0
    labels = {"ray.io/tpu-slice-name": name, "ray.io/tpu-worker-id": str(worker_id),
              "ray.io/tpu-pod-type": pod, "ray.io/tpu-topology": topology}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env = {"TPU_NAME": name, "TPU_WORKER_ID": str(worker_id), "TPU_ACCELERATOR_TYPE": pod, "TPU_TOPOLOGY": topology,
           "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])}
    return {"num_cpus": 1, "resources": resources, "labels": labels, "env_vars": env}


def main(spec_path: str) -> int:
    t0 = time.time()
    with open(spec_path) as f:
        spec = json.load(f)
    events = spec["events"]
    _append(events, {"event": "driver_start", "time": t0})
    import ray
    from omegaconf import OmegaConf
    from ray.cluster_utils import Cluster
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxTrainer

    hosts, devices = int(spec["hosts"]), int(spec["devices"])
    name = spec.get("slice", "tpu-bench")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for w in range(hosts):
            cluster.add_node(wait=False, **_node_args(hosts, devices, w, name))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=bool(spec.get("log_to_driver", True)))
        _append(events, {"event": "cluster_up", "time": time.time()})
        cfg = OmegaConf.to_container(OmegaConf.load(spec["config"]), resolve=True)
        trainer = JaxTrainer(
            train_loop,
            train_loop_config={"cfg": cfg, "events": events, "root": ROOT, "ckpt_every": spec.get("ckpt_every", 0)},
            scaling_config=ScalingConfig(use_tpu=True, num_workers=hosts, topology=f"2x2x{hosts}",
                                         accelerator_type="TPU-V4"),
            run_config=RunConfig(name=spec.get("name", "bench"), storage_path=spec["storage"],
                                 failure_config=FailureConfig(max_failures=int(spec.get("max_failures", 0)))))
        _append(events, {"event": "fit_start", "time": time.time()})
        result = trainer.fit()
        _append(events, {"event": "fit_end", "time": time.time(), "error": repr(result.error) if result.error else None,
                         "checkpoint": getattr(result.checkpoint, "path", None)})
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
