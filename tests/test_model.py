"""Tests for trainer.model (TransformerLM), trainer.optim (schedule, clipping, decay mask) and the train step."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from launcher.schema import ModelConfig  # noqa: E402
from trainer.model import Attention, ModelSpec, TransformerLM, init_cache, rotary  # noqa: E402
from trainer.optim import make_optimizer, make_schedule  # noqa: E402
from trainer.sharding import LOGICAL_RULES, make_mesh  # noqa: E402
from trainer.state import count_params, create_state  # noqa: E402
from trainer.step import make_train_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 16


def tiny_spec(**changes) -> ModelSpec:
    """The spec of conf/model/tiny.yaml over the schema's defaults (so the test follows the shipped config),
    optionally changed."""
    spec = ModelSpec.from_config(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                 OmegaConf.load(os.path.join(REPO, "conf", "model", "tiny.yaml"))))
    return dataclasses.replace(spec, **changes)


def opt_cfg(**changes):
    base = dict(lr=1e-2, warmup_steps=2, decay_steps=None, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                weight_decay=0.0, clip_norm=1.0)
    base.update(changes)
    return OmegaConf.create(base)


def tokens_for(spec: ModelSpec, batch=2, length=SEQ, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, spec.vocab_size, dtype=jnp.int32)


@pytest.fixture(scope="module")
def rotary_model():
    spec = tiny_spec()
    model = TransformerLM(spec)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"])
    return spec, model, params, jax.jit(lambda p, t: model.apply({"params": p}, t))


def test_tiny_config_is_the_documented_model():
    spec = tiny_spec()
    assert (spec.vocab_size, spec.d_model, spec.n_layers, spec.n_heads, spec.d_ff) == (384, 64, 2, 4, 256)
    assert spec.positions == "rotary" and spec.dtype == "float32" and spec.head_dim == 16


def test_a_config_written_before_scan_remat_and_attention_still_reads():
    """An older run's config.yaml (no scan_layers, remat, attention) gives the model it trained: eval and generate
    read older runs."""
    old = OmegaConf.load(os.path.join(REPO, "conf", "model", "tiny.yaml"))
    assert "scan_layers" not in old and "remat" not in old and "attention" not in old
    assert ModelSpec.from_config(old) == tiny_spec(scan_layers=False, remat="none", attention="auto")


def test_logits_shape_and_dtype(rotary_model):
    spec, _, params, apply = rotary_model
    logits = apply(params, tokens_for(spec, batch=3))
    assert logits.shape == (3, SEQ, spec.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_parameter_count_matches_hand_computation(rotary_model):
    spec, _, params, _ = rotary_model
    d, f, v, n = spec.d_model, spec.d_ff, spec.vocab_size, spec.n_layers
    per_block = (
        d  # ln_attn scale
        + 3 * d * spec.n_heads * spec.head_dim  # query, key, value
        + spec.n_heads * spec.head_dim * d  # out
        + d  # ln_mlp scale
        + d * f + f * d  # wi, wo
    )
    expected = v * d + n * per_block + d + d * v  # embed, blocks, ln_final, lm_head (no biases, untied)
    assert expected == 147_776
    assert count_params(params) == expected
    wi = params["block_0"]["mlp"]["wi"]["kernel"]
    assert wi.shape == (d, f) and wi.dtype == jnp.float32


def test_learned_positions_add_a_position_table():
    spec = tiny_spec(positions="learned")
    shapes = jax.eval_shape(lambda k: TransformerLM(spec).init(k, jnp.zeros((1, SEQ), jnp.int32)),
                            jax.random.key(0))
    params = nn.meta.unbox(shapes["params"])
    assert params["pos_embed"]["embedding"].shape == (spec.max_seq_len, spec.d_model)
    assert count_params(params) == 147_776 + spec.max_seq_len * spec.d_model


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_causal_future_tokens_do_not_change_past_logits(positions):
    spec = tiny_spec(positions=positions)
    model = TransformerLM(spec)
    params = model.init(jax.random.key(1), jnp.zeros((1, SEQ), jnp.int32))["params"]
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    toks = tokens_for(spec, batch=2, seed=3)
    t = 9
    changed = toks.at[:, t].set((toks[:, t] + 7) % spec.vocab_size)
    a, b = np.asarray(apply(toks)), np.asarray(apply(changed))
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    # ...while position t itself and later positions do see the change (so the check above can fail).
    assert np.abs(a[:, t:] - b[:, t:]).max(axis=(0, 2)).min() > 1e-4


def test_bfloat16_compute_is_finite_and_close_to_float32(rotary_model):
    spec, _, params, apply32 = rotary_model
    model16 = TransformerLM(dataclasses.replace(spec, dtype="bfloat16"))
    toks = tokens_for(spec, batch=2, seed=5)
    l32 = np.asarray(apply32(params, toks))
    l16 = jax.jit(lambda p, t: model16.apply({"params": p}, t))(params, toks)
    assert l16.dtype == jnp.float32 and l16.shape == l32.shape
    l16 = np.asarray(l16)
    assert np.isfinite(l16).all()
    scale = np.abs(l32).max()
    assert np.abs(l16 - l32).max() < 0.1 * scale
    assert np.mean(np.argmax(l16, -1) == np.argmax(l32, -1)) > 0.8
    # bf16 really is used for compute (a silently float32 model would match to ~1e-6).
    assert np.abs(l16 - l32).max() > 1e-5


def test_params_stay_float32_under_bfloat16_compute():
    spec = tiny_spec(dtype="bfloat16")
    shapes = jax.eval_shape(lambda k: TransformerLM(spec).init(k, jnp.zeros((1, SEQ), jnp.int32)),
                            jax.random.key(0))
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(nn.meta.unbox(shapes["params"]))}
    assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_every_param_has_one_logical_name_per_dim(positions):
    spec = tiny_spec(positions=positions)
    boxed = jax.eval_shape(lambda k: TransformerLM(spec).init(k, jnp.zeros((1, SEQ), jnp.int32)),
                           jax.random.key(0))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    specs = nn.get_partition_spec(boxed)
    known = {name for name, _ in LOGICAL_RULES}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, name
        for axis in leaf.names:
            if axis is None:  # only the learned position table's position axis is deliberately unnamed
                assert "pos_embed" in name, name
            else:
                assert axis in known, f"{name}: logical axis {axis!r} has no rule in LOGICAL_RULES"
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)
    assert len(flat_specs) == len(leaves)
    for (path, pspec), (_, leaf) in zip(flat_specs, leaves):
        assert is_spec(pspec), jax.tree_util.keystr(path)
        assert len(pspec) == leaf.value.ndim, jax.tree_util.keystr(path)
    wi = boxed["block_0"]["mlp"]["wi"]["kernel"]
    assert wi.names == ("embed", "mlp")


def test_scanned_params_stack_on_a_layers_axis_that_no_mesh_axis_shards():
    spec = tiny_spec(scan_layers=True)
    boxed = jax.eval_shape(lambda k: TransformerLM(spec).init(k, jnp.zeros((1, SEQ), jnp.int32)),
                           jax.random.key(0))["params"]
    assert not any(k.startswith("block_") for k in boxed)
    wi = boxed["blocks"]["block"]["mlp"]["wi"]["kernel"]
    assert wi.names == ("layers", "embed", "mlp") and wi.value.shape == (spec.n_layers, spec.d_model, spec.d_ff)
    assert dict(LOGICAL_RULES)["layers"] is None
    assert count_params(nn.meta.unbox(boxed)) == count_params(nn.meta.unbox(jax.eval_shape(
        lambda k: TransformerLM(tiny_spec()).init(k, jnp.zeros((1, SEQ), jnp.int32)), jax.random.key(0))["params"]))


def _stacked(params, n_layers):
    """A loop model's params in the scanned layout: block_i's leaves stacked on a leading axis."""
    blocks = [params[f"block_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("block_")}
    return {**rest, "blocks": {"block": jax.tree_util.tree_map(lambda *x: jnp.stack(x), *blocks)}}


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_scan_and_remat_compute_what_the_layer_loop_computes(remat):
    """The same weights give the same logits and gradients as one loop of blocks, scanned or not, whatever is
    recomputed in the backward pass."""
    loop = tiny_spec(n_layers=3)
    params = nn.meta.unbox(TransformerLM(loop).init(jax.random.key(2), jnp.zeros((1, SEQ), jnp.int32))["params"])
    toks = tokens_for(loop, batch=2, seed=5)

    def loss_and_grad(spec, p):
        return jax.jit(jax.value_and_grad(lambda p: TransformerLM(spec).apply({"params": p}, toks).mean()))(p)

    ref_loss, ref_grad = loss_and_grad(loop, params)
    for scan in (False, True):
        spec = dataclasses.replace(loop, scan_layers=scan, remat=remat)
        p = _stacked(params, loop.n_layers) if scan else params
        loss, grad = loss_and_grad(spec, p)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        want = _stacked(ref_grad, loop.n_layers) if scan else ref_grad
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad, want)
    # ...and the comparison can fail: other weights give other gradients.
    other = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    assert not np.allclose(float(loss_and_grad(loop, other)[0]), float(ref_loss), rtol=1e-6)


def _hand_attention(q, k, v, mask):
    """The score tensor built by hand (the model's attention before jax.nn.dot_product_attention)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (q.shape[-1] ** -0.5)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(q.dtype), v)


def test_attention_equals_the_hand_built_score_tensor():
    """Attention's jax.nn.dot_product_attention, causal and through a left-padded KV cache's mask, against the
    softmax(q k^T / sqrt(d)) v written out: the same to 1e-6."""
    spec = tiny_spec()
    x = jax.random.normal(jax.random.key(4), (2, SEQ, spec.d_model))
    pos = jnp.broadcast_to(jnp.arange(SEQ)[None], (2, SEQ))
    attn = Attention(spec)
    params = attn.init(jax.random.key(5), x, pos)
    qkv = {}

    def keep_projections(f, args, kwargs, ctx):  # records what the query/key/value projections return
        out = f(*args, **kwargs)
        if ctx.module.name in ("query", "key", "value"):
            qkv[ctx.module.name] = out
        return out

    with nn.intercept_methods(keep_projections):
        out = attn.apply(params, x, pos)
    q, k, v = rotary(qkv["query"], pos), rotary(qkv["key"], pos), qkv["value"]
    causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))[None, None]
    want = nn.DenseGeneral(spec.d_model, axis=(-2, -1), use_bias=False).apply(
        {"params": params["params"]["out"]}, _hand_attention(q, k, v, causal))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    # The cached path: rows starting at slots 0 and 5 of a 2*SEQ-slot cache.
    start = jnp.array([0, 5], jnp.int32)
    cache = {**init_cache(spec, 2, 2 * SEQ, start)["layers"][0], "index": jnp.int32(0), "start": start}
    got, _ = attn.apply(params, x, pos, cache)
    slots = jnp.arange(SEQ)
    mask = (slots[None, None, :] <= slots[None, :, None]) & (slots[None, None, :] >= start[:, None, None])
    want = nn.DenseGeneral(spec.d_model, axis=(-2, -1), use_bias=False).apply(
        {"params": params["params"]["out"]}, _hand_attention(q, k, v, mask[:, None]))
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1, 5:], want[1, 5:], rtol=0, atol=1e-6)  # padding slots 0..4 are never read


def test_schedule_warmup_peak_and_end():
    o = opt_cfg(lr=3e-3, warmup_steps=20, decay_steps=None, min_lr_ratio=0.1)
    sched = make_schedule(o, total_steps=300)
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1.5e-3, rel=1e-5)
    assert float(sched(20)) == pytest.approx(3e-3, rel=1e-6)
    assert float(sched(300)) == pytest.approx(3e-4, rel=1e-5)
    assert float(sched(1000)) == pytest.approx(3e-4, rel=1e-5)
    values = [float(sched(s)) for s in range(20, 301, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone cosine decay
    # explicit decay_steps wins over total_steps
    sched = make_schedule(opt_cfg(lr=1.0, warmup_steps=5, decay_steps=45, min_lr_ratio=0.2), total_steps=300)
    assert float(sched(5)) == pytest.approx(1.0)
    assert float(sched(45)) == pytest.approx(0.2, rel=1e-5)
    assert float(sched(25)) == pytest.approx(0.2 + 0.8 * 0.5, rel=1e-5)  # cosine midpoint of steps 5..45


def test_schedule_with_warmup_longer_than_training_still_peaks():
    sched = make_schedule(opt_cfg(lr=1.0, warmup_steps=100, min_lr_ratio=0.1), total_steps=10)
    assert float(sched(0)) == 0.0
    assert max(float(sched(s)) for s in range(11)) == pytest.approx(1.0)
    assert np.isfinite([float(sched(s)) for s in range(20)]).all()


def test_gradient_clipping_bounds_what_adam_sees():
    params = {"w": jnp.zeros((4, 5)), "b": jnp.zeros((5,))}
    grads = {"w": jnp.full((4, 5), 10.0), "b": jnp.full((5,), 10.0)}
    assert float(optax.tree.norm(grads)) > 40

    def first_moment(clip_norm):
        tx, _ = make_optimizer(opt_cfg(clip_norm=clip_norm, b1=0.9), total_steps=10)
        _, state = jax.jit(tx.update)(grads, tx.init(params), params)
        adam = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState)]
        assert len(adam) == 1
        return float(optax.tree.norm(adam[0].mu))

    # mu after one step = (1 - b1) * clipped grads
    assert first_moment(1.0) == pytest.approx(0.1 * 1.0, rel=1e-4)
    assert first_moment(1e6) == pytest.approx(0.1 * float(optax.tree.norm(grads)), rel=1e-4)


def test_weight_decay_skips_norm_scales():
    params = {"dense": {"kernel": jnp.ones((3, 3))}, "norm": {"scale": jnp.ones((3,))}}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx, _ = make_optimizer(opt_cfg(lr=0.1, warmup_steps=0, weight_decay=0.5), total_steps=10)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["norm"]["scale"]), 1.0)
    assert float(new["dense"]["kernel"][0, 0]) == pytest.approx(1.0 - 0.1 * 0.5, rel=1e-5)


def test_train_steps_on_a_repeated_batch_reduce_the_loss():
    spec = tiny_spec()
    model = TransformerLM(spec)
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])  # one device: fast compile
    tx, schedule = make_optimizer(opt_cfg(lr=1e-2, warmup_steps=2), total_steps=30)
    state, shardings = create_state(model, tx, mesh, SEQ, seed=0)
    step_fn = make_train_step(model, tx, schedule, mesh, shardings)
    rows = jax.random.randint(jax.random.key(7), (4, SEQ + 1), 0, 256, dtype=jnp.int32)
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
    losses, lrs = [], []
    for _ in range(8):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
        lrs.append(float(metrics["lr"]))
    assert int(state["step"]) == 8
    assert np.isfinite(losses).all()
    assert losses[0] == pytest.approx(np.log(spec.vocab_size), rel=0.1)  # near-uniform at init
    assert losses[-1] < losses[0] - 0.5
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-2)  # metrics["lr"] is the lr of that step


# ---- model.attention: the Pallas splash kernel (TPU) and its fallback ----

def test_splash_kernel_computes_what_xla_attention_computes():
    """The splash path (shard_map over the batch and heads axes, the kernel per device, q scaled by 1/sqrt(d)) in
    the Pallas interpreter on CPU devices: outputs and q/k/v gradients equal causal jax.nn.dot_product_attention."""
    from trainer.model import splash_attention

    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(key, (2, 256, 4, 64), jnp.float32) for key in keys)
    splash = lambda q, k, v: jnp.sum(splash_attention(q, k, v, mesh, interpret=True) * w)  # noqa: E731
    xla = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) * w)  # noqa: E731
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, mesh, interpret=True))(q, k, v)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    grads = jax.jit(jax.grad(splash, argnums=(0, 1, 2)))(q, k, v), jax.grad(xla, argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("length, blocks", [(256, 4), (192, 3), (1024, 8)])
def test_blocked_attention_computes_what_xla_attention_computes(length, blocks):
    """The causal query blocks (model.attention=blocked, auto off TPU): outputs and q/k/v gradients equal causal
    jax.nn.dot_product_attention's, though the blocks above the diagonal are never computed."""
    from trainer.model import attention_blocks, blocked_attention

    assert attention_blocks(length) == blocks
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, w = (jax.random.normal(key, (2, length, 2, 32), jnp.float32) for key in keys)
    np.testing.assert_allclose(jax.jit(blocked_attention)(q, k, v),
                               jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    blocked = lambda q, k, v: jnp.sum(blocked_attention(q, k, v) * w)  # noqa: E731
    xla = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) * w)  # noqa: E731
    grads = jax.jit(jax.grad(blocked, argnums=(0, 1, 2)))(q, k, v), jax.grad(xla, argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_attention_auto_is_blocked_off_tpu_where_the_sequence_splits():
    from trainer.model import attention_blocks, training_attention

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    spec = tiny_spec()
    assert [attention_blocks(n) for n in (16, 64, 100, 128, 4096)] == [None, None, None, 2, 8]
    assert training_attention(spec, mesh, 256) == "blocked" and training_attention(spec, None, 256) == "blocked"
    assert training_attention(spec, mesh, 64) == "xla"  # one block: the whole score matrix anyway
    assert training_attention(dataclasses.replace(spec, attention="xla"), mesh, 256) == "xla"
    toks = tokens_for(spec, batch=2, length=256)
    params = TransformerLM(spec).init(jax.random.key(0), toks)["params"]
    np.testing.assert_allclose(TransformerLM(spec, mesh).apply({"params": params}, toks),
                               TransformerLM(dataclasses.replace(spec, attention="xla"), mesh).apply(
                                   {"params": params}, toks), atol=1e-4)


def test_attention_auto_is_xla_off_tpu_and_splash_there_is_an_error():
    from trainer.model import splash_problem, use_splash

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    spec = tiny_spec()
    assert spec.attention == "auto"  # the schema's default
    assert not use_splash(spec, mesh, 256) and not use_splash(spec, None, 256)
    assert splash_problem(spec, mesh, 256) == "the mesh's devices are cpu, not TPU"
    toks = tokens_for(spec, batch=2, length=SEQ)
    auto = TransformerLM(spec, mesh)
    params = auto.init(jax.random.key(0), toks)["params"]  # init never takes the kernel
    np.testing.assert_array_equal(auto.apply({"params": params}, toks),
                                  TransformerLM(spec).apply({"params": params}, toks))
    with pytest.raises(ValueError, match="model.attention=splash: the mesh's devices are cpu, not TPU"):
        TransformerLM(dataclasses.replace(spec, attention="splash"), mesh).apply({"params": params}, toks)
