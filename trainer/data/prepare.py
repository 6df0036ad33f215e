"""Turns a text corpus into token shards: clean, split by document, tokenize, cut records, write."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .clean import clean_documents
from .errors import DataError
from .storage import is_gcs, open_store
from .tokenizer import ByteTokenizer

FORMAT = "tokens-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
DEFAULT_RECORD_LEN = 257  # 256-token window + 1 for the shifted target
DEFAULT_RECORDS_PER_SHARD = 1024
DEFAULT_GLOBS = ("**/*.txt", "**/*.py")


# ---------------------------------------------------------------- loading

def load_documents(source, globs: Sequence[str] = DEFAULT_GLOBS) -> tuple[list[tuple[str, bytes | str]], str]:
    """Returns ([(name, raw)], description) for a directory, a .txt/.jsonl file or a doc list."""
    if isinstance(globs, str):
        globs = (globs,)
    if not isinstance(source, (str, os.PathLike)):
        docs = [(str(name), text) for name, text in source]
        return docs, f"{len(docs)} documents from code"
    path = Path(source).expanduser()
    if is_gcs(str(source)):
        raise DataError(f"reading input corpora from GCS is not supported: {source}")
    if not path.exists():
        raise DataError(f"input path does not exist: {path}")
    if path.is_dir():
        files = sorted({p for g in globs for p in path.glob(g) if p.is_file()},
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"no files matching {', '.join(globs)} under {path}")
        docs = [(p.relative_to(path).as_posix(), p.read_bytes()) for p in files]
        return docs, f"directory {path} ({', '.join(globs)})"
    if path.suffix == ".jsonl":
        return _load_jsonl(path), f"jsonl {path}"
    return [(path.name, path.read_bytes())], f"file {path}"


def _load_jsonl(path: Path) -> list[tuple[str, str]]:
    docs = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
            docs.append((f"{path.name}:{lineno}", obj["text"]))
    return docs


# ---------------------------------------------------------------- splitting

def _split_key(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: Sequence[tuple[str, str]], val_fraction: float = 0.05,
                    test_fraction: float = 0.05, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Assigns each document to train/val/test by a seeded hash of its text.

    Deterministic and per-document (a document's split does not depend on the other
    documents), except that with >= 3 documents an empty val/test split (whose fraction
    is > 0) takes the document with the smallest hash key from the largest split.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise DataError(f"bad split fractions: val={val_fraction} test={test_fraction} (need >= 0, sum < 1)")
    keyed = {"train": [], "val": [], "test": []}
    for index, (name, text) in enumerate(docs):
        u = _split_key(text, seed)
        split = "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
        keyed[split].append((u, index))
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if not keyed[split] and fraction > 0 and len(docs) >= 3:
            donor = max(SPLITS, key=lambda s: (len(keyed[s]), s == "train"))
            keyed[donor].sort()
            keyed[split].append(keyed[donor].pop(0))
    return {s: [docs[i] for _, i in sorted(keyed[s], key=lambda t: t[1])] for s in SPLITS}


# ---------------------------------------------------------------- writing

def _tokens(docs: Iterable[tuple[str, str]], tokenizer: ByteTokenizer) -> np.ndarray:
    eos = np.array([tokenizer.eos_id], dtype=np.uint16)
    parts = []
    for _, text in docs:
        parts.append(tokenizer.encode(text))
        parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def fingerprint(record_len: int, splits: dict) -> str:
    h = hashlib.sha256(f"{FORMAT}:{record_len}".encode())
    for split in SPLITS:
        for shard in splits.get(split, {}).get("shards", []):
            h.update(f"\n{split}:{shard['name']}:{shard['records']}:{shard['sha256']}".encode())
    return h.hexdigest()


def prepare(source, output: str, *, record_len: int = DEFAULT_RECORD_LEN,
            records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, val_fraction: float = 0.05,
            test_fraction: float = 0.05, split_seed: int = 0, globs: Sequence[str] = DEFAULT_GLOBS,
            source_description: str | None = None) -> dict:
    """Prepares shards + manifest.json under `output` (local dir or gs://...); returns the manifest.

    `source`: a local directory (files matching `globs`, recursively), a .txt file (one
    document) or .jsonl file (one document per line, field "text"), or a list of
    (name, text) pairs.
    """
    if record_len < 2:
        raise DataError(f"record_len must be >= 2, got {record_len}")
    if records_per_shard < 1:
        raise DataError(f"records_per_shard must be >= 1, got {records_per_shard}")
    raw_docs, description = load_documents(source, globs)
    cleaned = clean_documents(raw_docs)
    splits_docs = split_documents(cleaned.docs, val_fraction, test_fraction, split_seed)
    tokenizer = ByteTokenizer()
    store = open_store(output)

    splits = {}
    for split in SPLITS:
        tokens = _tokens(splits_docs[split], tokenizer)
        n_records = len(tokens) // record_len
        if split == "train" and n_records == 0:
            raise DataError(
                f"corpus yields no train records: {len(cleaned.docs)} documents kept "
                f"({len(splits_docs['train'])} in train, {len(tokens)} train tokens) "
                f"but record_len is {record_len}; use more text or a smaller --record-len")
        records = tokens[: n_records * record_len].reshape(n_records, record_len)
        shards = []
        for i, start in enumerate(range(0, n_records, records_per_shard)):
            data = records[start: start + records_per_shard].astype("<u2").tobytes()
            name = f"{split}-{i:05d}.bin"
            store.write_bytes(name, data)
            shards.append({"name": name, "records": int(min(records_per_shard, n_records - start)),
                           "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"documents": len(splits_docs[split]), "records": int(n_records),
                         "tokens": int(len(tokens)), "tail_tokens_dropped": int(len(tokens) - n_records * record_len),
                         "shards": shards}

    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "record_len": record_len,
        "dtype": "uint16",
        "byte_order": "little",
        "records_per_shard": records_per_shard,
        "split": {"seed": split_seed, "val_fraction": val_fraction, "test_fraction": test_fraction},
        "splits": splits,
        "cleaning": cleaned.counts(),
        "source": source_description or description,
        "fingerprint": fingerprint(record_len, splits),
    }
    store.write_bytes(MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def summary(manifest: dict) -> str:
    """One line: documents, records and tokens per split."""
    parts = [f"{s}: {manifest['splits'][s]['documents']} docs, {manifest['splits'][s]['records']} records, "
             f"{manifest['splits'][s]['tokens']} tokens" for s in SPLITS if s in manifest["splits"]]
    return "; ".join(parts) + f" (record_len {manifest['record_len']}, fingerprint {manifest['fingerprint'][:12]})"
