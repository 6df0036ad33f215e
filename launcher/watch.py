"""The supervisor's watch over one attempt: exit codes, heartbeats (the step watchdog), Ray node death and drains.

Returns when every host has exited, or at the first sign of failure: at once for a host killed by a signal,
lost, or hung; after `settle_s` for an error exit (a peer's death shows first as an error in a collective, so
the others' codes are evidence too); after up to `notice_grace_s` for exit 42 (the other hosts are finishing
the checkpoint they agreed on). A host with no progress (its heartbeat's step
or phase unchanged) for `watchdog.timeout_s` (`startup_timeout_s` before its first step) gets SIGUSR1, which
makes the trainer dump every thread's stack into its log, and the attempt ends as a hang. A host whose Ray node
is drained for preemption gets SIGTERM, the trainers' preemption notice.
"""
import signal
import time
from typing import Callable, List, Optional

import ray

from launcher.classify import HOST_LOST, Evidence
from trainer.runfiles import EXIT_RESTARTABLE, PHASE_EXITED, PHASE_INIT, STARTUP_PHASES


def _draining_node_ids(timeout_s: int = 5) -> set:
    """Hex ids of the Ray nodes being drained (e.g. `ray drain-node`, or the autoscaler before a preemption).

    From the cluster status the GCS reports (what `ray status` shows, ray.autoscaler.v2.sdk): a node being
    drained has node_status "DRAINING" until it dies. ray.nodes() and the state API show no drain.
    """
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=timeout_s)
        return {n.node_id for n in list(status.active_nodes) + list(status.idle_nodes)
                if n.node_id and n.node_status == "DRAINING"}
    except Exception:  # noqa: BLE001 - an older Ray or a GCS hiccup: no drain evidence this time
        return set()


def _alive_node_ids() -> Optional[set]:
    try:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:  # noqa: BLE001
        return None


class Watch:
    def __init__(self, pod, refs: List, attempt: int, read_heartbeat: Callable[[int], Optional[dict]],
                 timeout_s: float, startup_timeout_s: float, on_poll: Optional[Callable[[], None]] = None,
                 poll_s: float = 0.5, settle_s: float = 3.0, node_check_s: float = 2.0,
                 notice_grace_s: float = 60.0, say=print):
        self.pod, self.refs, self.attempt = pod, refs, attempt
        self.read_heartbeat, self.on_poll, self.say = read_heartbeat, on_poll, say
        self.timeout_s, self.startup_timeout_s = float(timeout_s), float(startup_timeout_s)
        self.poll_s, self.settle_s, self.node_check_s = poll_s, settle_s, node_check_s
        self.notice_grace_s = notice_grace_s
        self.started = time.time()
        self.evidence = Evidence()
        self.max_step: Optional[int] = None
        self._signalled: set = set()

    def run(self) -> Evidence:
        pending = dict(enumerate(self.refs))
        ev = self.evidence
        failed_at: Optional[float] = None
        next_node_check = time.time() + self.node_check_s
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=self.poll_s)
            for ref in ready:
                i = next(k for k, v in pending.items() if v == ref)
                del pending[i]
                try:
                    ev.codes[i] = int(ray.get(ref))
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError):
                    ev.codes[i] = HOST_LOST
            if self.on_poll is not None:
                self.on_poll()
            self._read_heartbeats(pending)
            now = time.time()
            if now >= next_node_check:
                self._check_nodes(pending)
                next_node_check = now + self.node_check_s
            codes = set(ev.codes.values()) - {0}
            if ev.dead_hosts or ev.hung_hosts or any(c > 128 or c == HOST_LOST for c in codes):
                break
            if codes and failed_at is None:
                failed_at = now
            if failed_at is not None:
                wait_s = self.notice_grace_s if codes == {EXIT_RESTARTABLE} else self.settle_s
                if now - failed_at >= wait_s:
                    break
        self._read_heartbeats(range(len(self.refs)))
        return ev

    def _read_heartbeats(self, hosts) -> None:
        now = time.time()
        for i in list(hosts):
            hb = self.read_heartbeat(i)
            if hb is None or hb.get("attempt") != self.attempt:
                progress, phase = self.started, PHASE_INIT
            else:
                progress, phase = float(hb.get("progress_time") or self.started), hb.get("phase") or PHASE_INIT
                self.evidence.phases[i] = phase
                if hb.get("step") is not None:
                    self.max_step = max(self.max_step or 0, int(hb["step"]))
                if hb.get("exit"):
                    self.evidence.reasons[i] = hb["exit"].get("reason", "")
            limit = self.startup_timeout_s if phase in STARTUP_PHASES else self.timeout_s
            if i in self.evidence.codes or phase == PHASE_EXITED or now - progress <= limit:
                continue
            if i not in self.evidence.hung_hosts:
                self.evidence.hung_hosts.append(i)
        if self.evidence.hung_hosts and "hang" not in self._signalled:
            self._signalled.add("hang")
            self.say(f"watchdog: no progress on host(s) {self.evidence.hung_hosts} for more than "
                     f"{self.timeout_s:.0f}s; dumping their stacks into their logs")
            self.pod.signal(range(len(self.refs)), signal.SIGUSR1)
            time.sleep(1.0)  # let faulthandler write

    def _check_nodes(self, pending) -> None:
        alive = _alive_node_ids()
        if alive is not None:
            for i in pending:
                if self.pod.infos[i]["node_id"] not in alive and i not in self.evidence.dead_hosts:
                    self.evidence.dead_hosts.append(i)
        draining = _draining_node_ids()
        for i in pending:
            if self.pod.infos[i]["node_id"] in draining and i not in self.evidence.drained_hosts:
                self.evidence.drained_hosts.append(i)
                self.say(f"host {i}'s Ray node is being drained for preemption: notice sent (SIGTERM)")
                self.pod.signal([i], signal.SIGTERM)
