"""Orbax checkpoints: async saves of (train state, data iterator state); restore newest readable, else older.

A checkpoint step directory only becomes visible to `all_steps()` once orbax has finalised it
(atomic rename locally, commit marker on GCS), so a kill during a save never yields a step that looks complete.
"""
import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

import orbax.checkpoint as ocp

from trainer.data.storage import is_transient_failure
from trainer.errors import first_line

log = logging.getLogger("trainer.checkpoint")


class CheckpointError(Exception):
    """No checkpoint in the directory could be read: the run must not silently restart at step 0."""


class CheckpointSaveError(Exception):
    """A save did not produce a complete checkpoint (orbax can drop async errors; we verify instead)."""


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True, ocdbt: bool = True,
                 on_event: Optional[Callable[..., None]] = None):
        self.directory = directory
        self._event = on_event or (lambda *a, **k: None)
        self._unverified: Optional[int] = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), enable_async_checkpointing=bool(async_save), create=True)
        self.manager = ocp.CheckpointManager(
            directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(use_ocdbt=bool(ocdbt)),
                           "data": ocp.JsonCheckpointHandler()})

    def steps(self):
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Dict[str, Any], data_state: Dict[str, Any]) -> float:
        """Start a save; returns seconds the training loop was blocked."""
        t0 = time.time()
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
        blocked = time.time() - t0
        self._event("save_start", step=step, blocking_s=round(blocked, 4))
        # orbax finishes the previous async save before starting this one: verify that it landed.
        if self._unverified is not None and self._unverified != step:
            self._verify(self._unverified)
        self._unverified = step
        return blocked

    def _verify(self, step: int) -> None:
        import jax

        if jax.process_index() != 0:  # the primary host finalises (commits) checkpoints; it checks them
            return
        self.manager.reload()
        if step not in self.manager.all_steps():
            raise CheckpointSaveError(f"checkpoint step {step} was not written completely to {self.directory} "
                                      f"(see the errors above); the run stops rather than go on unprotected")
        self._event("save_done", step=step)

    def check_errors(self) -> None:
        """Surface an async save failure in the main loop (orbax re-raises it here)."""
        self.manager.check_for_errors()

    def wait(self) -> None:
        t0 = time.time()
        self.manager.wait_until_finished()
        self.check_errors()
        self._event("save_wait", wait_s=round(time.time() - t0, 4))
        if self._unverified is not None:
            self._verify(self._unverified)
            self._unverified = None

    def restore_latest(self, abstract_state) -> Optional[Tuple[int, Dict[str, Any], Dict[str, Any]]]:
        """Newest readable checkpoint as (step, state, data_state); None if there is none at all."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            t0 = time.time()
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
                if is_transient_failure(e):  # storage kept failing past its retries: the checkpoint may be fine
                    raise
                first = first_line(e)
                log.warning("checkpoint step %d in %s could not be read (%s: %s); trying an older one",
                            step, self.directory, type(e).__name__, first)
                self._event("restore_failed", step=step, error=f"{type(e).__name__}: {first}")
                failures.append(step)
                continue
            self._event("restore", step=step, seconds=round(time.time() - t0, 4), skipped=failures)
            if failures:
                self._set_aside(failures)
            return step, restored["state"], dict(restored["data"])
        if steps:
            raise CheckpointError(
                f"checkpoint.dir: none of the checkpoints {steps} in {self.directory} could be read; "
                f"nothing was deleted. Fix or move them, or set checkpoint.dir to a new location")
        return None

    def _set_aside(self, steps) -> None:
        """Move unreadable checkpoints newer than the one restored out of the way (never delete them),
        so the resumed run can save those steps again."""
        import jax
        from jax.experimental import multihost_utils

        root = self.directory.rstrip("/")
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                src, dst = f"{root}/{step}", f"{root}.unreadable/{step}-{stamp}"
                _move(src, dst)
                log.warning("moved unreadable checkpoint %s to %s", src, dst)
                self._event("checkpoint_set_aside", step=step, to=dst)
        multihost_utils.sync_global_devices("checkpoint-set-aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def _move(src: str, dst: str) -> None:
    if src.startswith("gs://"):
        from trainer.data.storage import move_tree  # each GCS request retried on transient errors

        move_tree(src, dst)
    else:
        import os

        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)
