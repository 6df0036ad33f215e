"""Optax AdamW with linear warmup + cosine decay and global-norm gradient clipping, built from config."""
import optax


def make_schedule(o, total_steps: int) -> optax.Schedule:
    decay_steps = int(o.decay_steps) if o.get("decay_steps") is not None else int(total_steps)
    warmup = min(int(o.warmup_steps), max(decay_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(o.lr), warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1), end_value=float(o.lr) * float(o.min_lr_ratio))


def make_optimizer(o, total_steps: int):
    schedule = make_schedule(o, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(float(o.clip_norm)),
        optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                    weight_decay=float(o.weight_decay),
                    mask=lambda params: _decay_mask(params)),
    )
    return tx, schedule


def _decay_mask(params):
    """Decay matrices only (not norm scales)."""
    import jax

    return jax.tree_util.tree_map_with_path(
        lambda path, x: not any(getattr(k, "key", None) == "scale" for k in path), params)
