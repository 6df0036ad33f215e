"""Decoder-only transformer LM in Flax linen: causal, pre-norm (RMSNorm), rotary or learned positions.

Every parameter carries logical axis names (see trainer/sharding.py for how they map onto the mesh).
"""
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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

    @classmethod
    def from_config(cls, m) -> "ModelSpec":
        return cls(vocab_size=int(m.vocab_size), d_model=int(m.d_model), n_layers=int(m.n_layers),
                   n_heads=int(m.n_heads), d_ff=int(m.d_ff), max_seq_len=int(m.max_seq_len),
                   positions=str(m.positions), dtype=str(m.dtype))

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
    def __call__(self, x, positions):
        s, dt = self.spec, DTYPES[self.spec.dtype]
        proj = lambda name: nn.DenseGeneral(  # noqa: E731
            (s.n_heads, s.head_dim), use_bias=False, dtype=dt, name=name,
            kernel_init=_init(s.d_model ** -0.5, ("embed", "heads", "kv")))
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        if s.positions == "rotary":
            q, k = rotary(q, positions), rotary(k, positions)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (s.head_dim ** -0.5)
        length = x.shape[1]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        logits = jnp.where(causal[None, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(dt)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(s.d_model, axis=(-2, -1), use_bias=False, dtype=dt, name="out",
                               kernel_init=_init((s.n_heads * s.head_dim) ** -0.5 / (2 * s.n_layers) ** 0.5,
                                                 ("heads", "kv", "embed")))(out)


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
    def __call__(self, x, positions):
        x = x + Attention(self.spec, name="attn")(RMSNorm(name="ln_attn")(x), positions)
        return x + MLP(self.spec, name="mlp")(RMSNorm(name="ln_mlp")(x))


class TransformerLM(nn.Module):
    """tokens [batch, length] int32 -> logits [batch, length, vocab] float32."""

    spec: ModelSpec

    @nn.compact
    def __call__(self, tokens):
        s, dt = self.spec, DTYPES[self.spec.dtype]
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None, :], tokens.shape)
        embed = nn.Embed(s.vocab_size, s.d_model, dtype=dt, name="embed",
                         embedding_init=_init(1.0, ("vocab", "embed")))
        x = embed(tokens)
        if s.positions == "learned":
            x = x + nn.Embed(s.max_seq_len, s.d_model, dtype=dt, name="pos_embed",
                             embedding_init=_init(0.02, (None, "embed")))(positions)
        for i in range(s.n_layers):
            x = Block(s, name=f"block_{i}")(x, positions)
        x = RMSNorm(name="ln_final")(x)
        logits = nn.Dense(s.vocab_size, use_bias=False, dtype=dt, name="lm_head",
                          kernel_init=_init(s.d_model ** -0.5, ("embed", "vocab")))(x)
        return logits.astype(jnp.float32)
