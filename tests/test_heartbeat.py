"""The heartbeat file under concurrent writers: the exit record is the last word, and no write tears another.

Found in a full run of tests/test_chaos.py: host 1's heartbeat thread wrote its "save-wait" beat while the main
thread wrote the exit record, both through one temp file (named by pid only); the file came out as one record with
the tail of the other, so the supervisor could not read that host's checkpointed exit after Ctrl-C.
"""
import json
import threading

from trainer import heartbeat as hb_module
from trainer.heartbeat import Heartbeat, read_heartbeat
from trainer.runfiles import write_atomic


def test_a_beat_taken_before_finish_never_lands_after_the_exit_record(tmp_path, monkeypatch):
    in_slow_write, release, stalled_written = threading.Event(), threading.Event(), threading.Event()
    real = hb_module.write_atomic

    def slow_for_the_thread(path, data):
        # The heartbeat thread's periodic write stalls on the disk (as under load) while finish() comes in.
        if threading.current_thread().name == "heartbeat" and not in_slow_write.is_set():
            in_slow_write.set()
            release.wait(10)
            real(path, data)
            stalled_written.set()
            return
        real(path, data)

    monkeypatch.setattr(hb_module, "write_atomic", slow_for_the_thread)
    beat = Heartbeat(str(tmp_path), host=1, attempt=0, interval_s=0.01).start()
    beat.beat(step=26, phase="save-wait")
    assert in_slow_write.wait(10)
    done = threading.Thread(target=beat.finish, args=(42, "preemption"))
    done.start()
    done.join(0.3)  # finish() waits for the stalled write, or (the bug) writes first and is overwritten
    release.set()
    done.join(10)
    assert not done.is_alive() and stalled_written.wait(10)
    got = read_heartbeat(str(tmp_path), 1)
    assert got is not None and got["exit"] == {"code": 42, "reason": "preemption"} and got["step"] == 26, got
    assert got["phase"] == "exited"


def test_write_atomic_from_many_threads_leaves_one_whole_record(tmp_path):
    path = str(tmp_path / "host-0.json")
    records = [json.dumps({"writer": i, "pad": "x" * (i * 37 % 500)}) for i in range(16)]
    errors = []

    def write_many(record):
        try:
            for _ in range(200):
                write_atomic(path, record)
        except OSError as e:  # a writer whose temp file another thread renamed away (the bug) fails here
            errors.append(e)

    threads = [threading.Thread(target=write_many, args=(r,)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open(path) as f:
        assert f.read() in records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host-0.json"]  # no temp file left behind
