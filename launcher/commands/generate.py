"""Continue prompts with a run's trained model: its newest checkpoint (or --step), decoded with a KV cache.

The prompts (--prompt, repeatable, and --prompts-file, one prompt a line) are tokenised with the run's tokenizer
and decoded in one batch on this machine's devices: greedy (--greedy, or --temperature 0), or sampled with
--temperature, --top-k and --top-p (nucleus), the same text for a --seed on any number of devices. A continuation
stops at end-of-document, after --max-new-tokens, or when prompt and continuation fill the model's max_seq_len.
Prints each prompt and its continuation, then the prefill time (= time to first token, compilation included) and
the decode tokens/s; --json prints one JSON object a prompt instead (text, token ids, stop reason, timings).

  tpu-launch generate demo --prompt "def " --max-new-tokens 64
  tpu-launch generate runs/demo --prompts-file prompts.txt --top-p 0.9 --temperature 0.8 --seed 1 --json
"""
import argparse
import json
from typing import List

from launcher.commands.common import add_root, local_jax_platform, resolve_run
from launcher.errors import UserError

HELP = "continue prompts with a run's trained model (KV-cache decoding; greedy or sampled)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory, or a run name under --root")
    add_root(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="F", help="a file of prompts, one a line")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="new tokens per prompt at most (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature; 0 is greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample among the most likely tokens whose probability reaches P, in (0, 1] (default: 1)")
    p.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: 0)")
    p.add_argument("--step", type=int, default=None, metavar="N", help="a saved checkpoint step (default: newest)")
    p.add_argument("--json", action="store_true", help="one JSON object a prompt: text, token ids, timings")


def _check_options(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens", f"must be at least 1, got {args.max_new_tokens}", "pass N >= 1")
    if args.temperature < 0:
        raise UserError("--temperature", f"must be >= 0, got {args.temperature}", "pass T >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError("--top-k", f"must be at least 1, got {args.top_k}", "pass K >= 1, or leave it out")
    if not 0 < args.top_p <= 1:
        raise UserError("--top-p", f"must be in (0, 1], got {args.top_p}", "pass 0 < P <= 1 (1: no cut)")


def _prompts(args) -> List[str]:
    """(option, text) of every prompt, in order: --prompt ones, then the file's lines."""
    prompts = [("--prompt", text) for text in args.prompt]
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError("--prompts-file", f"cannot read {args.prompts_file}: {e}", "pass a UTF-8 text file")
        prompts += [(f"--prompts-file line {i + 1}", line) for i, line in enumerate(lines)]
    if not prompts:
        raise UserError("--prompt", "no prompt given", "pass --prompt TEXT (repeatable) or --prompts-file F")
    for where, text in prompts:
        if not text:
            raise UserError(where, "an empty prompt", "give every prompt at least one character")
    return prompts


def run(args) -> int:
    local_jax_platform()
    _check_options(args)
    prompts = _prompts(args)
    run_dir = resolve_run(args.run, args.root)

    import numpy as np

    from trainer.checkpoint import CheckpointError
    from trainer.data.tokenizer import ByteTokenizer
    from trainer.generate import Generator, Sampling, generate_mesh
    from trainer.restore import load_run, restore_params

    try:
        cfg, spec = load_run(run_dir)
    except CheckpointError as e:  # a run directory without its config.yaml (a launch that never got that far)
        raise UserError("RUN", str(e), "pass the directory of a run that trained") from None
    tokenizer = ByteTokenizer()  # the one tokenizer data preparation writes (its manifest names it "bytes")
    ids = [tokenizer.encode(text).astype(np.int32) for _, text in prompts]
    for (where, _), tokens in zip(prompts, ids):
        if len(tokens) >= spec.max_seq_len:
            raise UserError(where, f"a prompt of {len(tokens)} tokens leaves no room in the model's max_seq_len "
                            f"{spec.max_seq_len}", f"shorten it below {spec.max_seq_len} tokens (bytes)")
    from trainer import compile_cache

    compile_cache.enable(cfg.trainer.get("compile_cache"))  # the run's setting, on this machine's disk
    mesh = generate_mesh(spec)
    try:
        params, step = restore_params(str(cfg.checkpoint.dir), args.step, mesh, spec)
    except CheckpointError as e:
        raise UserError("--step" if args.step is not None else "RUN", str(e),
                        "pass a saved --step (see the run's checkpoints directory), or leave it out for the newest"
                        if args.step is not None else "train the run until it saves a checkpoint") from None
    sampling = Sampling(greedy=args.greedy or args.temperature == 0, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    generator = Generator(spec, params, mesh, sampling, token_ids=tokenizer.vocab_size)
    results, timings = generator.generate(ids, args.max_new_tokens)
    _print(prompts, results, timings, step, tokenizer, args.json)
    return 0


def _print(prompts, results, timings, step, tokenizer, as_json: bool) -> None:
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in timings.items()}
    for i, ((_, text), r) in enumerate(zip(prompts, results)):
        continuation = tokenizer.decode(r.tokens)
        if as_json:
            print(json.dumps({"prompt": text, "text": continuation, "prompt_tokens": r.prompt_tokens,
                              "tokens": r.tokens, "stop": r.stop, "step": step, "timings": rounded}))
            continue
        print(f"--- prompt {i + 1} ({len(r.prompt_tokens)} tokens) -> {len(r.tokens)} new tokens, "
              f"stop: {r.stop}")
        print(f"{text}{continuation}")
    if not as_json:
        rate = timings["decode_tokens_per_s"]
        decode = f"decode {rate:.1f} tokens/s" if rate else "too few steps to time decoding"
        print(f"checkpoint step {step} | batch {timings['batch']} | prefill {timings['prefill_s']:.3f} s (time to "
              f"first token, compilation included) | {decode}")
