"""Decode benchmark: tokens/s of KV-cache generation next to recomputing the full forward pass per token, batch 1 and 8.

One invocation, one model (a random-init spec, `--d-model` ..., or a run's checkpoint with `--run`), the same
prompts (`--prompt-len` bytes each, lengths staggered so the batch is left-padded) and the same devices for
every part:

- cached: trainer/generate.py's Generator (one prefill, one cached step per token), greedy;
- recompute: the training forward pass over a fixed right-padded [batch, prompt + new tokens] buffer for every new
  token (causal, so the padding after a row's last token never changes its next token), greedy, jitted once.

Each part runs twice and the second (warm: compiled) run is timed, end to end (prefill + every new token):
tokens/s = new tokens of all rows / wall seconds. The greedy tokens of both must agree (printed as `match`).
Prints the four rates and the ratios (cached / recompute per batch, batch 8 / batch 1 per method) side by side,
then one JSON line. Speed goals live here; the tests never assert wall-clock times.

    python bench/decode.py                       # random-init spec, 64 new tokens
    python bench/decode.py --run runs/demo       # a trained run's newest checkpoint
    python bench/decode.py --quick --json out.json
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _jsonline import add_json_arg, emit  # noqa: E402 - bench/_jsonline.py, next to this file

BATCHES = (1, 8)


def _model(args):
    """(spec, params on the decode mesh, mesh, where they come from)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from trainer.generate import generate_mesh
    from trainer.model import ModelSpec, TransformerLM
    from trainer.sharding import logical_to_sharding

    if args.run:
        from trainer.restore import load_run, restore_params

        cfg, spec = load_run(args.run)
        mesh = generate_mesh(spec)
        params, step = restore_params(str(cfg.checkpoint.dir), None, mesh, spec)
        return spec, params, mesh, f"{args.run} step {step}"
    spec = ModelSpec(vocab_size=257, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                     d_ff=4 * args.d_model, max_seq_len=args.max_seq_len, positions=args.positions)
    mesh = generate_mesh(spec)
    boxed = TransformerLM(spec).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.device_put(nn.meta.unbox(boxed), logical_to_sharding(nn.get_partition_spec(boxed), mesh))
    return spec, params, mesh, "random init"


def _prompts(batch: int, length: int):
    import numpy as np

    text = (b"def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
            * 8)
    return [np.frombuffer(text[b:b + length - (b % 4)], np.uint8).astype(np.int32) for b in range(batch)]


def _cached(spec, params, mesh, prompts, new_tokens: int):
    from trainer.data.tokenizer import VOCAB_SIZE
    from trainer.generate import Generator, Sampling

    gen = Generator(spec, params, mesh, Sampling(greedy=True), token_ids=VOCAB_SIZE)
    gen.generate(prompts, new_tokens)  # compiles
    t0 = time.perf_counter()
    results, timings = gen.generate(prompts, new_tokens)
    wall = time.perf_counter() - t0
    return [r.tokens for r in results], wall, timings


def _recompute(spec, params, prompts, new_tokens: int):
    """Greedy decoding that runs the training forward pass over the whole sequence for every new token."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from trainer.data.tokenizer import EOS_ID, VOCAB_SIZE
    from trainer.model import TransformerLM

    model = TransformerLM(spec)
    width = max(len(p) for p in prompts) + new_tokens

    @jax.jit
    def next_token(params, buf, lengths):
        logits = model.apply({"params": params}, buf)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        last = jnp.where(jnp.arange(last.shape[-1]) < VOCAB_SIZE, last, -jnp.inf)  # as the Generator's token_ids
        token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        rows = jnp.arange(buf.shape[0])
        return token, buf.at[rows, lengths].set(token), lengths + 1

    def run():
        buf = np.zeros((len(prompts), width), np.int32)
        for b, p in enumerate(prompts):
            buf[b, :len(p)] = p
        buf, lengths, out = jnp.asarray(buf), jnp.asarray([len(p) for p in prompts], jnp.int32), []
        for _ in range(new_tokens):
            token, buf, lengths = next_token(params, buf, lengths)
            out.append(np.asarray(token))  # as the cached loop: one small copy per token
        drawn = np.stack(out, axis=1).tolist()
        return [row[:row.index(EOS_ID) + 1] if EOS_ID in row else row for row in drawn]

    run()  # compiles
    t0 = time.perf_counter()
    tokens = run()
    return tokens, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/decode.py", description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="a run directory: its newest checkpoint (default: random init)")
    p.add_argument("--quick", action="store_true", help="smoke version: --new-tokens 16 --prompt-len 16")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (default 64)")
    p.add_argument("--prompt-len", type=int, default=None, help="bytes of the longest prompt (default 64)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--positions", default="rotary", choices=("rotary", "learned"))
    add_json_arg(p)
    args = p.parse_args(argv)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.prompt_len = args.prompt_len or (16 if args.quick else 64)

    import jax

    spec, params, mesh, source = _model(args)
    print(f"[bench] {source}: d_model {spec.d_model}, {spec.n_layers} layers, {spec.n_heads} heads, "
          f"{spec.positions}; {len(jax.devices())} {jax.devices()[0].platform} devices (mesh "
          f"{dict(mesh.shape)}); prompts up to {args.prompt_len} bytes, {args.new_tokens} new tokens", flush=True)
    result = {"source": source, "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
              "d_model": spec.d_model, "n_layers": spec.n_layers, "new_tokens": args.new_tokens,
              "prompt_len": args.prompt_len}
    for batch in BATCHES:
        prompts = _prompts(batch, args.prompt_len)
        cached, cached_wall, timings = _cached(spec, params, mesh, prompts, args.new_tokens)
        recomputed, recompute_wall = _recompute(spec, params, prompts, args.new_tokens)
        n_cached, n_recomputed = sum(len(t) for t in cached), sum(len(t) for t in recomputed)
        result[f"batch{batch}"] = {
            "cached_tokens_per_s": n_cached / cached_wall, "recompute_tokens_per_s": n_recomputed / recompute_wall,
            "cached_steady_decode_tokens_per_s": timings["decode_tokens_per_s"],
            "time_to_first_token_s": timings["time_to_first_token_s"], "match": cached == recomputed}
    b1, b8 = result["batch1"], result["batch8"]
    print(f"  {'tokens/s (warm, end to end)':<32}{'batch 1':>12}{'batch 8':>12}{'8 / 1':>10}")
    for name, key in (("KV cache", "cached_tokens_per_s"), ("recompute full forward", "recompute_tokens_per_s")):
        print(f"  {name:<32}{b1[key]:>12.1f}{b8[key]:>12.1f}{b8[key] / b1[key]:>10.2f}")
    ratios = [b["cached_tokens_per_s"] / b["recompute_tokens_per_s"] for b in (b1, b8)]
    print(f"  {'cached / recompute':<32}{ratios[0]:>12.2f}{ratios[1]:>12.2f}")
    print(f"  time to first token (warm): batch 1 {b1['time_to_first_token_s'] * 1e3:.1f} ms, batch 8 "
          f"{b8['time_to_first_token_s'] * 1e3:.1f} ms; greedy tokens of both methods match: "
          f"{'yes' if b1['match'] and b8['match'] else 'NO'}")
    result["cached_over_recompute"] = {"batch1": ratios[0], "batch8": ratios[1]}
    result["batch8_over_batch1"] = {"cached": b8["cached_tokens_per_s"] / b1["cached_tokens_per_s"],
                                    "recompute": b8["recompute_tokens_per_s"] / b1["recompute_tokens_per_s"]}
    emit(result, args.json)
    return 0 if b1["match"] and b8["match"] else 1


if __name__ == "__main__":
    sys.exit(main())
