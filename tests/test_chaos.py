"""Chaos tests on the local pod (2 hosts): real processes killed, stopped and preempted mid-run.

Each run must end `status: completed` with a `params_digest` equal to an uninterrupted reference run.
"""
import os
import random
import signal
import time

import pytest

from chaos import Chaos
from podutil import TINY, explain, launch, read_json, read_jsonl

pytestmark = pytest.mark.integration

RUN = [*TINY, "trainer.steps=40", "optimizer.decay_steps=40", "optimizer.warmup_steps=4", "checkpoint.every=5",
       "trainer.eval_every=10"]
FAST = ["watchdog.heartbeat_s=0.1", "supervisor.backoff_s=0.2", "supervisor.max_failures=5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_cache):
    run_dir = str(tmp_path_factory.mktemp("chaos") / "ref")
    proc = launch("run.name=ref", f"run.dir={run_dir}", *RUN)
    assert proc.returncode == 0, explain(proc)
    return read_json(os.path.join(run_dir, "summary.json"))


def _summary(chaos: Chaos, code: int) -> dict:
    assert code == 0, chaos.output()[-5000:]
    summary = read_json(os.path.join(chaos.run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["final_step"] == 40, summary
    return summary


def _failures(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "goodput.jsonl")) if r["kind"] == "failure"]


def test_sigkill_random_hosts_several_times(tmp_path, reference):
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "4")))
    run_dir = str(tmp_path / "kill")
    chaos = Chaos(run_dir, "run.name=kill", f"run.dir={run_dir}", *RUN, *FAST)
    first = rng.randint(3, 12)
    chaos.signal_host(rng.randint(0, 1), signal.SIGKILL, attempt=0, step=first)
    # the second kill lands while a checkpoint is being saved
    chaos.signal_host(rng.randint(0, 1), signal.SIGKILL, attempt=1, phase="save-")
    chaos.signal_host(rng.randint(0, 1), signal.SIGKILL, attempt=2, step=rng.randint(first + 8, 34))
    summary = _summary(chaos, chaos.finish())
    assert summary["params_digest"] == reference["params_digest"]
    assert summary["restarts"] == {"crash": 3, "total": 3}, summary["restarts"]
    assert [f["cause"] for f in summary["failures"]] == ["crash"] * 3
    assert summary["attempts"] == 4 and summary["goodput"] > 0
    out = chaos.output()
    assert out.count("restarting from the newest checkpoint") == 3
    assert "killed by signal 9" in out


def test_sigterm_is_a_preemption_notice_with_no_lost_steps(tmp_path, reference):
    run_dir = str(tmp_path / "term")
    chaos = Chaos(run_dir, "run.name=term", f"run.dir={run_dir}", *RUN, *FAST)
    chaos.signal_host(1, signal.SIGTERM, attempt=0, step=13)
    summary = _summary(chaos, chaos.finish())
    assert summary["params_digest"] == reference["params_digest"]
    assert summary["restarts"] == {"preemption": 1, "total": 1} and summary["lost_steps"] == 0
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    agreed = {e["step"] for e in events if e["event"] == "preempted"}
    assert len(agreed) == 1, agreed  # both hosts stopped at the same step
    step = agreed.pop()
    assert step >= 13
    restores = [e for e in events if e["event"] == "restore" and e["attempt"] == 1]
    assert restores and all(e["step"] == step for e in restores)
    assert summary["resumed_from_step"] == step


def test_sigstop_hang_is_caught_by_the_watchdog(tmp_path, reference):
    run_dir = str(tmp_path / "stop")
    chaos = Chaos(run_dir, "run.name=stop", f"run.dir={run_dir}", *RUN, *FAST, "watchdog.timeout_s=6")
    beat = chaos.signal_host(1, signal.SIGSTOP, attempt=0, step=12)
    summary = _summary(chaos, chaos.finish())
    assert summary["params_digest"] == reference["params_digest"]
    assert summary["restarts"] == {"hang": 1, "total": 1}
    assert "watchdog: no progress on host(s)" in chaos.output()
    # host 0, stuck in a collective waiting for host 1, dumped its stacks into its log
    log0 = open(os.path.join(run_dir, "logs", "host-0.log")).read()
    assert "most recent call first" in log0
    with pytest.raises(ProcessLookupError):  # the stopped process was killed, not left behind
        for _ in range(50):
            os.kill(beat["pid"], 0)
            time.sleep(0.1)


def test_supervisor_killed_and_command_typed_again(tmp_path, reference):
    run_dir = str(tmp_path / "sup")
    args = ("run.name=sup", f"run.dir={run_dir}", *RUN, *FAST)
    chaos = Chaos(run_dir, *args)
    chaos.until(attempt=0, step=12)
    chaos.proc.kill()
    chaos.proc.wait()
    again = Chaos(run_dir, *args)
    summary = _summary(again, again.finish())
    assert summary["params_digest"] == reference["params_digest"]
    assert "previous supervisor" in again.output() and "taking over" in again.output()
    assert summary["launches"] == 2
    assert summary["restarts"].get("supervisor_lost") == 1
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    assert any(e["event"] == "lock_taken_over" for e in events)
    assert summary["resumed_from_step"] >= 5


def test_ray_drain_for_preemption_is_a_notice(tmp_path, reference):
    """A Ray drain of a host's node for preemption (what Ray's autoscaler does before a VM goes): the
    supervisor sends that host the notice, all hosts checkpoint at one step, and the host is replaced."""
    import subprocess
    import sys

    run_dir = str(tmp_path / "drain")
    chaos = Chaos(run_dir, "run.name=drain", f"run.dir={run_dir}", *RUN, *FAST)
    # Early, so the run is still training when the drain shows (the `ray drain-node` CLI itself takes seconds to
    # start, and the supervisor looks at node status every 2 s).
    chaos.until(attempt=0, step=3, host=1)
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    address = next(e["address"] for e in events if e["event"] == "ray_ready")
    placed = next(e["hosts"] for e in events if e["event"] == "hosts_placed")
    node = next(h["node_id"] for h in placed if h["worker_id"] == 1)
    drain = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node",
                            f"--address={address}", f"--node-id={node}",
                            "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot VM reclaimed",
                            "--deadline-remaining-seconds=60"], capture_output=True, text=True, timeout=60,
                           # the pod listens on loopback only and takes the run's own token (its record)
                           env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                "RAY_AUTH_TOKEN_PATH": os.path.join(run_dir, "auth", "ray_token")})
    assert drain.returncode == 0, drain.stderr
    summary = _summary(chaos, chaos.finish())
    assert summary["params_digest"] == reference["params_digest"]
    assert summary["restarts"] == {"preemption": 1, "total": 1} and summary["lost_steps"] == 0
    assert "drained for preemption" in summary["failures"][0]["detail"]
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    assert len({e["step"] for e in events if e["event"] == "preempted"}) == 1
    replaced = [e for e in events if e["event"] == "reprovisioned"]
    assert replaced and replaced[0]["replaced"] == [node]
    placed_again = [e["hosts"] for e in events if e["event"] == "hosts_placed"][-1]
    assert node not in {h["node_id"] for h in placed_again}


def test_gce_maintenance_event_is_a_notice(tmp_path, reference):
    """The metadata server announces host maintenance: the host actors send their trainers SIGTERM; the
    hosts checkpoint at one step and the run resumes with no step lost."""
    from metadata_server import MetadataServer

    run_dir = str(tmp_path / "maint")
    with MetadataServer() as md:
        chaos = Chaos(run_dir, "run.name=maint", f"run.dir={run_dir}", *RUN, *FAST,
                      env={"LAUNCHER_METADATA_URL": md.url})
        chaos.until(attempt=0, step=10)
        md.values["maintenance-event"] = "TERMINATE_ON_HOST_MAINTENANCE"
        chaos.until(attempt=1, step=1)
        md.values["maintenance-event"] = "NONE"  # the maintenance is over
        summary = _summary(chaos, chaos.finish())
    assert summary["params_digest"] == reference["params_digest"]
    assert summary["restarts"] == {"preemption": 1, "total": 1} and summary["lost_steps"] == 0
    assert "GCE notice: maintenance-event TERMINATE_ON_HOST_MAINTENANCE" in open(
        os.path.join(run_dir, "logs", "host-0.log")).read()


def test_ctrl_c_saves_at_an_agreed_step_and_the_command_resumes_there(tmp_path, reference):
    run_dir = str(tmp_path / "ctrlc")
    args = ("run.name=ctrlc", f"run.dir={run_dir}", *RUN, *FAST)
    chaos = Chaos(run_dir, *args)
    chaos.until(attempt=0, step=12)
    chaos.ctrl_c()
    assert chaos.finish() == 1
    stopped = read_json(os.path.join(run_dir, "summary.json"))
    assert stopped["status"] == "stopped"
    step = int(stopped["error"].split("checkpoint at step ")[1].split(":")[0])
    assert 12 <= step < 40 and str(step) in os.listdir(os.path.join(run_dir, "checkpoints"))
    again = Chaos(run_dir, *args)
    summary = _summary(again, again.finish())
    assert summary["resumed_from_step"] == step and summary["lost_steps"] == 0
    assert summary["params_digest"] == reference["params_digest"]


def test_restart_with_host_local_run_dirs_syncs_each_line_once(tmp_path, reference):
    """The cloud layout (hosts keep their own run dirs, synced back through Ray) across a restart: nothing of
    the first attempt is synced twice, so the ledger and the events stay true."""
    run_dir = str(tmp_path / "local-dirs")
    chaos = Chaos(run_dir, "run.name=ldirs", f"run.dir={run_dir}", *RUN, *FAST, "cluster.shared_run_dir=false",
                  f"cluster.host_run_root={tmp_path / 'vm-disks'}")
    chaos.signal_host(1, signal.SIGKILL, attempt=0, step=12)
    summary = _summary(chaos, chaos.finish())
    assert summary["params_digest"] == reference["params_digest"]
    assert summary["restarts"] == {"crash": 1, "total": 1}
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    starts = [(e["host"], e["attempt"]) for e in events if e["event"] == "process_start"]
    assert sorted(starts) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    ledger = read_jsonl(os.path.join(run_dir, "goodput.jsonl"))
    steps = [(r["attempt"], r["from"], r["to"]) for r in ledger if r["kind"] == "steps"]
    assert len(steps) == len(set(steps))
