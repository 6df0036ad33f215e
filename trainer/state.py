"""Train state as a plain pytree (step, params, opt_state, rng), created already sharded on the mesh."""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainer import compile_cache
from trainer.sharding import logical_to_sharding, replicated


def _boxed_init(model, tx, seq_len: int):
    def init(rng):
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(rng, tokens)["params"]
        return {"params": params, "opt_state": tx.init(params)}

    return init


def state_shardings(model, tx, mesh, seq_len: int) -> Dict[str, Any]:
    """NamedShardings for every leaf of the train state, derived from the params' logical axis names."""
    boxed = jax.eval_shape(_boxed_init(model, tx, seq_len), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    shard = logical_to_sharding(specs, mesh)
    rep = replicated(mesh)
    return {"step": rep, "params": shard["params"], "opt_state": shard["opt_state"], "rng": rep}


def _make_fn(model, tx, seq_len: int):
    init = _boxed_init(model, tx, seq_len)

    def make(seed_arr):
        key = jax.random.key(seed_arr)
        init_key, train_key = jax.random.split(key)
        tree = nn.meta.unbox(init(init_key))
        return {"step": jnp.zeros((), jnp.int32), "params": tree["params"], "opt_state": tree["opt_state"],
                "rng": jax.random.key_data(train_key)}

    return make


def create_state(model, tx, mesh, seq_len: int, seed: int, shardings=None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Initialise params and optimizer state inside jit with output shardings: never whole on one host.
    shardings: state_shardings' result when the caller has it (each derivation traces the whole model's init)."""
    shardings = shardings or state_shardings(model, tx, mesh, seq_len)
    # kept per process like the steps: jax's own cache serves only process 0 of a CPU pod (compile_cache.py)
    make = compile_cache.Persistent(jax.jit(_make_fn(model, tx, seq_len), out_shardings=shardings), "init_state")
    state = make(jnp.uint32(seed))
    return state, shardings


def abstract_state(model, tx, mesh, seq_len: int, shardings=None):
    """ShapeDtypeStructs carrying their target shardings: the restore target for orbax."""
    shardings = shardings or state_shardings(model, tx, mesh, seq_len)
    shapes = jax.eval_shape(_make_fn(model, tx, seq_len), jnp.uint32(0))
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
