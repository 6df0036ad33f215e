"""Tests for KV-cache generation (trainer/generate.py, `tpu-launch generate`): the training forward pass and param
tree unchanged by the cache; greedy cached decoding of a left-padded batch equal, token for token, to recomputing
the full unpadded forward pass per token (rotary and learned positions); no compilation per token; one seed's
samples equal on 1 and 4 devices; top-k / top-p cuts; the command on the shared `trained_run`; bad input exit 2."""
import hashlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from podutil import ROOT, explain, tpu_launch
from trainer.generate import Generator, Sampling, generate_mesh, sample
from trainer.model import ModelSpec, TransformerLM

# sha256 prefixes of the init params (paths and values) and of the training logits of _spec(positions) at
# jax.random.key(3) on _TOKENS. The params' are from the model before the KV cache existed (commit 017e13c). The
# logits' were taken again when attention moved from a hand-built score tensor to jax.nn.dot_product_attention
# (another order of float32 operations; tests/test_model.py checks the two agree to 1e-6); the KV cache left
# the logits of both bit for bit as they were.
BEFORE_CACHE = {"rotary": ("56738dc7e9d16fe7", "800f748f562251c9"),
                "learned": ("2189c62d2ddd705d", "ea21d4f0302922a6")}
_TOKENS = (jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) * 7) % 257
PROMPTS = [np.array([5, 6, 7]), np.arange(1, 20) % 200, np.array([42]), np.array([9, 8, 7, 6, 5, 4, 3, 2])]


def _spec(positions: str, max_seq_len: int = 48, **more) -> ModelSpec:
    return ModelSpec(vocab_size=257, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=max_seq_len,
                     positions=positions, **more)


def _digest(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]):
        h.update(path.encode())
        h.update(np.asarray(leaf, np.float32).tobytes())
    return h.hexdigest()[:16]


def _params(spec: ModelSpec, seed: int = 1):
    return nn.meta.unbox(TransformerLM(spec).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_training_forward_and_param_tree_unchanged(positions):
    model = TransformerLM(_spec(positions))
    params = nn.meta.unbox(model.init(jax.random.key(3), _TOKENS)["params"])
    assert (_digest(params), _digest(model.apply({"params": params}, _TOKENS))) == BEFORE_CACHE[positions]


def _recompute_greedy(spec, params, prompt, n: int):
    """The reference: the training forward pass over the whole unpadded sequence for every new token."""
    model, tokens, out = TransformerLM(spec), [int(t) for t in prompt], []
    for _ in range(n):
        nxt = int(jnp.argmax(model.apply({"params": params}, jnp.array([tokens]))[0, -1]))
        out.append(nxt)
        tokens.append(nxt)
    return out


@pytest.mark.parametrize("positions,layout", [("rotary", {}), ("learned", {}),
                                              ("rotary", {"scan_layers": True, "remat": "full"})])
def test_cached_greedy_equals_full_recompute_in_one_left_padded_batch(positions, layout):
    spec = _spec(positions, **layout)
    params = _params(spec)
    gen = Generator(spec, params, generate_mesh(spec), Sampling(greedy=True))
    results, timings = gen.generate(PROMPTS, 10)
    assert timings["prompt_width"] == 24 and timings["batch"] == len(PROMPTS)
    for prompt, r in zip(PROMPTS, results):
        assert r.tokens == _recompute_greedy(spec, params, prompt, 10), f"prompt of {len(prompt)} tokens"
        assert r.prompt_tokens == prompt.tolist() and r.stop == "max_new_tokens"
    # Nothing compiles per token: one prefill and one step executable for the whole call, and again for other
    # prompts of the same rounded width.
    assert (gen.prefill._cache_size(), gen.step._cache_size()) == (1, 1)
    gen.generate([np.array([1, 2]), np.arange(17) + 3, np.array([7]), np.array([8, 9])], 10)
    assert (gen.prefill._cache_size(), gen.step._cache_size()) == (1, 1)


def test_a_row_stops_at_max_seq_len_and_others_go_on():
    spec = _spec("rotary", max_seq_len=24)
    params = _params(spec)
    prompts = [np.arange(20) + 1, np.array([3, 4])]
    results, _ = Generator(spec, params, generate_mesh(spec), Sampling(greedy=True)).generate(prompts, 10)
    assert (len(results[0].tokens), results[0].stop) == (4, "max_seq_len")  # 20 + 4 = max_seq_len
    assert (len(results[1].tokens), results[1].stop) == (10, "max_new_tokens")
    assert results[0].tokens == _recompute_greedy(spec, params, prompts[0], 4)


def test_top_k_and_top_p_cut_the_draw():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 64))
    draws = lambda **kw: {int(t) for s in range(8) for t in sample(logits, s, Sampling(**kw))}  # noqa: E731
    assert draws(top_k=1) == {0} and draws(top_p=0.4) == {0}
    assert draws(top_k=2) == {0, 1} and draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7: the second is needed too
    assert draws() == {0, 1, 2, 3}
    assert draws(greedy=True) == {0} and draws(temperature=0.0) == {0}


def test_ids_past_the_tokenizer_vocabulary_are_never_drawn():
    spec = _spec("rotary")
    gen = Generator(spec, _params(spec), generate_mesh(spec), Sampling(temperature=5.0), token_ids=100)
    results, _ = gen.generate(PROMPTS, 16)
    drawn = [t for r in results for t in r.tokens]
    assert len(drawn) == 16 * len(PROMPTS) and max(drawn) < 100 and len(set(drawn)) > 20


_SAMPLE_SCRIPT = """
import json, sys, flax.linen as nn, jax, jax.numpy as jnp
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_generate import PROMPTS, _spec
from trainer.generate import Generator, Sampling, generate_mesh
from trainer.model import TransformerLM
from trainer.sharding import logical_to_sharding
spec = _spec("rotary")
mesh = generate_mesh(spec)
boxed = TransformerLM(spec).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
params = jax.device_put(nn.meta.unbox(boxed), logical_to_sharding(nn.get_partition_spec(boxed), mesh))
for seed in (3, 4):
    results, _ = Generator(spec, params, mesh, Sampling(temperature=0.8, top_k=40, top_p=0.95, seed=seed)).generate(
        PROMPTS, 12)
    print(json.dumps({{"devices": len(jax.devices()), "fsdp": mesh.shape["fsdp"], "seed": seed,
                      "tokens": [r.tokens for r in results]}}))
"""


def _samples(devices: int):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    code = _SAMPLE_SCRIPT.format(root=ROOT, tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_sampling_is_the_same_for_a_seed_on_one_and_four_devices():
    one, four = _samples(1), _samples(4)
    assert [(r["devices"], r["fsdp"]) for r in one + four] == [(1, 1)] * 2 + [(4, 4)] * 2  # params sharded 4 ways
    assert [r["tokens"] for r in one] == [r["tokens"] for r in four]
    assert one[0]["tokens"] != one[1]["tokens"]  # the seed does decide the draw


# The command ------------------------------------------------------------------------------------------------
def test_generate_continues_a_prompt_from_the_trained_run(trained_run):
    proc = tpu_launch("generate", trained_run, "--prompt", "def ", "--max-new-tokens", "8", "--greedy")
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("--- prompt 1 (4 tokens) -> ") and lines[1].startswith("def ")
    assert "checkpoint step 12" in proc.stdout and "tokens/s" in proc.stdout

    proc = tpu_launch("generate", trained_run, "--prompt", "def ", "--prompt", "import os", "--max-new-tokens", "8",
                      "--top-p", "0.9", "--seed", "1", "--json", "--step", "8")
    assert proc.returncode == 0, explain(proc)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["def ", "import os"] and {r["step"] for r in rows} == {8}
    assert rows[0]["prompt_tokens"] == list(b"def ")
    for r in rows:
        assert 1 <= len(r["tokens"]) <= 8 and r["stop"] in ("eos", "max_new_tokens")
        assert r["text"] == bytes(t for t in r["tokens"] if t < 256).decode("utf-8", errors="replace")
        assert r["timings"]["time_to_first_token_s"] > 0


def _listing(root: str):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.stat(os.path.join(d, f)).st_mtime_ns)
                  for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("args,key", [
    (["--prompt", ""], "--prompt"),
    (["--prompt", "x" * 256], "--prompt"),
    (["--prompt", "def ", "--step", "5"], "--step"),
    (["--prompt", "def ", "--top-p", "0"], "--top-p"),
    (["--prompt", "def ", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "def ", "--temperature", "-1"], "--temperature"),
    (["--prompt", "def ", "--top-k", "0"], "--top-k"),
    (["--prompt", "def ", "--max-new-tokens", "0"], "--max-new-tokens"),
    ([], "--prompt"),
])
def test_bad_input_is_one_line_and_exit_2(trained_run, args, key):
    before = _listing(trained_run)
    proc = tpu_launch("generate", trained_run, *args)
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.strip().startswith(f"error: {key}:") and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr
    assert _listing(trained_run) == before


def test_a_run_without_a_checkpoint_is_exit_2(tmp_path, trained_run):
    run = str(tmp_path / "fresh")
    os.makedirs(run)
    config = open(os.path.join(trained_run, "config.yaml")).read()
    open(os.path.join(run, "config.yaml"), "w").write(config.replace(trained_run, run))
    proc = tpu_launch("generate", run, "--prompt", "def ")
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.startswith("error: RUN:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(os.listdir(run)) == ["config.yaml"]
