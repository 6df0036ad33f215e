"""Model FLOPs of one train step and the model FLOPs utilisation (MFU) they give against a peak FLOP/s.

FLOPs per step = 6 x N x tokens + causal attention, with tokens = batch x seq_len:
  - 6 x N x tokens: every weight does one multiply-add (2 FLOPs) per token forward and two backward (input and
    weight gradients), the usual "6N" of Kaplan et al. and PaLM's MFU.
  - attention scores and their weighting (QK^T and AV) are 2 x 2 x seq_len x d_attn FLOPs per token and layer
    forward for full attention, times 3 with the backward pass: 12 x n_layers x seq_len x d_attn per token
    (PaLM's 12LHQT); the mask makes half of it useless, so causal attention counts half, 6 x n_layers x
    seq_len x d_attn per token.
Embedding convention: N counts the weights that take part in matmuls. The input token embedding and a learned
position table are looked up, not multiplied, so they are left out; the output projection (lm_head, a separate
matrix here: embeddings are not tied) is a matmul and is counted. RMSNorm scales are counted (a few thousand
weights; they do cost an elementwise multiply per token). Rematerialisation is not counted (model FLOPs, not
hardware FLOPs), so MFU is comparable across runs and implementations.
"""
from typing import Optional


def matmul_params(spec) -> int:
    """N: the parameters of a trainer.model.ModelSpec that are multiplied per token (see the module docstring)."""
    d, f, v = spec.d_model, spec.d_ff, spec.vocab_size
    d_attn = spec.n_heads * spec.head_dim
    per_layer = 3 * d * d_attn + d_attn * d + 2 * d * f + 2 * d  # q, k, v, out; mlp wi, wo; two RMSNorm scales
    return spec.n_layers * per_layer + d + d * v  # the final RMSNorm, lm_head


def lookup_params(spec) -> int:
    """The parameters left out of N: the token embedding and a learned position table (looked up, not multiplied)."""
    return spec.vocab_size * spec.d_model + (spec.max_seq_len * spec.d_model if spec.positions == "learned" else 0)


def flops_per_step(spec, batch: int, seq_len: int) -> float:
    """Model FLOPs of one train step (forward and backward) over batch x seq_len tokens."""
    tokens = batch * seq_len
    attention_per_token = 6 * spec.n_layers * seq_len * spec.n_heads * spec.head_dim  # causal: half of 12LHQT
    return float(6 * matmul_params(spec) * tokens + attention_per_token * tokens)


def mfu(step_flops: float, step_time_s: float, peak_flops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation of a step: its FLOPs over (step time x peak FLOP/s); None when the peak is unknown."""
    if not peak_flops or step_time_s <= 0:
        return None
    return step_flops / (step_time_s * peak_flops)
