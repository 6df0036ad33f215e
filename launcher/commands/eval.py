"""Evaluate a run's checkpoint (its newest, or --step) on a data split: loss, perplexity, token and top-5 accuracy.

The data is the run's own (its config.yaml's data.path; null: the embedded corpus) or any prepared data
directory or gs:// prefix (--data) with the run's tokenizer. The batches are the trainer's eval batches
(trainer.batch_size rows each, unshuffled, from the split's first record), at most --batches of them (default:
the run's trainer.eval_batches; `all`: the whole split), so the run's own split and batch count reproduce the
eval loss the run logged. It runs in this process on this machine's devices, whatever pod trained the run.
The result is printed and written to RUN/eval/<step>-<split>.json.

  tpu-launch eval demo                                   # newest checkpoint, test split, the run's batch count
  tpu-launch eval runs/demo --split val --step 300 --batches all
  tpu-launch eval demo --data gs://BUCKET/data/other     # another prepared dataset (same tokenizer)
"""
import argparse
import os

from launcher.commands.common import add_root, local_jax_platform, resolve_run
from launcher.errors import UserError
from trainer import runfiles

HELP = "loss, perplexity, token and top-5 accuracy of a run's checkpoint on a data split"
SPLITS = ("test", "val")
TOKENIZER_KEYS = ("tokenizer", "vocab_size", "eos_id")  # what makes two datasets' token ids mean the same


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory, or a run name under --root")
    add_root(p)
    p.add_argument("--split", choices=SPLITS, default="test", help="the split to evaluate on (default: test)")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="a prepared data directory or gs:// prefix (default: the run's data.path)")
    p.add_argument("--step", type=int, default=None, metavar="N", help="a saved checkpoint step (default: newest)")
    p.add_argument("--batches", default=None, metavar="K|all",
                   help="global batches at most, or 'all' (default: the run's trainer.eval_batches)")


def _batches(value, cfg):
    """--batches as a count (None: all of the split)."""
    if value is None:
        return int(cfg.trainer.eval_batches)
    if value == "all":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise UserError("--batches", f"must be a positive integer or 'all', got {value!r}", "pass e.g. --batches 4 or "
                    "--batches all, or leave it out for the run's trainer.eval_batches")


def _tokenizer(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in TOKENIZER_KEYS}


def _data(args, cfg):
    """(data path, manifest) to evaluate on, its tokenizer checked against the run's own data's."""
    from trainer.data import DataError, ensure_default_corpus, read_manifest

    own = cfg.data.path
    if own is None:  # the embedded corpus: prepared (or found in the cache) as the launch does
        own = ensure_default_corpus(cfg.data.cache_dir, max_bytes=int(cfg.data.max_bytes))
    path = args.data if args.data is not None else str(own)
    if not path.startswith("gs://"):
        path = os.path.abspath(os.path.expanduser(path))
    key = "--data" if args.data is not None else "RUN"
    try:
        manifest = read_manifest(path)
    except DataError as e:
        raise UserError(key, str(e), "pass a directory or gs:// prefix made by `python -m trainer.data prepare`"
                        if args.data is not None else "pass --data PATH of a prepared dataset") from None
    if args.data is not None:
        try:
            own_manifest = read_manifest(str(own))
        except DataError as e:
            raise UserError("--data", f"cannot check its tokenizer against the run's data: {e}",
                            "restore the run's data.path, or evaluate on it") from None
        if _tokenizer(manifest) != _tokenizer(own_manifest):
            raise UserError("--data", f"{path} has tokenizer {_tokenizer(manifest)}, the run's data {own} has "
                            f"{_tokenizer(own_manifest)}", "pass data prepared with the run's tokenizer")
    if args.split not in manifest.get("splits", {}):
        raise UserError("--split", f"{path} has no split '{args.split}'", f"pass one of {sorted(manifest['splits'])}")
    return path, manifest


def run(args) -> int:
    local_jax_platform()
    run_dir = resolve_run(args.run, args.root)
    from trainer.checkpoint import CheckpointError
    from trainer.restore import load_run

    try:
        cfg, spec = load_run(run_dir)
    except CheckpointError as e:
        raise UserError("RUN", str(e), "pass a run directory a launch wrote") from None
    batches = _batches(args.batches, cfg)
    path, manifest = _data(args, cfg)

    from trainer import compile_cache
    from trainer.data import DataError
    from trainer.evaluate import evaluate  # imports JAX: only now, so the other commands never pay for it

    compile_cache.enable(cfg.trainer.get("compile_cache"))  # the run's setting, on this machine's disk

    batch = int(cfg.trainer.batch_size)
    try:
        result = evaluate(str(cfg.checkpoint.dir), args.step, spec, path, manifest, args.split, batch,
                          int(cfg.model.seq_len), batches)
    except CheckpointError as e:
        if args.step is not None:
            raise UserError("--step", str(e), "pass a saved step, or leave --step out for the newest") from None
        raise UserError("RUN", str(e), "train the run until it saves a checkpoint") from None
    except DataError as e:
        raise UserError("--data", str(e), "pass data prepared for this model's seq_len") from None
    if result["eval_tokens"] == 0:
        raise UserError("--split", f"split '{args.split}' of {path} has fewer records than one global batch "
                        f"({batch} rows)", "evaluate on a larger split (--split, --data)")
    result.update(run=run_dir, data=path, batches="all" if batches is None else batches, batch_size=batch)
    out = os.path.join(run_dir, runfiles.EVAL, f"{result['step']}-{args.split}.json")
    runfiles.write_json(out, result)
    print(f"eval {args.split} step {result['step']} | loss {result['eval_loss']:.4f} | ppl {result['eval_ppl']:.2f} "
          f"| acc {result['eval_acc']:.4f} | top-5 {result['eval_top5_acc']:.4f} | {result['eval_tokens']:,} "
          f"tokens on {result['devices']} device(s) | {out}")
    return 0
