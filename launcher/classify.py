"""Why an attempt failed, from evidence, and whether (and how) to restart it.

Evidence, strongest first: the provider's node state (PREEMPTED, TERMINATED, REPAIRING, ... or gone), Ray
node death or a drain for preemption, a watchdog hang, then the hosts' exit codes: 42 (the trainer honoured a
preemption notice, could not join jax.distributed, or storage stayed down past its retries) and 128+n (killed
by signal n) are restartable; any other code is a user error: stop and show that host's traceback. A host
whose actor died shows HOST_LOST.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from trainer.runfiles import EXIT_RESTARTABLE, PHASE_INIT, REASON_INIT_FAILED, REASON_STORAGE

HOST_LOST = -1  # the host's actor or Ray node died: no exit code
HEALTHY_NODE_STATES = {"READY", "CREATING", "STARTING", "RESTARTING"}

PREEMPTION, CRASH, HANG, TIMEOUT, STORAGE, USER_ERROR = ("preemption", "crash", "hang", "timeout", "storage",
                                                        "user_error")


@dataclass
class Failure:
    cause: str  # preemption | crash | hang | timeout | storage | user_error
    host: Optional[int]  # the host whose log tells the story (None: the whole slice)
    detail: str
    reprovision: bool = False  # the slice's nodes are gone or unhealthy: provision again, do not reuse

    @property
    def restartable(self) -> bool:
        return self.cause != USER_ERROR


@dataclass
class Evidence:
    codes: Dict[int, int] = field(default_factory=dict)  # process id -> exit code (HOST_LOST: actor died)
    node_states: Dict[str, str] = field(default_factory=dict)  # provider node -> state (cloud only)
    dead_hosts: List[int] = field(default_factory=list)  # hosts whose Ray node is dead
    drained_hosts: List[int] = field(default_factory=list)  # hosts whose Ray node was drained for preemption
    hung_hosts: List[int] = field(default_factory=list)  # hosts without progress past the watchdog timeout
    reasons: Dict[int, str] = field(default_factory=dict)  # process id -> reason the trainer gave on exit
    phases: Dict[int, str] = field(default_factory=dict)  # process id -> its heartbeat's last phase
    times: Dict[int, float] = field(default_factory=dict)  # process id -> when it exited or went silent (heartbeat)


def classify(ev: Evidence) -> Failure:
    bad_nodes = {n: s for n, s in ev.node_states.items() if s not in HEALTHY_NODE_STATES}
    if bad_nodes:
        desc = ", ".join(f"{n} {s}" for n, s in sorted(bad_nodes.items()))
        return Failure(PREEMPTION, None, f"TPU node {desc}", reprovision=True)
    if ev.dead_hosts:
        return Failure(PREEMPTION, ev.dead_hosts[0], f"Ray node of host {ev.dead_hosts[0]} died",
                       reprovision=True)
    if ev.drained_hosts:
        return Failure(PREEMPTION, ev.drained_hosts[0],
                       f"Ray node of host {ev.drained_hosts[0]} drained for preemption", reprovision=True)
    if ev.hung_hosts:
        return Failure(HANG, ev.hung_hosts[0], f"no progress on host(s) {ev.hung_hosts} (watchdog)")
    # Hosts in the order they failed (their heartbeats' times; by host number where unknown): the first to go is
    # the cause, the others' errors (a peer vanished from a collective) follow from it.
    order = sorted(ev.codes, key=lambda i: (ev.times.get(i, float("inf")), i))
    failed = {i: ev.codes[i] for i in order if ev.codes[i] != 0}
    if not failed:
        return Failure(CRASH, None, "the hosts stopped without a failure code")
    lost = [i for i, c in failed.items() if c == HOST_LOST]
    if lost:
        return Failure(PREEMPTION, lost[0], f"host {lost[0]} was lost with its Ray actor", reprovision=True)
    restartable = [i for i, c in failed.items() if c == EXIT_RESTARTABLE]
    if restartable:
        i = restartable[0]
        reason = ev.reasons.get(i, "")
        cause = TIMEOUT if reason == REASON_INIT_FAILED else STORAGE if reason == REASON_STORAGE else PREEMPTION
        return Failure(cause, i, f"host {i} exited with code 42 ({reason or 'restartable'})")
    signalled = [i for i, c in failed.items() if c > 128]
    if signalled:  # the others' errors (a peer vanished from a collective) follow from this one
        i = signalled[0]
        if ev.phases.get(i) == PHASE_INIT and failed[i] == 128 + 6:  # jax.distributed aborts when it cannot join
            return Failure(TIMEOUT, i, f"host {i} aborted while joining jax.distributed (trainer.init_timeout_s)")
        return Failure(CRASH, i, f"host {i} was killed by signal {failed[i] - 128} (exit code {failed[i]})")
    i = next(iter(failed))
    return Failure(USER_ERROR, i, f"host {i} exited with code {failed[i]}")


class Budget:
    """Restart budgets: preemptions (default unlimited) and other restartable failures, with backoff."""

    def __init__(self, max_preemptions: int, max_failures: int, backoff_s: float, backoff_max_s: float):
        self.max_preemptions, self.max_failures = int(max_preemptions), int(max_failures)
        self.backoff_s, self.backoff_max_s = float(backoff_s), float(backoff_max_s)
        self.used: Dict[str, int] = {}
        self.in_a_row = 0

    def allow(self, failure: Failure) -> Optional[str]:
        """Count the failure; None if a restart is allowed, else why not."""
        if not failure.restartable:
            return f"{failure.detail}: not restartable (a user error)"
        self.used[failure.cause] = self.used.get(failure.cause, 0) + 1
        if failure.cause == PREEMPTION:
            if 0 <= self.max_preemptions < self.used[PREEMPTION]:
                return f"{failure.detail}: preemption budget spent (supervisor.max_preemptions={self.max_preemptions})"
        else:
            spent = sum(n for c, n in self.used.items() if c != PREEMPTION)
            if spent > self.max_failures:
                return (f"{failure.detail}: failure budget spent ({spent} crashes, hangs or timeouts; "
                        f"supervisor.max_failures={self.max_failures})")
        return None

    def backoff(self, made_progress: bool) -> float:
        """Seconds to wait before the next start: doubles with each failure in a row that made no progress."""
        self.in_a_row = 0 if made_progress else self.in_a_row + 1
        return min(self.backoff_max_s, self.backoff_s * (2 ** self.in_a_row))
