"""Evaluate a checkpoint on a data split in one process: loss, perplexity, token accuracy and top-5 accuracy.

The batches are the trainer's own (trainer/data/stream.py eval_batches: unshuffled full global batches of
trainer.batch_size rows), so on a run's split with its trainer.eval_batches this reproduces the eval the run
logged, whatever mesh or host count trained it. Used by `tpu-launch eval` (launcher/commands/eval.py).
"""
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainer.data.stream import eval_batches
from trainer.model import ModelSpec, TransformerLM
from trainer.restore import abstract_params, restore_params
from trainer.sharding import batch_sharding, make_mesh, replicated

TOP_K = 5


def eval_mesh(spec: ModelSpec, global_batch: int, devices=None):
    """A mesh over as many of this process's devices as the batch rows divide: the batch split over them all,
    the parameters sharded along `embed` (fsdp) as far as d_model divides."""
    devices = list(devices if devices is not None else jax.devices())
    n = math.gcd(len(devices), global_batch)
    fsdp = math.gcd(n, spec.d_model)
    return make_mesh({"data": n // fsdp, "fsdp": fsdp, "tensor": 1}, devices[:n])


def _make_eval_step(model, mesh, param_shardings):
    """The trainer's eval statistics (trainer/step.py) plus the top-5 hits; a separate step so training's
    compiled programs stay exactly as they are."""
    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        targets = batch["targets"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        top = jax.lax.top_k(logits, TOP_K)[1]
        top_hits = jnp.any(top == targets[..., None], axis=-1).astype(jnp.float32)
        return {"loss_sum": jnp.sum(losses), "correct": jnp.sum(correct), "top5": jnp.sum(top_hits),
                "tokens": jnp.asarray(losses.size, jnp.float32)}

    batch_sh = {"inputs": batch_sharding(mesh), "targets": batch_sharding(mesh)}
    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sh), out_shardings=replicated(mesh))


def evaluate(checkpoint_dir: str, step: Optional[int], spec: ModelSpec, data_path: str, manifest: dict,
             split: str, global_batch: int, seq_len: int, max_batches: Optional[int]) -> dict:
    """Restore the checkpoint's parameters onto this process's devices and evaluate them on `split` of
    `data_path` (at most `max_batches` global batches; None: all). eval_tokens is 0 when the split holds
    fewer records than one global batch."""
    t0 = time.time()
    mesh = eval_mesh(spec, global_batch)
    params, step = restore_params(checkpoint_dir, step, mesh, spec)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract_params(mesh, spec))
    eval_step = _make_eval_step(TransformerLM(spec, mesh), mesh, shardings)
    sharding = batch_sharding(mesh)
    totals = {"loss_sum": 0.0, "correct": 0.0, "top5": 0.0, "tokens": 0.0}
    for batch in eval_batches(data_path, split, global_batch, seq_len, 0, 1, max_batches, manifest=manifest):
        arrays = {k: jax.device_put(np.asarray(v, np.int32), sharding) for k, v in batch.items()}
        out = eval_step(params, arrays)
        for k in totals:
            totals[k] += float(out[k])
    tokens = totals["tokens"]
    loss = totals["loss_sum"] / tokens if tokens else float("nan")
    return {"step": step, "split": split, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)) if tokens else
            float("nan"), "eval_acc": totals["correct"] / tokens if tokens else float("nan"),
            "eval_top5_acc": totals["top5"] / tokens if tokens else float("nan"), "eval_tokens": int(tokens),
            "devices": int(mesh.devices.size), "eval_s": round(time.time() - t0, 4)}
