"""Per-host trainer entry: `python -m trainer.main --config RUN_DIR/config.yaml --process-id I ...`.

Started by the launcher's host actor, one per host. Exit codes: 0 done, 2 user error (bad data or
checkpoint, or a checkpoint.init_from that does not fit the model: fix and relaunch), 42 restartable (a
preemption notice was honoured with a checkpoint at the step all hosts agreed on, jax.distributed could not
be joined, or storage stayed down past every retry), 1 any other failure. SIGUSR1 dumps every
thread's stack into the host's log (the supervisor's watchdog sends it to a host that stopped making progress).
"""
import argparse
import faulthandler
import logging
import os
import signal
import sys
import time

from trainer.errors import first_line
from trainer.runfiles import (EXIT_FAILED, EXIT_OK, EXIT_RESTARTABLE, EXIT_USER_ERROR, REASON_DONE, REASON_EXCEPTION,
                              REASON_INIT_FAILED, REASON_PREEMPTION, REASON_STORAGE, REASON_USER_ERROR)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m trainer.main", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="resolved run config (YAML)")
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--coordinator", required=True, help="host:port of host 0")
    p.add_argument("--devices", type=int, default=0, help="CPU devices for this process (local pods)")
    p.add_argument("--attempt", type=int, default=0)
    p.add_argument("--peak-flops", type=float, default=None,
                   help="the pod's peak FLOP/s for MFU (the launcher's: catalog or measured); unset: no MFU")
    return p.parse_args(argv)


def _setup_logging(host: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[host {host}] %(levelname)s %(name)s: %(message)s"))
    plain = logging.StreamHandler(sys.stdout)
    plain.setFormatter(logging.Formatter(f"[host {host}] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("trainer", "trainer.loop", "trainer.checkpoint"):
        logging.getLogger(name).setLevel(logging.INFO)
    prog = logging.getLogger("trainer.progress")
    prog.handlers[:] = [plain]
    prog.propagate = False
    prog.setLevel(logging.INFO)


def main(argv=None) -> int:
    start = time.time()
    args = _parse(argv if argv is not None else sys.argv[1:])
    _setup_logging(args.process_id)
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    from trainer import distributed

    distributed.watch_parent()
    if args.devices:
        distributed.set_cpu_devices(args.devices)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(args.config)
    from trainer.events import EventLog
    from trainer.goodput import GoodputLog
    from trainer.heartbeat import Heartbeat

    heartbeat = Heartbeat(cfg.run.dir, args.process_id, args.attempt,
                          float(cfg.get("watchdog", {}).get("heartbeat_s", 1.0))).start()
    events = EventLog(cfg.run.dir, args.process_id, args.attempt)
    goodput = GoodputLog(cfg.run.dir, args.attempt) if args.process_id == 0 else None
    events("process_start", pid=os.getpid(),
           megascale={k: v for k, v in sorted(os.environ.items()) if k.startswith("MEGASCALE_")})
    from trainer import compile_cache

    compile_cache.enable(cfg.trainer.get("compile_cache"))  # before anything compiles
    try:
        init_s = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                        int(cfg.trainer.init_timeout_s))
    except Exception as e:  # noqa: BLE001 - a timeout or an unreachable coordinator: restart the slice
        first = first_line(e)
        logging.getLogger("trainer").error("could not join jax.distributed at %s: %s", args.coordinator, first)
        events("error", kind="init", message=first)
        heartbeat.finish(EXIT_RESTARTABLE, REASON_INIT_FAILED)
        return EXIT_RESTARTABLE
    events("distributed_ready", seconds=round(init_s, 4))
    if goodput is not None:
        goodput("init", seconds=round(time.time() - start, 4))

    from trainer.checkpoint import CheckpointError
    from trainer.data import DataError
    from trainer.loop import Loop, write_result
    from trainer.warmstart import WarmStartError

    try:
        result = Loop(cfg, events, start, heartbeat, goodput, distributed.preemption_check(),
                      args.peak_flops).run()
    except (CheckpointError, DataError, WarmStartError) as e:
        logging.getLogger("trainer").error("%s", e)
        events("error", kind="user", message=str(e))
        heartbeat.finish(EXIT_USER_ERROR, REASON_USER_ERROR)
        return EXIT_USER_ERROR
    except Exception as e:  # noqa: BLE001 - storage that stayed down past every retry: restart, do not stop
        from trainer.data.storage import is_transient_failure

        if not is_transient_failure(e):
            heartbeat.finish(EXIT_FAILED, REASON_EXCEPTION)
            raise
        logging.getLogger("trainer").exception("storage failed past its retries; exiting to be restarted")
        events("error", kind="storage", message=str(e)[:300])
        heartbeat.finish(EXIT_RESTARTABLE, REASON_STORAGE)
        return EXIT_RESTARTABLE
    except BaseException:
        heartbeat.finish(EXIT_FAILED, REASON_EXCEPTION)
        raise
    if result.get("preempted"):
        logging.getLogger("trainer.progress").info(
            "preemption notice: all hosts stopped at step %d with a checkpoint there; exiting to be restarted",
            result["final_step"])
        heartbeat.finish(EXIT_RESTARTABLE, REASON_PREEMPTION)
        _leave_together()
        return EXIT_RESTARTABLE
    if args.process_id == 0:
        result["attempt"] = args.attempt
        write_result(cfg.run.dir, result)
    events("done", step=result["final_step"])
    heartbeat.finish(EXIT_OK, REASON_DONE)
    _leave_together()
    logging.getLogger("trainer.progress").info("done at step %d | test loss %.4f | params %s",
                                               result["final_step"], result["eval"]["eval_loss"],
                                               result["params_digest"][:16])
    return EXIT_OK


def _leave_together() -> None:
    """Leave the JAX program through its shutdown barrier, after this host's exit is on record. Host 0 runs
    the coordination service: exiting without the barrier kills it while another host may still be waiting
    for its checkpoint to finish, and that host then aborts instead of recording a clean exit."""
    import jax

    try:
        jax.distributed.shutdown()
    except Exception as e:  # noqa: BLE001 - best effort; this host's exit and checkpoint are already recorded
        logging.getLogger("trainer").warning("jax.distributed.shutdown failed: %s", first_line(e))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown of JAX/gloo threads, which can hang after a finished run.
    os._exit(code)
