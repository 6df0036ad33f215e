"""A cloud run's run directory through its bucket (launcher/mirror.py), against the GCS emulator.

On a real cloud run the supervisor is a Ray job on the head: the run directory is there, and the laptop holds only
config.yaml. Here "the head" is one directory (a completed 2-host run), mirrored to the bucket the way its supervisor
does, and "the laptop" is another that holds only the run's config.yaml: status, logs and report read the run from
the mirror, and the run's command typed on a laptop with no run directory at all prints the result and starts
nothing. Then what a pull accepts and what a push sends again.
"""
import hashlib
import json
import os
import shutil

from google.cloud import storage

from launcher import mirror
from launcher.config import compose_config, to_yaml
from podutil import TINY, explain, launch, read_json, tpu_launch
from tpu_api_server import TpuApiServer
from trainer import runfiles

TOKEN = "ray-token-that-stays-on-the-head-0123456789"


def _cloud(run_dir, bucket, endpoint):
    """The trained run's command as a cloud run (v4-8 on the TPU API test server, its bucket on the emulator)."""
    return ["+cluster=v4-8", "run.name=trained", f"run.dir={run_dir}", *TINY, "trainer.steps=12",
            "optimizer.decay_steps=12", "optimizer.warmup_steps=3", "checkpoint.every=4",
            "cluster.project=test-project", f"cluster.tpu_api_endpoint={endpoint}", f"cluster.bucket=gs://{bucket}/m"]


def _objects(bucket, prefix):
    client = storage.Client(project="test")
    return {b.name[len(prefix):]: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=prefix)}


def test_a_cloud_run_read_from_its_mirror_by_status_logs_report_and_the_shortcut(trained_run, gcs_emulator,
                                                                                   corpus_cache, tmp_path):
    head = str(tmp_path / "head" / "trained")
    shutil.copytree(trained_run, head)  # checkpoints, lock and config.yaml too: none of them is mirrored
    runfiles.write_atomic(os.path.join(head, runfiles.AUTH, "ray_token"), TOKEN, mode=0o600)
    laptop = str(tmp_path / "laptop" / "trained")
    with TpuApiServer(tick_s=0.05) as api:
        cfg = compose_config(_cloud(laptop, gcs_emulator.bucket, api.url))
        runfiles.write_atomic(os.path.join(laptop, runfiles.CONFIG), to_yaml(cfg))  # what _run_as_job writes
        url = mirror.url_for(cfg)
        assert url == f"gs://{gcs_emulator.bucket}/m/runs/trained/rundir"  # next to the run's checkpoints

        # The supervisor's side: the first push as it starts, one more as it ends.
        mirror.Mirror(head, url).start().close()
        objects = _objects(gcs_emulator.bucket, "m/runs/trained/rundir/")
        sent = {name.rsplit("/", 1)[0] for name in objects if name != runfiles.MIRROR}
        assert sent == set(runfiles.mirrored_names(head))
        assert {"summary.json", "events.jsonl", "metrics.jsonl", "goodput.jsonl", "report.png", "logs/host-0.log",
                "logs/host-1.log", "hosts/host-0.json", "hosts/host-1.json"} <= sent
        assert any(n.startswith("tb/events.out.tfevents.") for n in sent)
        assert not any(n.split("/")[0] in ("checkpoints", "auth", "config.yaml", "lock", "pod.json") for n in sent)
        assert not any(TOKEN.encode() in data for data in objects.values())

        # The laptop's side: status, logs and report of a directory holding only config.yaml.
        summary = read_json(os.path.join(head, "summary.json"))
        last = [m for m in runfiles.read_jsonl(os.path.join(head, "metrics.jsonl")) if "split" not in m][-1]
        proc = tpu_launch("status", "--json", laptop)
        assert proc.returncode == 0 and proc.stderr == "", explain(proc)
        st = json.loads(proc.stdout)
        assert (st["state"], st["step"], st["total"], st["loss"]) == ("completed", 12, 12, last["loss"])
        assert st["goodput"] == summary["goodput"] and st["hosts"] == 1 and st["mfu"] == last.get("mfu")
        assert st["cloud"]["state"] == "NOT_FOUND"  # its queued resource is gone: the mirror still says how it ended
        assert st["mirror_age_s"] is not None and st["mirror_age_s"] >= 0
        proc = tpu_launch("logs", laptop, "--host", "1")
        assert proc.returncode == 0, explain(proc)
        with open(os.path.join(head, "logs", "host-1.log")) as f:
            assert proc.stdout == f.read() and "[host 1]" in proc.stdout
        os.remove(os.path.join(laptop, "report.png"))
        proc = tpu_launch("report", laptop)
        assert proc.returncode == 0, explain(proc)
        assert proc.stdout.startswith("run trained: completed, step 12/12") and os.path.getsize(
            os.path.join(laptop, "report.png")) > 10_000
        # The laptop got the mirrored names and its record of the pull, nothing else.
        here = {os.path.relpath(os.path.join(d, f), laptop) for d, _, fs in os.walk(laptop) for f in fs}
        assert here == sent | {runfiles.CONFIG, runfiles.MIRROR}
        assert not os.path.exists(os.path.join(laptop, "checkpoints"))

        # The run's command typed on a laptop that has no run directory: its result from the mirror, nothing started.
        fresh = str(tmp_path / "other-laptop" / "trained")
        calls = len(api.requests)
        proc = launch(*_cloud(fresh, gcs_emulator.bucket, api.url))
        assert proc.returncode == 0, explain(proc)
        assert proc.stdout.startswith("[launcher] run trained already completed 12 steps; nothing started"), proc.stdout
        assert f"loss {summary['final_loss']:.4f}, test loss {summary['eval']['eval_loss']:.4f}" in proc.stdout
        assert len(api.requests) == calls  # no queued resource asked for
        assert "submitted" not in proc.stdout and "hosts placed" not in proc.stdout
        assert read_json(os.path.join(fresh, "summary.json")) == summary


def test_push_and_pull_send_only_what_changed(gcs_emulator, tmp_path, monkeypatch):
    from trainer.data.storage import GCSStore

    monkeypatch.setattr(mirror, "CHUNK_BYTES", 64)
    writes, reads = [], []
    real_write, real_read = GCSStore.write_bytes, GCSStore.read_bytes
    monkeypatch.setattr(GCSStore, "write_bytes", lambda self, n, d: (writes.append(n), real_write(self, n, d))[1])
    monkeypatch.setattr(GCSStore, "read_bytes", lambda self, n: (reads.append(n), real_read(self, n))[1])
    url = f"gs://{gcs_emulator.bucket}/p/runs/r/rundir"
    head, laptop = str(tmp_path / "head"), str(tmp_path / "laptop")
    log = os.path.join(head, "logs", "host-0.log")
    runfiles.write_atomic(log, "".join(f"line {i:03d} of host 0's log\n" for i in range(20)))  # 500 B: 8 chunks
    runfiles.write_json(runfiles.heartbeat_file(head, 0), {"step": 1})
    push = mirror.Mirror(head, url, every_s=3600)
    push.push()
    assert sorted(writes) == sorted([f"logs/host-0.log/{k}" for k in range(8)] + ["hosts/host-0.json/0",
                                                                                   runfiles.MIRROR])
    assert sorted(mirror.pull(laptop, url)) == ["hosts/host-0.json", "logs/host-0.log"]
    writes.clear(), reads.clear()
    assert push.push() == 0 and writes == []  # nothing changed: nothing sent, not even the index
    with open(log, "a") as f:
        f.write("one more line\n")
    runfiles.write_json(runfiles.heartbeat_file(head, 0), {"step": 2})
    assert push.push() == 2
    # the log's last chunk, now full, and its new one
    assert sorted(writes) == sorted(["logs/host-0.log/7", "logs/host-0.log/8", "hosts/host-0.json/0", runfiles.MIRROR])
    reads.clear()
    assert sorted(mirror.pull(laptop, url)) == ["hosts/host-0.json", "logs/host-0.log"]
    assert sorted(reads) == sorted([runfiles.MIRROR, "logs/host-0.log/7", "logs/host-0.log/8", "hosts/host-0.json/0"])
    with open(log, "rb") as a, open(os.path.join(laptop, "logs", "host-0.log"), "rb") as b:
        assert a.read() == b.read()
    assert runfiles.read_json(runfiles.heartbeat_file(laptop, 0)) == {"step": 2}
    reads.clear()
    assert mirror.pull(laptop, url) == [] and reads == [runfiles.MIRROR]  # up to date: the index only

    # The mirror's own source pulls nothing (a head, or a laptop that supervises the run itself).
    assert mirror.pull(head, url) == []
    # A new head VM: the run's history pulled before the launch, and not sent again by its supervisor.
    new_head = str(tmp_path / "new-head")
    mirror.pull(new_head, url)
    writes.clear()
    mirror.Mirror(new_head, url).push()
    assert writes == [runfiles.MIRROR]  # the same files, now from this source
    assert read_json(os.path.join(laptop, runfiles.MIRROR))["source"]["dir"] == os.path.abspath(head)
    assert mirror.pull(laptop, url) == []  # the same chunks: nothing to download


def test_a_pull_writes_only_the_mirrored_names_inside_the_run_dir(gcs_emulator, tmp_path):
    from trainer.data.storage import open_store

    url = f"gs://{gcs_emulator.bucket}/evil/runs/r/rundir"
    store = open_store(url)
    files = {}
    for name in ("../outside.txt", "auth/ray_token", "config.yaml", "checkpoints/4/x", "lock", "logs/../../up.log",
                 "/abs.log", "hosts/host-0.json/../../x", "logs/host-0.log", "summary.json"):
        data = b'{"status": "completed"}\n' if name == "summary.json" else b"planted " + name.encode()
        if runfiles.is_mirrored(name):
            store.write_bytes(f"{name}/0", data)
        files[name] = {"size": len(data), "chunks": [hashlib.sha256(data).hexdigest()]}
    files["events.jsonl"] = {"size": "big", "chunks": ["x"]}  # not a well-formed entry: skipped
    store.write_bytes(runfiles.MIRROR, json.dumps({"version": 1, "source": {"host": "head", "dir": "/runs/r"},
                                                   "chunk_bytes": mirror.CHUNK_BYTES, "time": 1.0,
                                                   "files": files}).encode())
    laptop = tmp_path / "runs" / "r"
    laptop.mkdir(parents=True)
    (laptop / "config.yaml").write_text("mine")
    assert sorted(mirror.pull(str(laptop), url)) == ["logs/host-0.log", "summary.json"]
    here = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert here == {"runs/r/config.yaml", "runs/r/logs/host-0.log", "runs/r/summary.json", "runs/r/mirror.json"}
    assert (laptop / "config.yaml").read_text() == "mine"


def test_refresh_of_a_local_run_or_an_unreachable_bucket(tmp_path, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.yaml").write_text("run: {name: local}\ncluster: {provider: local, bucket: gs://b/x}\n")
    assert mirror.refresh(str(local)) is None and sorted(os.listdir(local)) == ["config.yaml"]
    cloud = tmp_path / "cloud"
    cloud.mkdir()
    (cloud / "config.yaml").write_text("run: {name: cloud}\ncluster: {provider: gcp, bucket: gs://b/x}\n")

    def down(run_dir, url):
        raise ConnectionError("bucket unreachable\nsecond line")

    monkeypatch.setattr(mirror, "pull", down)
    warning = mirror.refresh(str(cloud))
    assert warning.startswith("warning: could not read the run's mirror at gs://b/x/runs/cloud/rundir (")
    assert "\n" not in warning and "bucket unreachable" in warning


def test_a_bucket_that_fails_or_hangs_does_not_hold_the_launch(tmp_path, capsys):
    import threading
    import time

    run_dir = str(tmp_path / "run")
    runfiles.write_json(os.path.join(run_dir, runfiles.SUMMARY), {"status": "completed"})
    m = mirror.Mirror(run_dir, "gs://b/x/runs/r/rundir", every_s=0.05)

    class Down:
        def read_bytes(self, name):
            raise ConnectionError("503 backend error\nmore")

        write_bytes = read_bytes

    m.store = Down()
    m.start()
    time.sleep(0.3)  # several failed pushes: one warning
    m.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("[launcher] warning: could not mirror the run directory to "
                                                 "gs://b/x/runs/r/rundir: 503 backend error") for line in out)
    assert out[0].endswith("(trying again every 0s)") and out[1].endswith("(its previous push stays)")

    hung = threading.Event()
    m = mirror.Mirror(run_dir, "gs://b/x/runs/r/rundir", every_s=3600)

    class Hangs:
        def read_bytes(self, name):
            raise FileNotFoundError(name)

        def write_bytes(self, name, data):
            if m._stop.is_set():
                hung.wait(30)

    m.store = Hangs()
    m.start()
    runfiles.write_json(os.path.join(run_dir, runfiles.SUMMARY), {"status": "stopped"})  # the end of the launch
    t0 = time.time()
    m.close(timeout_s=0.5)
    assert time.time() - t0 < 5
    assert "did not finish within 0s; the bucket holds the one before" in capsys.readouterr().out
    hung.set()
