"""CLI: `python -m trainer.data prepare ...` builds token shards, `inspect PATH` summarises them."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .corpus import DEFAULT_MAX_BYTES, ensure_default_corpus, prepare_stdlib
from .errors import DataError
from .prepare import DEFAULT_GLOBS, DEFAULT_RECORD_LEN, DEFAULT_RECORDS_PER_SHARD, SPLITS, prepare, summary
from .stream import read_manifest
from trainer.runfiles import EXIT_USER_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="clean, split, tokenize and shard a corpus")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="directory (recursive, see --glob), .txt file or .jsonl file")
    src.add_argument("--stdlib", action="store_true", help="the built-in corpus: Python stdlib sources")
    p.add_argument("--output", help="local directory or gs://bucket/prefix "
                                    "(with --stdlib, default: the shared cache used by the trainer)")
    p.add_argument("--record-len", type=int, default=DEFAULT_RECORD_LEN)
    p.add_argument("--records-per-shard", type=int, default=DEFAULT_RECORDS_PER_SHARD)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--glob", action="append", metavar="PATTERN",
                   help=f"file pattern for directory input, repeatable (default: {' '.join(DEFAULT_GLOBS)})")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="--stdlib: cap on raw source bytes")

    i = sub.add_parser("inspect", help="print the summary of a prepared dataset")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    return parser


def _prepare(args) -> None:
    start = time.time()
    kwargs = dict(record_len=args.record_len, records_per_shard=args.records_per_shard,
                  val_fraction=args.val_fraction, test_fraction=args.test_fraction, split_seed=args.split_seed)
    if args.stdlib:
        if args.output is None:
            if (args.val_fraction, args.test_fraction, args.split_seed) != (0.05, 0.05, 0):
                raise DataError("--stdlib without --output uses the shared cache, which has fixed split "
                                "settings; give --output to change them")
            output = ensure_default_corpus(record_len=args.record_len, records_per_shard=args.records_per_shard,
                                           max_bytes=args.max_bytes)
            manifest = read_manifest(output)
        else:
            output = args.output
            manifest = prepare_stdlib(output, max_bytes=args.max_bytes, **kwargs)
    else:
        if args.output is None:
            raise DataError("--output is required with --input")
        output = args.output
        manifest = prepare(args.input, output, globs=tuple(args.glob or DEFAULT_GLOBS), **kwargs)
    print(f"prepared {output} in {time.time() - start:.1f}s: {summary(manifest)}")


def _inspect(args) -> None:
    manifest = read_manifest(args.path)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return
    print(f"{args.path}: {manifest['format']}, tokenizer {manifest.get('tokenizer')} "
          f"(vocab {manifest.get('vocab_size')}, eos {manifest.get('eos_id')}), record_len {manifest['record_len']}")
    print(f"source: {manifest.get('source')}")
    for split in SPLITS:
        info = manifest["splits"].get(split)
        if info:
            print(f"  {split:5s}: {info.get('documents')} docs, {info.get('records')} records, "
                  f"{info.get('tokens')} tokens, {len(info['shards'])} shards")
    if "cleaning" in manifest:
        print("cleaning: " + ", ".join(f"{k} {v}" for k, v in manifest["cleaning"].items()))
    print(f"fingerprint: {manifest['fingerprint']}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        _prepare(args) if args.command == "prepare" else _inspect(args)
    except Exception as exc:  # noqa: BLE001 - bad input is one line on stderr, not a traceback
        msg = str(exc).strip().splitlines()
        prefix = "" if isinstance(exc, (DataError, OSError)) else f"{type(exc).__name__}: "
        print(f"error: {prefix}{msg[0] if msg else type(exc).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
