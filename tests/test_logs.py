"""`tpu-launch logs`: a chosen host's log, and --first-error on a real run where host 1 raised (a data shard that
only host 1 reads is missing), whose failed status `tpu-launch status` shows too (one failed run for both)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from podutil import ROOT, TINY, explain, launch, read_json, tpu_launch

STEPS, BATCH, HOSTS, SEED = 12, 8, 2, 0


def _train_records(manifest: dict, host: int, steps) -> set:
    """The train records `host` reads at `steps`, in the order trainer/data/stream.py documents: sample i is
    perm_0[i] (first epoch), step s is samples s*B..(s+1)*B-1, host p gets rows p*B/H..(p+1)*B/H-1."""
    n = sum(s["records"] for s in manifest["splits"]["train"]["shards"])
    perm = np.random.default_rng([SEED, 0]).permutation(n)
    local = BATCH // HOSTS
    return {int(perm[s * BATCH + host * local + k]) for s in steps for k in range(local)}


def _shard_of(manifest: dict, record: int) -> str:
    first = 0
    for shard in manifest["splits"]["train"]["shards"]:
        if record < first + shard["records"]:
            return shard["name"]
        first += shard["records"]
    raise AssertionError(record)


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory, corpus_cache):
    """A 2-host run whose host 1 raises at its first batch: a train shard only host 1 reads (within the whole run)
    was deleted from the dataset, so host 1's reader hits FileNotFoundError while host 0 waits for it."""
    base = tmp_path_factory.mktemp("failed")
    data = str(base / "data")
    prep = subprocess.run([sys.executable, "-m", "trainer.data", "prepare", "--stdlib", "--output", data,
                           "--records-per-shard", "16", "--max-bytes", "1500000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr
    manifest = read_json(os.path.join(data, "manifest.json"))
    host0 = {_shard_of(manifest, r) for r in _train_records(manifest, 0, range(STEPS))}
    victim = sorted({_shard_of(manifest, r) for r in _train_records(manifest, 1, [0])} - host0)[0]
    os.remove(os.path.join(data, victim))
    run_dir = str(base / "failed")
    overrides = [o for o in TINY if not o.startswith(("data.", "trainer.batch_size="))]
    proc = launch("run.name=failed", f"run.dir={run_dir}", *overrides, "data=shards", f"data.path={data}",
                  f"trainer.steps={STEPS}", f"trainer.seed={SEED}", f"trainer.batch_size={BATCH}")
    assert proc.returncode != 0, explain(proc)
    return run_dir, victim


def test_first_error_names_host_1_with_its_error_and_traceback(failed_run):
    run_dir, victim = failed_run
    proc = tpu_launch("logs", run_dir, "--first-error")
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("host 1 failed first: attempt 0 at ") and "exit code 1" in lines[0], proc.stdout
    assert lines[1] == f"log: {os.path.join(run_dir, 'logs', 'host-1.log')}"
    assert lines[2].startswith("first error: FileNotFoundError") and victim in lines[2], proc.stdout
    assert "Traceback (most recent call last):" in lines[3:] and "stream.py" in proc.stdout
    assert lines[-1].startswith("FileNotFoundError") and victim in lines[-1]
    # the supervisor blamed the same host, in the run's own records
    failure = [json.loads(line) for line in open(os.path.join(run_dir, "events.jsonl"))
               if '"failure"' in line][-1]
    assert failure["blamed"] == 1 and failure["cause"] == "user_error"


def test_status_of_the_failed_run(failed_run):
    run_dir, _ = failed_run
    proc = tpu_launch("status", "--json", run_dir)
    assert proc.returncode == 0, explain(proc)
    st = json.loads(proc.stdout)
    assert (st["state"], st["total"], st["hosts"], st["hosts_alive"]) == ("failed", STEPS, 2, 0)
    assert st["restarts"] == {}  # a user error is not restarted


def test_logs_of_a_chosen_host(trained_run):
    proc = tpu_launch("logs", trained_run, "--host", "1")
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == open(os.path.join(trained_run, "logs", "host-1.log"), errors="replace").read()
    assert "[host 1]" in proc.stdout and "[host 0]" not in proc.stdout
    default = tpu_launch("logs", "trained", "--root", os.path.dirname(trained_run))  # a run by name: host 0
    assert default.returncode == 0 and "[host 0] done at step 12" in default.stdout


def test_first_error_of_a_run_without_failure(trained_run):
    proc = tpu_launch("logs", trained_run, "--first-error")
    assert (proc.returncode, proc.stdout) == (0, f"no failure in run {trained_run}\n")


def test_logs_follow_of_a_finished_run_prints_the_log_and_ends(trained_run):
    proc = tpu_launch("logs", trained_run, "--follow")
    assert proc.returncode == 0 and "[host 0] done at step 12" in proc.stdout


def test_bad_host_and_missing_run_are_one_line_exit_2(trained_run, tmp_path):
    for args in (("logs", trained_run, "--host", "7"), ("logs", trained_run, "--host", "-1"),
                 ("logs", str(tmp_path / "nothing")), ("status", str(tmp_path / "nothing"))):
        proc = tpu_launch(*args)
        assert proc.returncode == 2, (args, explain(proc))
        assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert "host 7" in tpu_launch("logs", trained_run, "--host", "7").stderr


def test_first_error_of_a_log_is_in_its_last_traceback():
    from launcher.blame import first_error

    log = "\n".join([
        "[host 1] step 2/8", "Traceback (most recent call last):", '  File "a.py", line 1, in <module>',
        "ValueError: an earlier attempt's", "[host 1] step 4/8",
        "[host 1] ERROR trainer: could not read shard x", "Traceback (most recent call last):",
        '  File "b.py", line 2, in f', "    g()", "OSError: shard x", "[hygiene] after"])
    line, traceback = first_error(log)
    assert line == "[host 1] ERROR trainer: could not read shard x"
    assert traceback == log.splitlines()[6:10]
    assert first_error("[host 0] step 1\n[host 0] done\n") == (None, [])
    assert first_error("Traceback (most recent call last):\n  File \"c.py\"\nKeyError: 'k'\n")[0] == "KeyError: 'k'"
