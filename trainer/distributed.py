"""Per-host process setup: CPU device count, gloo collectives, jax.distributed.initialize, parent watch."""
import logging
import os
import socket
import sys
import threading
import time

log = logging.getLogger("trainer.distributed")


def set_cpu_devices(n: int) -> None:
    """Must run before jax is imported: N CPU devices for this process (the local stand-in for TPU chips)."""
    if "jax" in sys.modules:
        raise RuntimeError("set_cpu_devices must be called before importing jax")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={int(n)}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def wait_for_coordinator(coordinator: str, timeout_s: float, poll_s: float = 0.25) -> None:
    """Wait until host 0's coordinator accepts connections; TimeoutError otherwise.

    jax.distributed aborts the whole process (SIGABRT, no exception) when it cannot register in time; checking
    reachability first turns the common case (host 0 never came up) into an exception the trainer reports
    as a restartable exit.
    """
    host, _, port = coordinator.rpartition(":")
    deadline = time.time() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout_s)):
                return
        except OSError:
            if time.time() >= deadline:
                raise TimeoutError(f"the coordinator {coordinator} was not reachable within {timeout_s:.0f}s "
                                   f"(trainer.init_timeout_s)") from None
            time.sleep(poll_s)


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: int) -> float:
    """Join the JAX program of all hosts; returns seconds taken. Host 0 serves as coordinator."""
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    t0 = time.time()
    if int(process_id) != 0:
        wait_for_coordinator(coordinator, float(timeout_s))
    remaining = max(1, int(timeout_s - (time.time() - t0)))
    # Host 0 serves the coordinator on the address the others dial (loopback on a local pod, the TPU VM's
    # internal address in the cloud), not on every interface, which is jax's default.
    bind = coordinator if int(process_id) == 0 else None
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                               process_id=int(process_id), initialization_timeout=remaining,
                               coordinator_bind_address=bind)
    return time.time() - t0


def preemption_check():
    """`check(step) -> bool`, to call after every step on every host. After a preemption notice (SIGTERM) to
    any host, it returns True on all hosts at the same step (JAX's coordination-service preemption sync point),
    where they checkpoint and stop."""
    from jax.experimental import multihost_utils

    def check(step: int) -> bool:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))

    return check


def watch_parent(poll_s: float = 0.5, exit_code: int = 137) -> None:
    """Exit when the process that started us (the host's Ray actor) dies, so no trainer is orphaned."""
    parent = os.getppid()

    def loop():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(exit_code)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()
