"""Run-directory sync writes only the files the supervisor asked a host for, and only inside the run dir."""
import logging
import os

from launcher import runsync
from launcher.runsync import RunSync, apply_chunks, host_files, list_event_files, read_new


def test_expected_names_are_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    offsets = apply_chunks(str(run), 0, host_files(0), {
        "logs/host-0.log": (b"hello\n", 6), "events.jsonl": (b'{"a": 1}\n', 9),
        "hosts/host-0.json": (b'{"pid": 1}', 0), "result.json": (b"{}", 0)})
    assert offsets == {"logs/host-0.log": 6, "events.jsonl": 9}
    assert (run / "logs" / "host-0.log").read_bytes() == b"hello\n"
    assert (run / "hosts" / "host-0.json").read_bytes() == b'{"pid": 1}'
    assert (run / "result.json").read_bytes() == b"{}"


def test_unexpected_or_escaping_names_are_ignored_and_logged_once(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside.txt"
    evil = {"../outside.txt": (b"pwned\n", 6), str(outside): (b"pwned\n", 6), "logs/host-0.log": (b"x\n", 2),
            "config.yaml": (b"pwned\n", 6), "hosts/../../outside.txt": (b"pwned", 0), "events.jsonl": (b"ok\n", 3)}
    warned = set()
    with caplog.at_level(logging.WARNING, logger="launcher.runsync"):
        # host 1 was asked for its own files: host 0's log and the supervisor's config are not among them
        offsets = apply_chunks(str(run), 1, host_files(1), evil, warned)
        apply_chunks(str(run), 1, host_files(1), evil, warned)
    assert offsets == {"events.jsonl": 3}
    assert not outside.exists()
    assert sorted(os.listdir(run)) == ["events.jsonl"]
    ignored = [r.getMessage() for r in caplog.records]
    assert len(ignored) == 5, ignored  # once each, not once per pull
    assert all("did not ask for" in m for m in ignored)


def test_a_name_asked_for_must_still_stay_inside(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    names = ["../escape.log", "/tmp/abs.log", "a/./b", "ok.log"]
    chunks = {n: (b"x\n", 2) for n in names}
    assert apply_chunks(str(run), 0, names, chunks) == {"ok.log": 2}
    assert not (tmp_path / "escape.log").exists()
    assert os.listdir(run) == ["ok.log"]


def test_malformed_answers_are_ignored(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert apply_chunks(str(run), 0, host_files(0), ["not", "a", "dict"]) == {}
    assert apply_chunks(str(run), 0, host_files(0), {"events.jsonl": "text, not bytes"}) == {}
    assert os.listdir(run) == []


def test_read_new_then_apply_round_trip(tmp_path):
    host_dir, run = tmp_path / "host", tmp_path / "run"
    (host_dir / "logs").mkdir(parents=True)
    run.mkdir()
    (host_dir / "logs" / "host-2.log").write_bytes(b"line 1\nline 2\npartial")
    offsets = {name: 0 for name in host_files(2)}
    offsets.update(apply_chunks(str(run), 2, offsets, read_new(str(host_dir), offsets)))
    assert offsets["logs/host-2.log"] == 14
    assert (run / "logs" / "host-2.log").read_bytes() == b"line 1\nline 2\n"


class _Host:
    """A host's actor as RunSync calls it (`.pull.remote`, `.event_files.remote`), run in this process; keeps what
    each pull sent."""

    def __init__(self):
        self.sent = []
        self.pull = type("M", (), {"remote": staticmethod(self._pull)})
        self.event_files = type("M", (), {"remote": staticmethod(list_event_files)})

    def _pull(self, root, offsets):
        out = read_new(root, dict(offsets))
        self.sent.append(sorted(out))
        return out


def test_an_unchanged_heartbeat_is_neither_sent_nor_rewritten(tmp_path, monkeypatch):
    monkeypatch.setattr(runsync.ray, "get", lambda ref, timeout=None: ref)  # the stand-in actors answer at once
    run = tmp_path / "run"
    run.mkdir()
    dirs = [tmp_path / f"host-{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        (d / "hosts").mkdir(parents=True)
        (d / "hosts" / f"host-{i}.json").write_bytes(b'{"step": 1}')
    actors = [_Host(), _Host()]
    sync = RunSync(str(run), actors, [str(d) for d in dirs])
    sync.pull()
    beats = [run / "hosts" / f"host-{i}.json" for i in range(2)]
    assert [b.read_bytes() for b in beats] == [b'{"step": 1}'] * 2
    assert [a.sent[-1] for a in actors] == [["hosts/host-0.json"], ["hosts/host-1.json"]]
    for b in beats:  # a time no write of this test makes: a rewrite would change it
        os.utime(b, ns=(10**18, 10**18))

    (dirs[1] / "hosts" / "host-1.json").write_bytes(b'{"step": 2}')  # host 1 beats, host 0 does not
    sync.pull()
    assert [a.sent[-1] for a in actors] == [[], ["hosts/host-1.json"]]
    assert beats[0].read_bytes() == b'{"step": 1}' and beats[0].stat().st_mtime_ns == 10**18
    assert beats[1].read_bytes() == b'{"step": 2}' and beats[1].stat().st_mtime_ns != 10**18

    # a new RunSync (the next attempt) asks for everything again; what is already here is not rewritten
    sync = RunSync(str(run), actors, [str(d) for d in dirs])
    sync.pull()
    assert [a.sent[-1] for a in actors] == [["hosts/host-0.json"], ["hosts/host-1.json"]]
    assert beats[0].stat().st_mtime_ns == 10**18


def test_a_whole_file_sent_without_a_fingerprint_is_still_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_bytes(b'{"old": 1}')
    assert apply_chunks(str(run), 0, host_files(0), {"result.json": (b'{"new": 1}', 0)}) == {}
    assert (run / "result.json").read_bytes() == b'{"new": 1}'
