"""Tests for trainer.sharding (mesh shape, logical rules, batch rows), sharded state creation and params_digest."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from trainer.digest import params_digest  # noqa: E402
from trainer.model import ModelSpec, TransformerLM  # noqa: E402
from trainer.optim import make_optimizer  # noqa: E402
from trainer.sharding import (AXES, LOGICAL_RULES, batch_shard, batch_sharding, logical_to_sharding,  # noqa: E402
                              make_mesh, resolve_mesh_shape)
from trainer.state import abstract_state, create_state  # noqa: E402

SEQ = 8
SPEC = ModelSpec(vocab_size=384, d_model=64, n_layers=1, n_heads=4, d_ff=128, max_seq_len=64)
OPT = OmegaConf.create(dict(lr=1e-3, warmup_steps=2, decay_steps=None, min_lr_ratio=0.1, b1=0.9, b2=0.95,
                            eps=1e-8, weight_decay=0.1, clip_norm=1.0))

needs4 = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 CPU devices (jax was imported before "
                                                          "XLA_FLAGS could ask for them)")


# ---- resolve_mesh_shape / make_mesh ----

def test_resolve_fills_the_minus_one_axis():
    assert resolve_mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 16) == {"data": 2, "fsdp": 4, "tensor": 2}
    assert resolve_mesh_shape({"data": 1, "fsdp": 2, "tensor": -1}, 4) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 4) == {"data": 2, "fsdp": 2, "tensor": 1}


def test_resolve_rejects_two_fill_axes():
    with pytest.raises(ValueError, match=r"^mesh\.fsdp: only one mesh axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 4)


def test_resolve_rejects_wrong_product_naming_mesh():
    with pytest.raises(ValueError, match=r"^mesh: data x fsdp x tensor = 3 but the pod has 4 devices"):
        resolve_mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 4)
    with pytest.raises(ValueError, match=r"^mesh\.data: cannot fill"):
        resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 4)
    with pytest.raises(ValueError, match=r"^mesh\.tensor: size must be a positive integer"):
        resolve_mesh_shape({"data": -1, "fsdp": 1, "tensor": 0}, 4)


def test_make_mesh_axis_names_and_sizes():
    n = len(jax.devices())
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert mesh.axis_names == ("dcn",) + AXES  # dcn: slices, 1 on a single slice
    assert dict(mesh.shape) == {"dcn": 1, "data": n, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="mesh"):
        make_mesh({"data": n + 1, "fsdp": 1, "tensor": 1})


# ---- logical rules -> shardings ----

@pytest.fixture(scope="module")
def model_tx():
    tx, _ = make_optimizer(OPT, total_steps=10)
    return TransformerLM(SPEC), tx


@pytest.fixture(scope="module")
def state_ft(model_tx):
    """The train state created on a (data=1, fsdp=2, tensor=2) mesh over 4 CPU devices."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 CPU devices")
    model, tx = model_tx
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    state, shardings = create_state(model, tx, mesh, SEQ, seed=3)
    return mesh, state, shardings


def _adam_state(opt_state):
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0]


def test_logical_rules_cover_every_model_axis():
    boxed = jax.eval_shape(lambda k: TransformerLM(SPEC).init(k, jnp.zeros((1, SEQ), jnp.int32)),
                           jax.random.key(0))
    used = {a for spec in jax.tree_util.tree_leaves(nn.get_partition_spec(boxed),
                                                      is_leaf=lambda x: isinstance(x, P))
            for a in spec if a is not None}
    rules = dict(LOGICAL_RULES)
    assert used <= set(rules), f"logical axes without a rule: {used - set(rules)}"
    assert rules["embed"] == "fsdp" and rules["mlp"] == "tensor" and rules["vocab"] == "tensor"
    assert rules["heads"] == "tensor" and rules["batch"] == ("dcn", "data", "fsdp")


def test_logical_to_sharding_maps_names_to_mesh_axes():
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    out = logical_to_sharding({"a": P("embed", "mlp"), "b": P("vocab", "embed"), "c": P("embed", "heads", "kv")},
                              mesh)
    assert out["a"].spec == P("fsdp", "tensor")
    assert out["b"].spec == P("tensor", "fsdp")
    assert out["c"].spec == P("fsdp", "tensor", None)
    assert out["a"].mesh == mesh


@needs4
def test_param_partition_specs_on_fsdp_tensor_mesh(state_ft):
    mesh, state, _ = state_ft
    p = state["params"]
    assert p["block_0"]["mlp"]["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert p["block_0"]["mlp"]["wo"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert p["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert p["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert p["ln_final"]["scale"].sharding.spec == P("fsdp")
    assert p["block_0"]["ln_attn"]["scale"].sharding.spec == P("fsdp")
    assert p["block_0"]["attn"]["query"]["kernel"].sharding.spec in (P("fsdp", "tensor", None), P("fsdp", "tensor"))
    for leaf in jax.tree_util.tree_leaves(state):
        assert leaf.sharding.mesh == mesh
    assert state["step"].sharding.is_fully_replicated and state["rng"].sharding.is_fully_replicated


@needs4
def test_adam_moments_sharded_like_their_params(state_ft):
    _, state, shardings = state_ft
    adam = _adam_state(state["opt_state"])
    flat_p = jax.tree_util.tree_leaves_with_path(state["params"])
    for moments in (adam.mu, adam.nu):
        flat_m = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(moments))
        assert len(flat_m) == len(flat_p)
        for path, param in flat_p:
            m = flat_m[jax.tree_util.keystr(path)]
            assert m.shape == param.shape
            assert m.sharding.is_equivalent_to(param.sharding, param.ndim), jax.tree_util.keystr(path)
            assert m.sharding.spec == param.sharding.spec
    # the shardings create_state returns are the ones the arrays carry
    for leaf, sh in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


@needs4
def test_no_param_or_moment_is_whole_on_one_device(state_ft):
    _, state, _ = state_ft
    adam = _adam_state(state["opt_state"])
    for tree in (state["params"], adam.mu, adam.nu):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = jax.tree_util.keystr(path)
            assert not leaf.sharding.is_fully_replicated, name  # every param has an `embed` (fsdp) axis
            shards = leaf.addressable_shards
            assert len(shards) == 4
            assert all(s.data.size < leaf.size for s in shards), name
            # the shards together hold the whole array: each device holds 1/2 (fsdp only) or 1/4 of it
            assert all(s.data.size * (2 if "scale" in name else 4) == leaf.size for s in shards), name


@needs4
def test_abstract_state_carries_the_same_shardings(model_tx, state_ft):
    mesh, state, shardings = state_ft
    model, tx = model_tx
    abstract = abstract_state(model, tx, mesh, SEQ, shardings)
    for a, leaf in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(state)):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype
        assert a.sharding.is_equivalent_to(leaf.sharding, leaf.ndim)


# ---- batch rows ----

def test_one_process_feeds_the_whole_batch():
    n = len(jax.devices())
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert batch_shard(mesh, 4 * n, 16) == (0, 1)
    idx = batch_sharding(mesh).addressable_devices_indices_map((4 * n, 16))
    assert len(idx) == n


@needs4
def test_batch_shard_with_fsdp_and_tensor_axes():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    assert batch_shard(mesh, 6, 5) == (0, 1)
    sizes = sorted({(s[0].start, s[0].stop) for s in
                    batch_sharding(mesh).addressable_devices_indices_map((6, 5)).values()})
    assert sizes == [(0, 3), (3, 6)]  # batch split over data x fsdp = 2, replicated over tensor


# ---- params digest ----

@needs4
def test_params_digest_is_layout_independent_and_value_sensitive(model_tx, state_ft):
    model, tx = model_tx
    _, state_ft_mesh, _ = state_ft
    data_mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, jax.devices()[:4])
    state_data, _ = create_state(model, tx, data_mesh, SEQ, seed=3)
    a, b = state_ft_mesh["params"], state_data["params"]
    wi_a, wi_b = a["block_0"]["mlp"]["wi"]["kernel"], b["block_0"]["mlp"]["wi"]["kernel"]
    # really two layouts: 1/4 of wi per device vs wi replicated (data mesh has fsdp = tensor = 1)
    assert wi_a.addressable_shards[0].data.shape == (32, 64)
    assert wi_b.addressable_shards[0].data.shape == (64, 128) and wi_b.sharding.is_fully_replicated
    digest = params_digest(a)
    assert len(digest) == 64
    assert params_digest(b) == digest
    # a single changed value changes the digest
    bumped = jax.tree_util.tree_map(lambda x: x, a)
    bumped["block_0"]["mlp"]["wi"]["kernel"] = wi_a.at[3, 5].add(1e-3)
    assert params_digest(bumped) != digest
    # a different seed gives different params
    other, _ = create_state(model, tx, data_mesh, SEQ, seed=4)
    assert params_digest(other["params"]) != digest


def test_params_digest_covers_names_and_shapes():
    x = jnp.arange(6, dtype=jnp.float32)
    base = params_digest({"a": x})
    assert params_digest({"a": x}) == base
    assert params_digest({"b": x}) != base  # renamed leaf
    assert params_digest({"a": x.reshape(2, 3)}) != base  # same bytes, different shape
    assert params_digest({"a": x, "b": x[:1]}) == params_digest({"b": x[:1], "a": x})  # order-independent
    assert params_digest({"a": x.at[5].set(6.0)}) != base  # last value changed


def test_multislice_mesh_shape():
    from trainer.mesh_shape import resolve_mesh_shape

    assert resolve_mesh_shape({"dcn": 2, "data": -1, "fsdp": 2, "tensor": 1}, 16) == \
        {"dcn": 2, "data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="each of the 2 slices has 8 devices"):
        resolve_mesh_shape({"dcn": 2, "data": 16, "fsdp": 1, "tensor": 1}, 16)
    with pytest.raises(ValueError, match="mesh.dcn"):
        resolve_mesh_shape({"dcn": 3, "data": -1, "fsdp": 1, "tensor": 1}, 16)
