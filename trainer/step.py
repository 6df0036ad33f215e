"""The jitted train and eval steps with explicit input/output shardings."""
import jax
import jax.numpy as jnp
import optax

from trainer.sharding import batch_sharding, replicated


def _loss_and_stats(model, params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    targets = batch["targets"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return losses, correct


def make_train_step(model, tx, schedule, mesh, shardings):
    def train_step(state, batch):
        def loss_fn(params):
            losses, _ = _loss_and_stats(model, params, batch)
            return jnp.mean(losses)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    rep = replicated(mesh)
    batch_sh = {"inputs": batch_sharding(mesh), "targets": batch_sharding(mesh)}
    return jax.jit(train_step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep),
                   donate_argnums=(0,))


def make_eval_step(model, mesh, shardings):
    def eval_step(params, batch):
        losses, correct = _loss_and_stats(model, params, batch)
        return {"loss_sum": jnp.sum(losses), "correct": jnp.sum(correct),
                "tokens": jnp.asarray(losses.size, jnp.float32)}

    rep = replicated(mesh)
    batch_sh = {"inputs": batch_sharding(mesh), "targets": batch_sharding(mesh)}
    return jax.jit(eval_step, in_shardings=(shardings["params"], batch_sh), out_shardings=rep)
