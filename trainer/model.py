"""Decoder-only transformer LM in Flax linen: causal, pre-norm (RMSNorm), rotary or learned positions.

Every parameter carries logical axis names (see trainer/sharding.py for how they map onto the mesh).
Called with a KV cache (trainer/generate.py) it decodes: the cache arrays go in and come back updated, so the
param tree and the training forward pass (no cache) are exactly what they were.
`scan_layers` runs the blocks as one `nn.scan` (parameters stacked on a leading `layers` axis), so compile time
does not grow with depth; `remat` recomputes each block's activations in the backward pass (jax.checkpoint with
a policy) so big models fit.
`attention` picks the training path's attention: `xla` (jax.nn.dot_product_attention), `splash` (the Pallas
splash-attention TPU kernel, one call per device under shard_map over the batch and heads axes) or `auto` (splash
when the model is given a mesh of TPU devices and the shapes allow it, else xla). The KV-cache decode path always
uses jax.nn.dot_product_attention.
"""
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a block keeps for the backward pass: everything (none), only its inputs (full), or its matmul outputs.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.dots_saveable}
ATTENTION = ("auto", "xla", "splash", "blocked")
BLOCKED_MIN, BLOCKED_MAX_BLOCKS = 64, 8  # blocked attention: query blocks of at least 64 rows, at most 8 of them
SPLASH_BLOCKS = (512, 256, 128)  # the splash kernel's q/kv block: the largest of these that divides seq_len


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    positions: str = "rotary"
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "auto"
    # Not a config key: nn.scan's unroll (layers per loop iteration). The pre-flight compiles a scanned step once
    # more with 2 to measure one layer's cost, which XLA's cost analysis counts only once for a loop.
    scan_unroll: int = 1

    @classmethod
    def from_config(cls, m) -> "ModelSpec":
        """The spec of a `model` config. A key the config lacks takes the field's default: a run's config.yaml
        written before scan_layers, remat and attention existed describes the model those defaults build, so
        eval and generate still read older runs."""
        return cls(**{f.name: f.type(m[f.name]) for f in fields(cls) if f.name in m})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _init(scale: float, names):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=scale), names)


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embedding over the last axis of x [batch, length, heads, head_dim]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[:, :, None, None].astype(jnp.float32) * freq  # [b, l, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


def splash_block(seq_len: int) -> Optional[int]:
    return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), None)


def splash_problem(spec: ModelSpec, mesh, seq_len: int, batch: Optional[int] = None) -> Optional[str]:
    """Why the splash kernel cannot run this model's training attention on this mesh (None: it can)."""
    if mesh is None:
        return "the model was given no device mesh"
    platforms = sorted({d.platform for d in mesh.devices.flat})
    if platforms != ["tpu"]:
        return f"the mesh's devices are {'/'.join(platforms)}, not TPU"
    if splash_block(seq_len) is None:
        return f"seq_len {seq_len} is not a multiple of {SPLASH_BLOCKS[-1]}"
    sizes = dict(mesh.shape)
    tensor = int(sizes.get("tensor", 1))
    if spec.n_heads % tensor:
        return f"n_heads {spec.n_heads} is not divisible by mesh.tensor {tensor}"
    rows = 1
    for axis in ("dcn", "data", "fsdp"):
        rows *= int(sizes.get(axis, 1))
    if batch is not None and batch % rows:
        return f"a batch of {batch} rows is not divisible by the mesh's {rows} batch shards"
    return None


def use_splash(spec: ModelSpec, mesh, seq_len: int, batch: Optional[int] = None) -> bool:
    """Whether the splash kernel runs this model's training attention on this mesh and shape (training_attention
    resolves model.attention as a whole); `splash` that cannot run raises ValueError."""
    if spec.attention in ("xla", "blocked"):
        return False
    problem = splash_problem(spec, mesh, seq_len, batch)
    if spec.attention == "splash" and problem:
        raise ValueError(f"model.attention=splash: {problem} (use model.attention=auto or xla)")
    return problem is None


def attention_blocks(seq_len: int) -> Optional[int]:
    """How many query blocks `blocked_attention` splits seq_len into (None: fewer than 2 blocks of 64 rows)."""
    if seq_len % BLOCKED_MIN or seq_len < 2 * BLOCKED_MIN:
        return None
    return min(seq_len // BLOCKED_MIN, BLOCKED_MAX_BLOCKS)


def training_attention(spec: ModelSpec, mesh, seq_len: int, batch: Optional[int] = None) -> str:
    """model.attention resolved for this mesh (None: the default backend) and shape: splash, blocked or xla.
    auto: the splash kernel on a TPU mesh that allows it; off TPU blocked where seq_len splits into blocks; else
    xla. `splash` that cannot run raises ValueError."""
    if use_splash(spec, mesh, seq_len, batch):
        return "splash"
    on_tpu = all(d.platform == "tpu" for d in mesh.devices.flat) if mesh is not None else \
        jax.default_backend() == "tpu"
    if spec.attention == "blocked" or (spec.attention == "auto" and not on_tpu):
        return "blocked" if attention_blocks(seq_len) else "xla"
    return "xla"


def blocked_attention(q, k, v):
    """Causal attention in query blocks, each against only the keys it can see (a prefix of the sequence): the
    score blocks above the diagonal are never built, so of n blocks about (n + 1) / 2n of the full score matrix's
    matmul work and softmax remain. Softmax in float32 over each query's visible keys: what the causal mask leaves
    of the full row. q, k, v [batch, length, heads, head_dim]."""
    length, head_dim = q.shape[1], q.shape[3]
    blocks = attention_blocks(length)
    size = length // blocks
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    out = []
    for i in range(blocks):
        seen = (i + 1) * size
        scores = jnp.einsum("bqhd,bkhd->bhqk", q[:, i * size:seen], k[:, :seen],
                            preferred_element_type=jnp.float32)
        visible = jnp.arange(seen)[None, :] <= (i * size + jnp.arange(size))[:, None]
        probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
        out.append(jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v[:, :seen]))
    return jnp.concatenate(out, axis=1)


def splash_attention(q, k, v, mesh, interpret: bool = False):
    """Causal attention through the Pallas splash kernel: q, k, v [batch, length, heads, head_dim] sharded over the
    mesh's batch axes and (heads) tensor axis; each device runs the kernel on its own rows and heads (shard_map).
    interpret=True runs the kernel in the Pallas interpreter (any backend; tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    length, heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    names = tuple(mesh.axis_names)
    batch_axes = tuple(a for a in ("dcn", "data", "fsdp") if a in names)
    tensor = int(dict(mesh.shape).get("tensor", 1))
    local_heads = heads // tensor
    block = splash_block(length)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(local_heads)])
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    spec = P(batch_axes, None, "tensor" if "tensor" in names else None, None)

    @partial(jax.shard_map, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    def per_device(q, k, v):  # [b, l, h, d] -> the kernel's [h, l, d] per row
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        out = jax.vmap(kernel)(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)))
        return out.transpose(0, 2, 1, 3)

    return per_device(q, k, v)


class Attention(nn.Module):
    spec: ModelSpec
    mesh: Any = None

    @nn.compact
    def __call__(self, x, positions, cache=None):
        s, dt = self.spec, DTYPES[self.spec.dtype]
        proj = lambda name: nn.DenseGeneral(  # noqa: E731
            (s.n_heads, s.head_dim), use_bias=False, dtype=dt, name=name,
            kernel_init=_init(s.d_model ** -0.5, ("embed", "heads", "kv")))
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        if s.positions == "rotary":
            q, k = rotary(q, positions), rotary(k, positions)
        # jax.nn.dot_product_attention: the fused (or, on TPU, the compiler's own) attention instead of a score
        # tensor built by hand; softmax in float32 either way.
        # init (a batch of 1, only the parameters' shapes matter) always takes XLA's attention
        kind = "xla" if cache is not None or self.is_initializing() else \
            training_attention(s, self.mesh, x.shape[1], x.shape[0])
        if kind == "splash":
            out = splash_attention(q, k, v, self.mesh)
        elif kind == "blocked":
            out = blocked_attention(q, k, v)
        elif cache is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v, mask, cache = _cached_kv(cache, k, v)
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)
        out = nn.DenseGeneral(s.d_model, axis=(-2, -1), use_bias=False, dtype=dt, name="out",
                              kernel_init=_init((s.n_heads * s.head_dim) ** -0.5 / (2 * s.n_layers) ** 0.5,
                                                ("heads", "kv", "embed")))(out)
        return out if cache is None else (out, cache)


def _cached_kv(cache, k, v):
    """Writes this call's keys and values into the cache at slots [index, index + length) and returns all slots'
    keys and values, the mask of those each query sees and the updated cache. A row's real tokens start at slot
    `start` (left padding before it is never attended to); a query at slot i sees slots start..i."""
    index, start = cache["index"], cache["start"]
    ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
    query_slot = index + jnp.arange(k.shape[1])  # [q]
    key_slot = jnp.arange(ck.shape[1])  # [k]
    mask = (key_slot[None, None, :] <= query_slot[None, :, None]) & (key_slot[None, None, :] >= start[:, None, None])
    return ck, cv, mask[:, None], {**cache, "k": ck, "v": cv}


class MLP(nn.Module):
    spec: ModelSpec

    @nn.compact
    def __call__(self, x):
        s, dt = self.spec, DTYPES[self.spec.dtype]
        h = nn.Dense(s.d_ff, use_bias=False, dtype=dt, name="wi",
                     kernel_init=_init(s.d_model ** -0.5, ("embed", "mlp")))(x)
        h = jax.nn.gelu(h)
        return nn.Dense(s.d_model, use_bias=False, dtype=dt, name="wo",
                        kernel_init=_init(s.d_ff ** -0.5 / (2 * s.n_layers) ** 0.5, ("mlp", "embed")))(h)


class Block(nn.Module):
    spec: ModelSpec
    mesh: Any = None

    @nn.compact
    def __call__(self, x, positions, cache=None):
        h = Attention(self.spec, self.mesh, name="attn")(RMSNorm(name="ln_attn")(x), positions, cache)
        h, cache = (h, None) if cache is None else h
        x = x + h
        x = x + MLP(self.spec, name="mlp")(RMSNorm(name="ln_mlp")(x))
        return x if cache is None else (x, cache)


def _block_class(spec: ModelSpec):
    """Block, or Block under jax.checkpoint with the spec's remat policy. Inside nn.scan the loop already keeps
    XLA from merging recomputation with the forward pass, so CSE prevention (extra work) is only needed outside it."""
    if spec.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[spec.remat], prevent_cse=not spec.scan_layers)


class _ScanBody(nn.Module):
    """One layer of the scanned stack: carry x, per-layer cache slice in, per-layer cache slice out."""
    spec: ModelSpec
    mesh: Any = None

    @nn.compact
    def __call__(self, x, positions, shared, layer):
        block = _block_class(self.spec)(self.spec, self.mesh, name="block")
        if layer is None:
            return block(x, positions), None
        x, cache = block(x, positions, {**layer, **shared})
        return x, {"k": cache["k"], "v": cache["v"]}


class TransformerLM(nn.Module):
    """tokens [batch, length] int32 -> logits [batch, length, vocab] float32.

    Decoding: with `cache` (init_cache's layout, `index` the slot of tokens[:, 0]) and per-row `positions`, it
    returns (logits, updated cache). `mesh`: the device mesh the step runs on (model.attention=auto picks the
    splash kernel on a TPU mesh); None: no mesh known, XLA's attention."""

    spec: ModelSpec
    mesh: Any = None

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None):
        s, dt = self.spec, DTYPES[self.spec.dtype]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None, :], tokens.shape)
        embed = nn.Embed(s.vocab_size, s.d_model, dtype=dt, name="embed",
                         embedding_init=_init(1.0, ("vocab", "embed")))
        x = embed(tokens)
        if s.positions == "learned":
            x = x + nn.Embed(s.max_seq_len, s.d_model, dtype=dt, name="pos_embed",
                             embedding_init=_init(0.02, (None, "embed")))(positions)
        shared = None if cache is None else {"index": cache["index"], "start": cache["start"]}
        if s.scan_layers:
            stack = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0), length=s.n_layers, unroll=s.scan_unroll,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, layers = stack(s, self.mesh, name="blocks")(x, positions, shared,
                                                           None if cache is None else cache["layers"])
        else:
            layers = []
            for i in range(s.n_layers):
                block = _block_class(s)(s, self.mesh, name=f"block_{i}")
                if cache is None:
                    x = block(x, positions)
                else:
                    x, layer = block(x, positions, {**cache["layers"][i], **shared})
                    layers.append({"k": layer["k"], "v": layer["v"]})
        x = RMSNorm(name="ln_final")(x)
        logits = nn.Dense(s.vocab_size, use_bias=False, dtype=dt, name="lm_head",
                          kernel_init=_init(s.d_model ** -0.5, ("embed", "vocab")))(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, {"index": cache["index"] + tokens.shape[1], "start": cache["start"], "layers": layers}


def init_cache(spec: ModelSpec, batch: int, slots: int, start) -> dict:
    """An empty KV cache of `slots` slots per row; start[b] is the slot of row b's first real token (left padding
    fills the slots before it). `index` is the next slot to write."""
    shape = (batch, slots, spec.n_heads, spec.head_dim)
    dt = DTYPES[spec.dtype]
    if spec.scan_layers:  # one stacked array per kind, layer-major, as the scanned stack takes it
        layers = {"k": jnp.zeros((spec.n_layers, *shape), dt), "v": jnp.zeros((spec.n_layers, *shape), dt)}
    else:
        layers = [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(spec.n_layers)]
    return {"index": jnp.zeros((), jnp.int32), "start": jnp.asarray(start, jnp.int32), "layers": layers}
