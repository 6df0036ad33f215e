"""Text generation with a KV cache: left-padded prompts, one jitted prefill, one jitted cached step per token.

Every shape is fixed for a call (prompt width rounded up, cache slots rounded up), so nothing compiles per token.
Sampling (greedy, temperature, top-k, top-p) draws row r's token t with key fold_in(fold_in(key(seed), t), r) from
replicated logits, so a seed gives the same text on any number of devices.
"""
import math
import time
from dataclasses import dataclass
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from trainer.data.tokenizer import EOS_ID
from trainer.model import ModelSpec, TransformerLM, init_cache
from trainer.sharding import make_mesh, replicated

PROMPT_ROUND = 8  # prompt width rounded up to this: prompts of similar lengths share one compiled prefill
SLOT_ROUND = 64  # cache slots rounded up to this


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: greedy (argmax), else softmax(logits / temperature) cut to the top_k most likely
    tokens (None: all) and to the smallest set whose probability reaches top_p (1.0: all). temperature 0 is greedy."""
    greedy: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Result:
    """One prompt's continuation: its token ids (EOS included when it stopped there) and why it stopped."""
    prompt_tokens: List[int]
    tokens: List[int]
    stop: str  # "eos", "max_new_tokens" or "max_seq_len"


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def generate_mesh(spec: ModelSpec, devices=None):
    """A mesh over this machine's devices for decoding: parameters sharded along `embed` (fsdp) as far as d_model
    divides, the rest on `data` (the prompts are replicated, so data only holds copies)."""
    devices = list(devices if devices is not None else jax.devices())
    fsdp = math.gcd(len(devices), spec.d_model)
    return make_mesh({"data": len(devices) // fsdp, "fsdp": fsdp, "tensor": 1}, devices)


def sample(logits: jax.Array, step, sampling: Sampling) -> jax.Array:
    """Next token per row from logits [rows, vocab] (float32); `step` is the index of the token being drawn."""
    if sampling.greedy or sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens: keep while it is < top_p
        keep = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)  # >= 1: the most likely always stays
        threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    key = jax.random.fold_in(jax.random.key(sampling.seed), step)
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(logits.shape[0]))
    return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, logits).astype(jnp.int32)


class Generator:
    """Decodes batches of token prompts with `params` (already on `mesh`, e.g. restore_params's) and one Sampling.
    Only ids below `token_ids` (the tokenizer's vocabulary; default: the model's) are ever drawn: a model's
    vocab_size may be padded past its tokenizer's, and those ids mean nothing."""

    def __init__(self, spec: ModelSpec, params, mesh, sampling: Sampling, token_ids: Optional[int] = None):
        self.spec, self.params, self.mesh, self.sampling = spec, params, mesh, sampling
        self.token_ids = spec.vocab_size if token_ids is None else token_ids
        self.model = TransformerLM(spec)
        self.rep = replicated(mesh)
        self.prefill = jax.jit(self._prefill)
        self.step = jax.jit(self._step, donate_argnums=(2,))

    def _logits(self, params, tokens, positions, cache):
        logits, cache = self.model.apply({"params": params}, tokens, positions, cache)
        # Sampled from replicated logits: the draw cannot depend on how many devices hold the vocab.
        logits = jax.lax.with_sharding_constraint(logits[:, -1], self.rep)
        if self.token_ids < logits.shape[-1]:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.token_ids, logits, -jnp.inf)
        return logits, cache

    def _prefill(self, params, tokens, positions, cache):
        logits, cache = self._logits(params, tokens, positions, cache)
        return sample(logits, 0, self.sampling), cache

    def _step(self, params, token, cache, positions, step):
        logits, cache = self._logits(params, token[:, None], positions[:, None], cache)
        return sample(logits, step, self.sampling), cache, positions + 1

    def generate(self, prompts: List[np.ndarray], max_new_tokens: int):
        """(one Result per prompt, timings). A row stops at EOS, after max_new_tokens, or when it fills
        max_seq_len; each prompt must be non-empty and shorter than max_seq_len (the caller checks)."""
        s = self.spec
        lengths = np.array([len(p) for p in prompts])
        limits = np.minimum(max_new_tokens, s.max_seq_len - lengths)  # new tokens row b may have
        width = _round_up(int(lengths.max()), PROMPT_ROUND)
        steps = int(limits.max())
        slots = _round_up(width + steps, SLOT_ROUND)
        start = width - lengths  # slot of each row's first real token
        tokens = np.zeros((len(prompts), width), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, start[b]:] = p
        positions = np.maximum(np.arange(width)[None, :] - start[:, None], 0).astype(np.int32)
        put = lambda x: jax.device_put(x, self.rep)  # noqa: E731
        cache = jax.tree_util.tree_map(put, init_cache(s, len(prompts), slots, start))

        t0 = time.perf_counter()
        token, cache = self.prefill(self.params, put(tokens), put(positions), cache)
        out = [np.asarray(token)]
        t_first = time.perf_counter()
        pos = put(lengths.astype(np.int32))
        done = (out[0] == EOS_ID) | (limits <= 1)
        t_steady = None  # after the first decode step, which compiles: the decode rate is timed from there
        for t in range(1, steps):
            if done.all():
                break
            token, cache, pos = self.step(self.params, token, cache, pos, jnp.int32(t))
            out.append(np.asarray(token))  # one small copy per step: lets every row's EOS end the loop early
            done |= (out[-1] == EOS_ID) | (t + 1 >= limits)
            t_steady = t_steady or time.perf_counter()
        t_end = time.perf_counter()
        drawn = np.stack(out, axis=1)
        results = []
        for b, p in enumerate(prompts):
            row = drawn[b, :limits[b]].tolist()
            stop = "max_seq_len" if limits[b] < max_new_tokens else "max_new_tokens"
            if EOS_ID in row:
                row, stop = row[:row.index(EOS_ID) + 1], "eos"
            results.append(Result([int(x) for x in p], row, stop))
        steady = (drawn.shape[1] - 2) * drawn.shape[0]  # tokens drawn after t_steady
        timings = {"prefill_s": t_first - t0, "time_to_first_token_s": t_first - t0,
                   "decode_s": t_end - t_first, "decode_steps": drawn.shape[1] - 1,
                   "decode_tokens_per_s": steady / (t_end - t_steady) if steady > 0 else None,
                   "batch": len(prompts), "cache_slots": slots, "prompt_width": width}
        return results, timings
