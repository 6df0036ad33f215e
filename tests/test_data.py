"""Tests for trainer.data: tokenizer, cleaning, splitting, shard preparation, streaming, CLI, GCS."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from trainer.data import (BatchStream, ByteTokenizer, DataError, EOS_ID, default_cache_dir,
                          ensure_default_corpus, eval_batches, prepare, read_manifest)
from trainer.data import corpus as corpus_mod
from trainer.data.clean import clean_documents
from trainer.data.prepare import split_documents

RECORD_LEN = 17
SEQ_LEN = 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_docs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "η", "theta", "iota", "kappa"]
    return [(f"doc{i:03d}.txt", f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(5, 60)))))
            for i in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small prepared dataset: ~150 docs, 17-token records, 7 records per shard."""
    out = str(tmp_path_factory.mktemp("ds"))
    docs = synthetic_docs(150)
    manifest = prepare(docs, out, record_len=RECORD_LEN, records_per_shard=7)
    return out, manifest, docs


def all_records(path: str, manifest: dict, split: str) -> np.ndarray:
    """Every record of a split, read directly from the shard files (the reference)."""
    parts = [np.fromfile(os.path.join(path, s["name"]), dtype="<u2")
             for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts).reshape(-1, manifest["record_len"])


def reference_batch(records: np.ndarray, seed: int, step: int, global_batch: int) -> np.ndarray:
    """The global batch `step` as the spec defines it (records rows, uint16)."""
    n = len(records)
    rows = []
    for i in range(step * global_batch, (step + 1) * global_batch):
        perm = np.random.default_rng([seed, i // n]).permutation(n)
        rows.append(records[perm[i % n]])
    return np.stack(rows)


def take(stream, k):
    return [next(stream) for _ in range(k)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


def global_batches(path, manifest, split, gb, pc, seed, steps, state=None, prefetch=2):
    """The global batches assembled from all `pc` processes' local batches."""
    per_proc = []
    for p in range(pc):
        s = BatchStream(path, split, gb, SEQ_LEN, p, pc, seed, prefetch=prefetch, manifest=manifest)
        if state is not None:
            s.restore(state)
        per_proc.append(take(s, steps))
        s.close()
    return [{k: np.concatenate([per_proc[p][i][k] for p in range(pc)]) for k in ("inputs", "targets")}
            for i in range(steps)]


# ---------------------------------------------------------------- tokenizer / cleaning / split

def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo wörld ✓ \n\ttabs"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert list(ids) == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(np.r_[ids, EOS_ID]) == text
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_cleaning_drops_empty_binary_duplicates():
    docs = [
        ("a", "hello  \r\nworld\t\n\n"),
        ("empty", ""),
        ("blank", " \n\t\r\n  "),
        ("nul", b"abc\x00def"),
        ("badutf8", b"\xff\xfe\xfa text"),
        ("controls", "x" + "\x01\x02\x03" * 10),
        ("dup", "hello\nworld"),  # same as "a" once cleaned
        ("nfc", "cafe\u0301"),
        ("nfc-dup", "caf\u00e9"),  # same as "nfc" after NFC
        ("b", b"bytes are fine \xc3\xa9"),
    ]
    result = clean_documents(docs)
    assert [n for n, _ in result.docs] == ["a", "nfc", "b"]
    assert result.docs[0][1] == "hello\nworld"
    assert result.docs[1][1] == "caf\u00e9"
    assert (result.dropped_empty, result.dropped_binary, result.dropped_duplicate) == (2, 3, 2)
    assert result.counts()["input_documents"] == len(docs)


def test_split_deterministic_and_disjoint():
    docs = synthetic_docs(200)
    a = split_documents(docs, 0.1, 0.1, seed=0)
    b = split_documents(docs, 0.1, 0.1, seed=0)
    assert a == b
    names = [set(n for n, _ in a[s]) for s in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set().union(*names) == {n for n, _ in docs}
    assert 5 <= len(a["val"]) <= 40 and 5 <= len(a["test"]) <= 40
    assert split_documents(docs, 0.1, 0.1, seed=1) != a
    # A document's split does not depend on the others.
    c = split_documents(docs[:100], 0.1, 0.1, seed=0)
    assert {n for n, _ in c["val"]} == {n for n, _ in a["val"]} & {n for n, _ in docs[:100]}
    # Tiny corpora still get one val and one test document.
    tiny = split_documents(docs[:3], 0.05, 0.05, seed=0)
    assert [len(tiny[s]) for s in ("train", "val", "test")] == [1, 1, 1]


# ---------------------------------------------------------------- prepare

def test_prepare_writes_manifest_and_shards(dataset):
    path, manifest, docs = dataset
    assert manifest == read_manifest(path)
    assert manifest["format"] == "tokens-v1" and manifest["tokenizer"] == "bytes"
    assert (manifest["vocab_size"], manifest["eos_id"], manifest["record_len"], manifest["dtype"]) == (257, 256, 17, "uint16")
    assert manifest["cleaning"]["kept"] == len(docs)
    splits = manifest["splits"]
    assert sum(splits[s]["documents"] for s in splits) == len(docs)
    assert sum(splits[s]["tokens"] for s in splits) == sum(len(t.encode()) + 1 for _, t in docs)
    names = []
    for split, info in splits.items():
        assert info["records"] == info["tokens"] // RECORD_LEN
        assert sum(s["records"] for s in info["shards"]) == info["records"]
        for i, shard in enumerate(info["shards"]):
            assert shard["name"] == f"{split}-{i:05d}.bin" and 1 <= shard["records"] <= 7
            with open(os.path.join(path, shard["name"]), "rb") as f:
                data = f.read()
            assert len(data) == shard["records"] * RECORD_LEN * 2
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            names.append(shard["name"])
    assert sorted(os.listdir(path)) == sorted(names + ["manifest.json"])
    assert splits["train"]["records"] > 100 and splits["val"]["records"] > 0
    # Records are the split's documents, tokenized, EOS-terminated and concatenated.
    split_docs = split_documents(docs, 0.05, 0.05, seed=0)["train"]
    tokens = np.concatenate([np.r_[np.frombuffer(t.encode(), np.uint8).astype(np.uint16), EOS_ID] for _, t in split_docs])
    np.testing.assert_array_equal(all_records(path, manifest, "train").reshape(-1),
                                  tokens[: splits["train"]["records"] * RECORD_LEN])
    # Same input, same shards.
    again = prepare(docs, path + "-again", record_len=RECORD_LEN, records_per_shard=7)
    assert again["fingerprint"] == manifest["fingerprint"]


def test_prepare_from_directory_and_jsonl(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name, text in synthetic_docs(20):
        (src / ("sub" if name < "doc010" else "") / name).write_text(text)
    (src / "ignored.md").write_text("not matched by the default globs " * 20)
    m = prepare(str(src), str(tmp_path / "out"), record_len=RECORD_LEN)
    assert m["cleaning"]["input_documents"] == 20
    only_md = prepare(str(src), str(tmp_path / "out-md"), record_len=RECORD_LEN, globs=["*.md"])
    assert only_md["cleaning"]["input_documents"] == 1
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in synthetic_docs(10)))
    assert prepare(str(jsonl), str(tmp_path / "out-j"), record_len=RECORD_LEN)["cleaning"]["kept"] == 10


def test_prepare_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(str(tmp_path / "missing"), str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files matching"):
        prepare(str(tmp_path / "empty"), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="no train records"):
        prepare([("a", "tiny"), ("b", "")], str(tmp_path / "o"))
    assert not (tmp_path / "o" / "manifest.json").exists()


# ---------------------------------------------------------------- streaming

def test_stream_follows_spec_and_is_deterministic(dataset):
    path, manifest, _ = dataset
    records = all_records(path, manifest, "train")
    a = take(BatchStream(path, "train", 8, SEQ_LEN, 0, 1, seed=3), 5)
    b = take(BatchStream(path, "train", 8, SEQ_LEN, 0, 1, seed=3, prefetch=0), 5)
    c = take(BatchStream(path, "train", 8, SEQ_LEN, 0, 1, seed=4), 5)
    assert_batches_equal(a, b)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, c))
    for step, batch in enumerate(a):
        assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (8, SEQ_LEN)
        ref = reference_batch(records, 3, step, 8).astype(np.int32)
        np.testing.assert_array_equal(batch["inputs"], ref[:, :SEQ_LEN])
        np.testing.assert_array_equal(batch["targets"], ref[:, 1:SEQ_LEN + 1])
    short = next(BatchStream(path, "train", 8, 5, 0, 1, seed=3))
    np.testing.assert_array_equal(short["inputs"], a[0]["inputs"][:, :5])


def test_global_batch_independent_of_process_count(dataset):
    path, manifest, _ = dataset
    one = global_batches(path, manifest, "train", 16, 1, 7, 4)
    assert_batches_equal(global_batches(path, manifest, "train", 16, 2, 7, 4), one)
    assert_batches_equal(global_batches(path, manifest, "train", 16, 4, 7, 4, prefetch=0), one)


def test_restore_resumes_exactly_across_process_counts_and_epochs(dataset):
    path, manifest, _ = dataset
    n = manifest["splits"]["train"]["records"]
    gb = 16
    steps_per_epoch = n // gb
    total = steps_per_epoch + 4  # crosses the first epoch boundary
    full = global_batches(path, manifest, "train", gb, 1, 11, total)
    for k in (3, steps_per_epoch - 1, steps_per_epoch + 1):
        s = BatchStream(path, "train", gb, SEQ_LEN, 0, 1, seed=11, prefetch=3)
        take(s, k)
        state = json.loads(json.dumps(s.state()))
        s.close()
        assert state["samples_seen"] == k * gb
        rest = total - k
        assert_batches_equal(global_batches(path, manifest, "train", gb, 1, 11, rest, state=state), full[k:])
        assert_batches_equal(global_batches(path, manifest, "train", gb, 2, 11, rest, state=state), full[k:])
        # The restored state's seed wins over the constructor's.
        assert_batches_equal(global_batches(path, manifest, "train", gb, 4, 999, rest, state=state), full[k:])


def test_restore_rejects_other_dataset(dataset, tmp_path):
    path, manifest, docs = dataset
    other = prepare(docs[:60], str(tmp_path / "other"), record_len=RECORD_LEN)
    s = BatchStream(str(tmp_path / "other"), "train", 4, SEQ_LEN, 0, 1, seed=0)
    with pytest.raises(DataError, match="another dataset"):
        BatchStream(path, "train", 4, SEQ_LEN, 0, 1, seed=0).restore(s.state())
    with pytest.raises(DataError, match="split"):
        BatchStream(path, "val", 4, SEQ_LEN, 0, 1, seed=0).restore(
            BatchStream(path, "train", 4, SEQ_LEN, 0, 1, seed=0).state())
    assert other["fingerprint"] != manifest["fingerprint"]


def test_prefetch_does_not_advance_state(dataset):
    path, _, _ = dataset
    s = BatchStream(path, "train", 8, SEQ_LEN, 0, 1, seed=0, prefetch=3)
    first = next(s)
    deadline = time.time() + 10
    while not s._queue.full() and time.time() < deadline:
        time.sleep(0.01)
    assert s._queue.full()  # three more batches fetched ahead...
    assert s.state()["samples_seen"] == 8  # ...but the state is that of the next batch
    again = BatchStream(path, "train", 8, SEQ_LEN, 0, 1, seed=0, prefetch=0)
    assert_batches_equal([first, next(s)], take(again, 2))
    s.close()


def test_prefetch_errors_reraise_in_next(dataset, monkeypatch):
    path, _, _ = dataset
    s = BatchStream(path, "train", 8, SEQ_LEN, 0, 1, seed=0, prefetch=2)

    def boom(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(s._reader.store, "read_range", boom)
    with pytest.raises(OSError, match="disk on fire"):
        next(s)
    assert s.state()["samples_seen"] == 0
    s.close()


class SpyStore:
    def __init__(self, store):
        self.store, self.calls = store, []

    def read_range(self, name, start, end):
        self.calls.append((name, start, end))
        return self.store.read_range(name, start, end)


def records_of_calls(calls, manifest, split):
    starts, acc = {}, 0
    for shard in manifest["splits"][split]["shards"]:
        starts[shard["name"]] = acc
        acc += shard["records"]
    rb = manifest["record_len"] * 2
    out = []
    for name, start, end in calls:
        assert start % rb == 0 and end % rb == 0
        out.extend(range(starts[name] + start // rb, starts[name] + end // rb))
    return out


def test_host_reads_only_its_own_records(dataset):
    path, manifest, _ = dataset
    records = all_records(path, manifest, "train")
    n = len(records)
    gb, pc, p, seed = 16, 4, 2, 5
    s = BatchStream(path, "train", gb, SEQ_LEN, p, pc, seed=seed, prefetch=0)
    spy = s._reader.store = SpyStore(s._reader.store)
    next(s)
    perm = np.random.default_rng([seed, 0]).permutation(n)
    mine = sorted(perm[p * 4:(p + 1) * 4])
    read = records_of_calls(spy.calls, manifest, "train")
    assert sorted(read) == mine  # each of its 4 records once, nothing else
    assert s.stats["records_read"] == 4 and s.stats["bytes_read"] == 4 * RECORD_LEN * 2


def test_eval_batches(dataset):
    path, manifest, _ = dataset
    records = all_records(path, manifest, "val")
    n = len(records)
    gb = 4
    a = list(eval_batches(path, "val", gb, SEQ_LEN, 0, 1, max_batches=100))
    assert len(a) == n // gb
    assert_batches_equal(a, list(eval_batches(path, "val", gb, SEQ_LEN, 0, 1, max_batches=100)))
    np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in a]),
                                  records[: len(a) * gb, :SEQ_LEN].astype(np.int32))
    assert len(list(eval_batches(path, "val", gb, SEQ_LEN, 0, 1, max_batches=1))) == 1
    halves = [list(eval_batches(path, "val", gb, SEQ_LEN, p, 2, max_batches=100)) for p in range(2)]
    for i, batch in enumerate(a):
        np.testing.assert_array_equal(np.concatenate([halves[0][i]["targets"], halves[1][i]["targets"]]),
                                      batch["targets"])


def test_eval_coalesces_adjacent_records(dataset, monkeypatch):
    path, manifest, _ = dataset
    reads = []
    from trainer.data import storage

    original = storage.LocalStore.read_range
    monkeypatch.setattr(storage.LocalStore, "read_range",
                        lambda self, name, start, end: reads.append(name) or original(self, name, start, end))
    next(eval_batches(path, "train", 14, SEQ_LEN, 0, 1, max_batches=1))
    assert reads == ["train-00000.bin", "train-00001.bin"]  # 14 records, 7 per shard: two reads


def test_bad_stream_inputs(dataset, tmp_path):
    path, manifest, _ = dataset
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "splits": {"train": {"shards": []}}}))
    with pytest.raises(DataError, match="no shards"):
        read_manifest(str(tmp_path))
    with pytest.raises(DataError, match="seq_len 17"):
        BatchStream(path, "train", 8, 17, 0, 1, seed=0)
    with pytest.raises(DataError, match="seq_len"):
        eval_batches(path, "val", 8, 100, 0, 1, max_batches=1)
    with pytest.raises(DataError, match="multiple of process_count"):
        BatchStream(path, "train", 6, SEQ_LEN, 0, 4, seed=0)
    with pytest.raises(DataError, match="no split 'dev'"):
        BatchStream(path, "dev", 8, SEQ_LEN, 0, 1, seed=0)
    for err in (DataError("x"),):
        assert isinstance(err, ValueError)


# ---------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer.data", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli(tmp_path):
    bad = run_cli("prepare", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "does not exist" in bad.stderr
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in synthetic_docs(40)))
    ok = run_cli("prepare", "--input", str(src), "--output", str(tmp_path / "o"), "--record-len", "33",
                 "--records-per-shard", "5")
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.strip().splitlines()) == 1 and "train:" in ok.stdout and "records" in ok.stdout
    assert read_manifest(str(tmp_path / "o"))["record_len"] == 33
    shown = run_cli("inspect", str(tmp_path / "o"))
    assert shown.returncode == 0 and "fingerprint" in shown.stdout
    assert run_cli("inspect", str(tmp_path / "nothing")).returncode == 2


# ---------------------------------------------------------------- GCS (emulator)

def test_gcs_prepare_and_stream_match_local(dataset, gcs_emulator):
    path, manifest, docs = dataset
    url = f"gs://{gcs_emulator.bucket}/ds-{uuid.uuid4().hex[:8]}"
    gcs_manifest = prepare(docs, url, record_len=RECORD_LEN, records_per_shard=7)
    assert gcs_manifest["fingerprint"] == manifest["fingerprint"]
    assert read_manifest(url) == manifest
    local = take(BatchStream(path, "train", 8, SEQ_LEN, 1, 2, seed=2), 4)
    remote_stream = BatchStream(url, "train", 8, SEQ_LEN, 1, 2, seed=2)
    remote = take(remote_stream, 2)
    state = remote_stream.state()
    remote_stream.close()
    resumed = BatchStream(url, "train", 8, SEQ_LEN, 1, 2, seed=2)
    resumed.restore(state)
    assert_batches_equal(remote + take(resumed, 2), local)
    assert_batches_equal(list(eval_batches(url, "val", 4, SEQ_LEN, 0, 1, max_batches=3)),
                         list(eval_batches(path, "val", 4, SEQ_LEN, 0, 1, max_batches=3)))
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(f"gs://{gcs_emulator.bucket}/nothing-here")


# ---------------------------------------------------------------- default corpus

def test_ensure_default_corpus_prepares_once(tmp_path, monkeypatch):
    calls = []
    original = corpus_mod.prepare_stdlib

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(corpus_mod, "prepare_stdlib", counting)
    cache = str(tmp_path / "cache")
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        ensure_default_corpus(cache, record_len=65, max_bytes=60_000))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(calls) == 1
    path = results[0]
    m = read_manifest(path)
    assert m["record_len"] == 65 and m["splits"]["train"]["records"] > 0
    assert "stdlib" in m["source"]
    assert ensure_default_corpus(cache, record_len=65, max_bytes=60_000) == path and len(calls) == 1
    assert [n for n in os.listdir(cache) if not n.startswith(".")] == [os.path.basename(path)]
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]
    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == str(tmp_path / "env" / "corpus-stdlib-v1")
