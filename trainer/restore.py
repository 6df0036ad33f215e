"""Restore anywhere: the parameters of a training run's checkpoint onto any mesh, and a run's config and ModelSpec.

Only the "params" subtree of the checkpoint's "state" item is read (an orbax partial restore: the optimizer
state is never loaded), each array straight into the target mesh's sharding (trainer/sharding.py rules), whatever
mesh or host count wrote it. Works in a plain single process (no jax.distributed) and on gs:// directories.
"""
from typing import Any, Optional, Tuple

from trainer.checkpoint import CheckpointError
from trainer.model import ModelSpec


def abstract_params(mesh, spec: ModelSpec):
    """ShapeDtypeStructs of the model's parameters, each carrying its NamedSharding on `mesh`."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from trainer.model import TransformerLM
    from trainer.sharding import logical_to_sharding

    model = TransformerLM(spec)
    boxed = jax.eval_shape(lambda rng: model.init(rng, jnp.zeros((1, spec.max_seq_len), jnp.int32))["params"],
                           jax.random.key(0))
    shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nn.meta.unbox(boxed), shardings)


def restore_params(checkpoint_dir: str, step: Optional[int], mesh, spec: ModelSpec) -> Tuple[Any, int]:
    """(params, step) of the newest (or the given) finished step in `checkpoint_dir`, sharded on `mesh`.
    A CheckpointError (one line) when the directory holds no finished checkpoint or not that step."""
    import orbax.checkpoint as ocp
    from etils import epath

    from trainer.warmstart import checkpoint_steps

    checkpoint_dir = str(checkpoint_dir).rstrip("/")
    steps = checkpoint_steps(checkpoint_dir)
    if not steps:
        raise CheckpointError(f"no finished checkpoint in {checkpoint_dir}")
    if step is None:
        step = steps[-1]
    elif int(step) not in steps:
        raise CheckpointError(f"step {step} is not saved in {checkpoint_dir} (saved steps: "
                              f"{', '.join(map(str, steps))})")
    step = int(step)
    target = {"params": abstract_params(mesh, spec)}
    # The "state" item was written by StandardCheckpointHandler, whose on-disk format is PyTreeCheckpointHandler's;
    # the latter's partial_restore reads only the subtree the target names.
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        restored = checkpointer.restore(
            epath.Path(checkpoint_dir) / str(step) / "state",
            args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                        partial_restore=True))
    finally:
        checkpointer.close()
    return restored["params"], step


def load_run(run_dir: str):
    """(cfg, ModelSpec) of a run directory (local or gs://), from the config.yaml the launcher wrote there."""
    from omegaconf import OmegaConf

    from trainer.data.storage import open_store
    from trainer.runfiles import CONFIG

    try:
        text = open_store(str(run_dir)).read_bytes(CONFIG).decode()
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG})") from None
    cfg = OmegaConf.create(text)
    return cfg, ModelSpec.from_config(cfg.model)
