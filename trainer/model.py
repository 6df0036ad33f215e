"""Decoder-only transformer LM in Flax linen: causal, pre-norm (RMSNorm), rotary or learned positions.

Every parameter carries logical axis names (see trainer/sharding.py for how they map onto the mesh).
Called with a KV cache (trainer/generate.py) it decodes: the cache arrays go in and come back updated, so the
param tree and the training forward pass (no cache) are exactly what they were.
`scan_layers` runs the blocks as one `nn.scan` (parameters stacked on a leading `layers` axis), so compile time
does not grow with depth; `remat` recomputes each block's activations in the backward pass (jax.checkpoint with
a policy) so big models fit.
"""
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a block keeps for the backward pass: everything (none), only its inputs (full), or its matmul outputs.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.dots_saveable}


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

    @classmethod
    def from_config(cls, m) -> "ModelSpec":
        return cls(vocab_size=int(m.vocab_size), d_model=int(m.d_model), n_layers=int(m.n_layers),
                   n_heads=int(m.n_heads), d_ff=int(m.d_ff), max_seq_len=int(m.max_seq_len),
                   positions=str(m.positions), dtype=str(m.dtype), scan_layers=bool(m.scan_layers),
                   remat=str(m.remat))

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


class Attention(nn.Module):
    spec: ModelSpec

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
        if cache is None:
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

    @nn.compact
    def __call__(self, x, positions, cache=None):
        h = Attention(self.spec, name="attn")(RMSNorm(name="ln_attn")(x), positions, cache)
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

    @nn.compact
    def __call__(self, x, positions, shared, layer):
        block = _block_class(self.spec)(self.spec, name="block")
        if layer is None:
            return block(x, positions), None
        x, cache = block(x, positions, {**layer, **shared})
        return x, {"k": cache["k"], "v": cache["v"]}


class TransformerLM(nn.Module):
    """tokens [batch, length] int32 -> logits [batch, length, vocab] float32.

    Decoding: with `cache` (init_cache's layout, `index` the slot of tokens[:, 0]) and per-row `positions`, it
    returns (logits, updated cache)."""

    spec: ModelSpec

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
                            in_axes=(nn.broadcast, nn.broadcast, 0), length=s.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, layers = stack(s, name="blocks")(x, positions, shared, None if cache is None else cache["layers"])
        else:
            layers = []
            for i in range(s.n_layers):
                block = _block_class(s)(s, name=f"block_{i}")
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
