"""The train/eval loop run by every host: restore or init, stream batches, step, log, evaluate, checkpoint."""
import logging
import math
import os
import time
from collections import deque
from typing import Dict, Optional

import jax
import numpy as np

from trainer import compile_cache
from trainer.checkpoint import Checkpointer
from trainer.data.stream import BatchStream, eval_batches, read_manifest
from trainer.digest import params_digest
from trainer.events import EventLog
from trainer.flops import flops_per_step, mfu
from trainer.model import ModelSpec, TransformerLM
from trainer.optim import make_optimizer
from trainer.runfiles import (METRICS, PHASE_COMPILE, PHASE_RESTORE, PHASE_SAVE_WAIT, PHASE_TRAIN, RESULT,
                              append_jsonl, eval_phase, save_phase, write_json)
from trainer.sharding import batch_shard, batch_sharding, make_mesh
from trainer.state import abstract_state, count_params, create_state, state_shardings
from trainer.step import make_eval_step, make_train_step
from trainer.tensorboard import EventWriter
from trainer.warmstart import check_shapes, locate

log = logging.getLogger("trainer.loop")
progress = logging.getLogger("trainer.progress")


class Loop:
    def __init__(self, cfg, events: EventLog, start_time: float, heartbeat=None, goodput=None, preempted=None,
                 peak_flops: Optional[float] = None):
        """heartbeat: trainer.heartbeat.Heartbeat (or None); goodput: a GoodputLog on host 0 (else None);
        preempted(step) -> bool: True on every host at the one step all hosts agreed to stop at;
        peak_flops: the whole pod's peak FLOP/s, from the launcher (None: unknown, records get "mfu": null)."""
        self.cfg, self.events, self.start_time, self.peak_flops = cfg, events, start_time, peak_flops
        self.beat = heartbeat.beat if heartbeat is not None else (lambda **k: None)
        self.goodput = goodput or (lambda *a, **k: None)
        self.preempted = preempted or (lambda step: False)
        self.run_dir = cfg.run.dir
        self.host = jax.process_index()
        self.is_host0 = self.host == 0
        self.mesh = make_mesh({"dcn": cfg.mesh.get("dcn", 1), "data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                               "tensor": cfg.mesh.tensor})
        self.spec = ModelSpec.from_config(cfg.model)
        self.model = TransformerLM(self.spec, self.mesh)  # the mesh: model.attention=auto picks splash on TPU
        self.steps = int(cfg.trainer.steps)
        self.batch = int(cfg.trainer.batch_size)
        self.seq_len = int(cfg.model.seq_len)
        self.tx, self.schedule = make_optimizer(cfg.optimizer, self.steps)
        self.data_path = cfg.data.path
        self.manifest = read_manifest(self.data_path)
        self.shard_index, self.shard_count = batch_shard(self.mesh, self.batch, self.seq_len)
        self.local_batch = self.batch // self.shard_count
        self.batch_sharding = batch_sharding(self.mesh)
        self.step_flops = flops_per_step(self.spec, self.batch, self.seq_len)
        self.tb: Optional[EventWriter] = None  # host 0's TensorBoard file, open while run() runs

    # -- data ---------------------------------------------------------------------------------------------
    def _global(self, local: Dict[str, np.ndarray]):
        shape = (self.batch, self.seq_len)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v, np.int32), shape)
                for k, v in local.items()}

    def evaluate(self, params, split: str, step: int) -> Dict[str, float]:
        t0 = time.time()
        self.beat(phase=eval_phase(split, step))
        totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
        for local in eval_batches(self.data_path, split, self.batch, self.seq_len, self.shard_index,
                                  self.shard_count, int(self.cfg.trainer.eval_batches), manifest=self.manifest):
            out = self.eval_step(params, self._global(local))
            for k in totals:
                totals[k] += float(out[k])
        if totals["tokens"] == 0:
            raise ValueError(f"data.path: split '{split}' has fewer records than one global batch "
                             f"({self.batch}); prepare more data or lower trainer.batch_size")
        loss = totals["loss_sum"] / totals["tokens"]
        result = {"split": split, "step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
                  "eval_acc": totals["correct"] / totals["tokens"], "eval_tokens": int(totals["tokens"]),
                  "time": time.time(), "eval_s": round(time.time() - t0, 4)}
        progress.info("eval %-5s step %d | loss %.4f | ppl %.2f | acc %.4f", split, step, loss,
                      result["eval_ppl"], result["eval_acc"])
        if self.is_host0:
            append_jsonl(os.path.join(self.run_dir, METRICS), result)
            self.tb.record(result)
        self.goodput("eval", seconds=result["eval_s"], split=split)
        return result

    # -- warm start ---------------------------------------------------------------------------------------
    def _warm_start(self, path: str, shardings):
        """The parameters of checkpoint.init_from (the launcher pinned it to one step directory) on this run's mesh,
        in place of the fresh ones; the optimizer state, step, RNG and data position stay fresh. Located and
        shape-checked again here: a path typed straight into a config must fail in one line too (exit 2)."""
        self.beat(phase=PHASE_RESTORE)
        t0 = time.time()
        checkpoint_dir, step = locate(path)
        check_shapes(checkpoint_dir, step, self.spec, self.seq_len)
        from trainer.restore import restore_params

        params, step = restore_params(checkpoint_dir, step, self.mesh, self.spec)
        params = _on_shardings(params, shardings)
        seconds = round(time.time() - t0, 4)
        self.goodput("restore", step=None, seconds=seconds, init_from=f"{checkpoint_dir}/{step}")
        if self.is_host0:
            progress.info("warm start: parameters of %s step %d; fresh optimizer state, step 0", checkpoint_dir, step)
            self.events("init_from", path=path, checkpoint_dir=checkpoint_dir, step=step, seconds=seconds)
        return params

    # -- main ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            if self.tb is not None:
                self.tb.close()

    def _run(self) -> dict:
        cfg, ev = self.cfg, self.events
        shardings = state_shardings(self.model, self.tx, self.mesh, self.seq_len)
        ckpt = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep, cfg.checkpoint.async_save,
                            cfg.checkpoint.get("ocdbt", True), on_event=ev)
        restored = None
        # the restore target traces the model's init: only built when there is a checkpoint to restore
        if cfg.checkpoint.resume and ckpt.steps():
            self.beat(phase=PHASE_RESTORE)
            t_restore = time.time()
            target = abstract_state(self.model, self.tx, self.mesh, self.seq_len, shardings)
            restored = ckpt.restore_latest(target)
            if restored is not None:
                self.goodput("restore", step=restored[0], seconds=round(time.time() - t_restore, 4))
        stream = BatchStream(self.data_path, "train", self.batch, self.seq_len, self.shard_index,
                             self.shard_count, int(cfg.trainer.seed), prefetch=int(cfg.data.prefetch),
                             manifest=self.manifest)
        if restored is not None:
            start_step, state, data_state = restored
            stream.restore(data_state)
            progress.info("resumed from checkpoint step %d", start_step)
            if cfg.checkpoint.init_from and self.is_host0:
                progress.info("checkpoint.init_from=%s ignored: this run resumes from its own checkpoint step %d",
                              cfg.checkpoint.init_from, start_step)
                ev("init_from_ignored", path=cfg.checkpoint.init_from, resumed_from_step=start_step)
        else:
            start_step = 0
            state, _ = create_state(self.model, self.tx, self.mesh, self.seq_len, int(cfg.trainer.seed), shardings)
            if cfg.checkpoint.init_from:
                state["params"] = self._warm_start(cfg.checkpoint.init_from, shardings["params"])
        if self.is_host0:  # a fresh file per attempt; what earlier ones logged past start_step is purged
            self.tb = EventWriter(self.run_dir, f"host{self.host}", purge_from=start_step + 1)
        n_params = count_params(state["params"])
        progress.info("model %s: %d params | mesh %s | %d hosts x %d devices | batch %d (this host %d rows)",
                      cfg.model.name, n_params, dict(self.mesh.shape), jax.process_count(),
                      jax.local_device_count(), self.batch, self.local_batch)
        self.train_step = compile_cache.Persistent(
            make_train_step(self.model, self.tx, self.schedule, self.mesh, shardings), "train_step")
        self.eval_step = compile_cache.Persistent(make_eval_step(self.model, self.mesh, shardings), "eval_step")
        ev("ready", step=start_step, since_start_s=round(time.time() - self.start_time, 4))
        self.goodput("start_step", step=start_step)
        self.beat(step=start_step, phase=PHASE_COMPILE)
        ready_time = time.time()

        log_every, eval_every, ckpt_every = (int(cfg.trainer.log_every), int(cfg.trainer.eval_every),
                                             int(cfg.checkpoint.every))
        metrics_path = os.path.join(self.run_dir, METRICS)
        final_loss: Optional[float] = None
        mark_time, mark_step, data_wait = time.time(), start_step, 0.0
        excluded = 0.0  # eval and save time since the mark: not step time
        preempted_at: Optional[int] = None
        in_flight: deque = deque()  # (step, its loss array) dispatched but maybe not finished
        try:
            for step in range(start_step, self.steps):
                t_data = time.time()
                batch = self._global(next(stream))
                data_wait += time.time() - t_data
                state, metrics = self.train_step(state, batch)
                done = step + 1
                # The heartbeat's step is the last step known *finished* (steps are dispatched asynchronously):
                # checked without blocking, so the watchdog sees real progress and lost steps are exact.
                in_flight.append((done, metrics["loss"]))
                while in_flight and in_flight[0][1].is_ready():
                    self.beat(step=in_flight.popleft()[0], phase=PHASE_TRAIN)
                first = step == start_step
                preempt = self.preempted(done)
                if first or done % log_every == 0 or done == self.steps or preempt:
                    loss = float(metrics["loss"])  # blocks until the step is finished
                    in_flight.clear()
                    self.beat(step=done, phase=PHASE_TRAIN)
                    now = time.time()
                    n = done - mark_step
                    step_time = (now - mark_time) / n
                    record = {"step": done, "loss": loss, "lr": float(metrics["lr"]),
                              "grad_norm": float(metrics["grad_norm"]), "step_time_s": step_time,
                              "tokens_per_s": self.batch * self.seq_len / step_time, "time": now,
                              "data_wait_s": data_wait / n, "mfu": mfu(self.step_flops, step_time, self.peak_flops)}
                    if first:
                        record["includes_compile"] = True
                        ev("first_step", step=done, since_start_s=round(now - self.start_time, 4),
                           compile_cache=compile_cache.stats())
                        self.goodput("startup", seconds=round(now - ready_time, 4), step=done)
                    else:
                        self.goodput("steps", **{"from": mark_step, "to": done,
                                                 "seconds": round(now - mark_time - excluded, 4),
                                                 "data_wait_s": round(data_wait, 4)})
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss} at step {done}; lower optimizer.lr")
                    final_loss = loss
                    if self.is_host0:
                        append_jsonl(metrics_path, record)
                        self.tb.record(record)
                    progress.info("step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | step %.3fs", done, self.steps,
                                  loss, record["lr"], record["tokens_per_s"], step_time)
                    mark_time, mark_step, data_wait, excluded = time.time(), done, 0.0, 0.0
                if preempt:
                    preempted_at = done
                    break
                if eval_every > 0 and done % eval_every == 0 and done != self.steps:
                    t_eval = time.time()
                    self.evaluate(state["params"], "val", done)
                    excluded += time.time() - t_eval
                    self.beat(phase=PHASE_TRAIN)
                if done % ckpt_every == 0 or done == self.steps:
                    t_save = time.time()
                    self.beat(phase=save_phase(done))
                    blocked = ckpt.save(done, state, stream.state())
                    self.goodput("save", step=done, blocking_s=round(blocked, 4))
                    excluded += time.time() - t_save
                    self.beat(phase=PHASE_TRAIN)
                ckpt.check_errors()
            if preempted_at is not None:
                # All hosts agreed on this step after a preemption notice: save exactly here, then stop.
                self.beat(phase=save_phase(preempted_at))
                blocked = ckpt.save(preempted_at, state, stream.state())
                self.goodput("save", step=preempted_at, blocking_s=round(blocked, 4))
            t_wait = time.time()
            self.beat(phase=PHASE_SAVE_WAIT)
            ckpt.wait()
            self.goodput("save", step=None, blocking_s=round(time.time() - t_wait, 4))
        finally:
            stream.close()
        if preempted_at is not None:
            ev("preempted", step=preempted_at)
            self.goodput("end", step=preempted_at, preempted=True)
            ckpt.close()
            return {"preempted": True, "final_step": preempted_at}
        final_step = int(state["step"])
        if final_step != self.steps:
            log.warning("checkpoint is at step %d, beyond trainer.steps=%d: nothing to train", final_step,
                        self.steps)
        test = self.evaluate(state["params"], "test", final_step)
        val = self.evaluate(state["params"], "val", final_step)
        digest = params_digest(state["params"])
        ckpt.close()
        self.goodput("end", step=final_step)
        return {"final_step": final_step, "final_loss": final_loss, "eval": test, "val": val,
                "params_digest": digest, "params": n_params,
                "resumed_from_step": restored[0] if restored is not None else None,
                "checkpoints": ckpt.steps()}


def _on_shardings(params, shardings):
    """params with exactly the shardings the fresh ones had, which the train step is compiled for (as restored
    when the restore already placed them so; else resharded inside jit, which works across hosts)."""
    leaves, wanted = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings)
    if all(x.sharding == s for x, s in zip(leaves, wanted)):
        return params
    return jax.jit(lambda tree: tree, out_shardings=shardings)(params)


def write_result(run_dir: str, result: dict) -> None:
    write_json(os.path.join(run_dir, RESULT), result)
