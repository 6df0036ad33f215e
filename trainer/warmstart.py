"""Warm starts (checkpoint.init_from): find the checkpoint a path names and check its parameter shapes against a model.

A path names a checkpoint as a run directory (its config.yaml's checkpoint.dir, newest step), a checkpoints
directory (newest step) or one step directory, local or gs://. The trainer locates and checks before it restores
the parameters (trainer/restore.py); the launcher runs the same checks before anything starts, as
`python -m trainer.warmstart` in a subprocess (orbax reads array metadata through JAX, which the launcher does not
import) and pins the path to the step directory found, so every host and attempt warm-starts from one step.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

KEY = "checkpoint.init_from"
PATH_FIX = ("point it at a run directory, its checkpoints directory or one step directory "
            "(e.g. runs/NAME, runs/NAME/checkpoints/300 or gs://BUCKET/runs/NAME/checkpoints), or leave it null")
SHAPE_FIX = ("use the model config of the run it comes from (model=... and model.* as in its config.yaml), "
             "or leave checkpoint.init_from null")


class WarmStartError(Exception):
    """checkpoint.init_from names no usable checkpoint, or one whose parameters do not fit this model."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{KEY}: {problem} ({fix})")


def _is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def checkpoint_steps(directory: str) -> List[int]:
    """The finalised steps in an orbax checkpoints directory (none if it does not exist), as orbax lists them."""
    import orbax.checkpoint as ocp

    try:
        return sorted(ocp.utils.checkpoint_steps(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _run_checkpoint_dir(run_dir: str) -> Optional[str]:
    """A run directory's checkpoint.dir (from its config.yaml, resolved when it was written); None if no config."""
    from omegaconf import OmegaConf

    from trainer.data.storage import open_store
    from trainer.runfiles import CONFIG

    try:
        text = open_store(run_dir).read_bytes(CONFIG).decode()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return str(OmegaConf.create(text).checkpoint.dir)


def locate(path: str) -> Tuple[str, int]:
    """(checkpoints directory, step) of the checkpoint `path` names; a WarmStartError if it names none."""
    path = str(path).rstrip("/")
    if not _is_gcs(path) and not os.path.exists(path):
        raise WarmStartError(f"{path} does not exist", PATH_FIX)
    steps = checkpoint_steps(path)
    if steps:
        return path, steps[-1]
    parent, _, name = path.rpartition("/")
    if name.isdigit() and int(name) in checkpoint_steps(parent):
        return parent, int(name)
    own = _run_checkpoint_dir(path)
    if own is not None:
        steps = checkpoint_steps(own)
        if steps:
            return own, steps[-1]
        raise WarmStartError(f"{path} is a run directory whose checkpoint.dir {own} holds no finished checkpoint",
                             PATH_FIX)
    raise WarmStartError(f"{path} holds no finished checkpoint (no step directory, no run config.yaml)", PATH_FIX)


def _flat_shapes(tree) -> Dict[str, Tuple[int, ...]]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(int(d) for d in leaf.shape)
            for path, leaf in leaves}


def model_param_shapes(spec, seq_len: int) -> Dict[str, Tuple[int, ...]]:
    """Every parameter's shape for a ModelSpec, traced only (nothing is allocated)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from trainer.model import TransformerLM

    model = TransformerLM(spec)
    tree = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]))
    return _flat_shapes(tree)


def stored_param_shapes(checkpoint_dir: str, step: int) -> Dict[str, Tuple[int, ...]]:
    """Every parameter's shape in a training checkpoint, from orbax's array metadata (no array is read)."""
    import orbax.checkpoint as ocp
    from etils import epath

    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(checkpoint_dir) / str(step) / "state")
    return _flat_shapes(meta["params"])


def check_shapes(checkpoint_dir: str, step: int, spec, seq_len: int) -> None:
    """A WarmStartError naming the first parameter (in tree order) whose shape differs, or that only one side has."""
    stored = stored_param_shapes(checkpoint_dir, step)
    wanted = model_param_shapes(spec, seq_len)
    where = f"{checkpoint_dir}/{step}"
    for name, shape in wanted.items():
        if name not in stored:
            raise WarmStartError(f"parameter {name} {list(shape)} of this model is not in the checkpoint {where}",
                                 SHAPE_FIX)
        if stored[name] != shape:
            raise WarmStartError(f"parameter {name} has shape {list(stored[name])} in the checkpoint {where} but "
                                 f"{list(shape)} in this model", SHAPE_FIX)
    extra = [name for name in stored if name not in wanted]
    if extra:
        raise WarmStartError(f"parameter {extra[0]} {list(stored[extra[0]])} of the checkpoint {where} is not in "
                             f"this model", SHAPE_FIX)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m trainer.warmstart", description=__doc__.splitlines()[0])
    p.add_argument("--init-from", required=True, help="checkpoint.init_from")
    p.add_argument("--model", required=True, help="the run's model config as JSON (the ModelSpec fields)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--own-checkpoints", default=None,
                   help="the run's own checkpoint.dir: if it holds a checkpoint, the run resumes and nothing else "
                        "is checked")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """One JSON line: {"own_step": N} (the run resumes from its own checkpoint), {"checkpoint_dir", "step", "path"}
    (the step directory to warm-start from), or {"problem", "fix"} with exit 2."""
    args = _parse(argv if argv is not None else sys.argv[1:])
    from omegaconf import OmegaConf

    from trainer.model import ModelSpec
    from trainer.runfiles import EXIT_USER_ERROR

    if args.own_checkpoints:
        own = checkpoint_steps(args.own_checkpoints)
        if own:
            print(json.dumps({"own_step": own[-1]}))
            return 0
    try:
        checkpoint_dir, step = locate(args.init_from)
        check_shapes(checkpoint_dir, step, ModelSpec.from_config(OmegaConf.create(json.loads(args.model))),
                     args.seq_len)
    except WarmStartError as e:
        print(json.dumps({"problem": e.problem, "fix": e.fix}))
        return EXIT_USER_ERROR
    print(json.dumps({"checkpoint_dir": checkpoint_dir, "step": step, "path": f"{checkpoint_dir}/{step}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
