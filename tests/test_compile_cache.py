"""The persistent compilation cache (trainer.compile_cache, trainer/compile_cache.py): a second launch of a run
reads what the first compiled, on every host; `off` reads and writes nothing; a bad value stops before anything."""
import os
import re
import subprocess
import sys

import pytest

from launcher.__main__ import main
from podutil import ROOT, TINY, explain, launch, read_jsonl
from trainer.compile_cache import directory

BAD = [("", "got ''"), ("runs/jax", "got 'runs/jax'"), ("gs://bucket/jax", "got 'gs://bucket/jax'")]


@pytest.mark.parametrize("value, fragment", BAD)
def test_bad_value_is_one_error_line_before_anything_starts(value, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(tmp_path / "cache"))
    code = main(["model=tiny", f"run.dir={tmp_path}/r", f"trainer.compile_cache={value}"])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(r"error: trainer\.compile_cache: must be auto, off or an absolute directory .+"
                        r"\(set trainer\.compile_cache=auto .+\)\n", err), err
    assert fragment in err
    assert os.listdir(tmp_path) == []  # no run dir, no corpus, no cache


def test_directory_is_on_this_hosts_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(tmp_path))
    assert directory("auto") == os.path.join(str(tmp_path), "jax-compile")
    assert directory("/var/cache/jax") == "/var/cache/jax"
    assert directory("~/jax") == os.path.join(os.path.expanduser("~"), "jax")
    assert directory("off") is None and directory(None) is None  # None: a config written before the key


def test_off_wins_over_jax_own_environment_variable(tmp_path):
    """A process with trainer.compile_cache=off reads and writes no cache, even with JAX_COMPILATION_CACHE_DIR set."""
    code = ("import jax, jax.numpy as jnp\n"
            "from trainer import compile_cache\n"
            "assert compile_cache.enable('off') is None\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()\n")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax"), "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(tmp_path / "jax") or os.listdir(tmp_path / "jax") == []


def _entries(root):
    """{relative path: mtime_ns} of every file under root."""
    found = {}
    for parent, _, files in os.walk(root):
        for name in files:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
    return found


def _first_steps(run_dir, skip):
    """{host: the compile_cache stats of its first_step event}, of the events after the first `skip`."""
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))[skip:]
    return {e["host"]: e["compile_cache"] for e in events if e["event"] == "first_step"}


@pytest.mark.integration
def test_second_launch_compiles_from_the_cache_on_every_host_and_off_touches_none(tmp_path, corpus_cache):
    # The launcher's own local pod: its Ray nodes, and so the trainers, get this TPU_LAUNCHER_CACHE (auto's root).
    home = str(tmp_path / "home")
    env = {"TPU_LAUNCHER_CACHE": home}
    data = f"data.cache_dir={os.path.join(corpus_cache, 'corpus-stdlib-v1')}"  # the session's prepared corpus
    cache = os.path.join(home, "jax-compile")
    run_dir = str(tmp_path / "cc")
    common = ["run.name=cc", f"run.dir={run_dir}", *TINY, data, "optimizer.decay_steps=4", "checkpoint.every=2"]

    first = launch(*common, "trainer.steps=2", env=env)
    assert first.returncode == 0, explain(first)
    cold = _first_steps(run_dir, 0)
    assert sorted(cold) == [0, 1]
    for host, stats in cold.items():  # every host compiled; jax's own entries come from process 0 only
        assert stats["dir"] == cache and stats["hits"] == 0 and stats["requests"] > 0, stats
        assert (stats["writes"] > 0) == (host == 0) and stats["requests"] >= stats["writes"], stats
        # the state's init and the train step, kept per process
        assert stats["steps_compiled"] == 2 and stats["steps_loaded"] == 0, stats
    assert any(n.endswith("-cache") for n in os.listdir(cache)), os.listdir(cache)
    for name in ("init_state-", "train_step-"):
        assert len([n for n in os.listdir(os.path.join(cache, "aot")) if n.startswith(name)]) == 2, name
    skip = len(read_jsonl(os.path.join(run_dir, "events.jsonl")))

    second = launch(*common, "trainer.steps=4", env=env)  # resumes from step 2: a new attempt, new processes
    assert second.returncode == 0, explain(second)
    warm = _first_steps(run_dir, skip)
    assert sorted(warm) == [0, 1]
    # every host loaded its train step from disk (a resumed run has no init); host 0 also hit jax's cache
    for host, stats in warm.items():
        assert stats["steps_loaded"] == 1 and stats["steps_compiled"] == 0, (host, stats)
        assert (stats["hits"] > 0) == (host == 0), (host, stats)
    before = _entries(cache)

    # off: another model (new programs) in a new run: nothing read, nothing written under auto's directory
    off_dir = str(tmp_path / "off")
    third = launch("run.name=off", f"run.dir={off_dir}", *TINY, data, "model.d_ff=128", "trainer.steps=2",
                   "trainer.compile_cache=off", env=env)
    assert third.returncode == 0, explain(third)
    assert _first_steps(off_dir, 0) == {0: {"dir": None}, 1: {"dir": None}}
    assert _entries(cache) == before


PERSISTENT = """
import json, os, sys
import jax, jax.numpy as jnp
from trainer import compile_cache
compile_cache.enable(sys.argv[1])
step = compile_cache.Persistent(jax.jit(lambda x: {"a": jnp.broadcast_to(x, (4, 8)) * 2, "b": jnp.zeros(3) + x}),
                                "probe")
out = step(jnp.float32(1.5))
print(json.dumps({"a": float(out["a"].sum()), "b": float(out["b"].sum()), **compile_cache.stats()}))
"""


def test_an_executable_from_jax_own_cache_is_not_kept_again(tmp_path):
    """Of a program jax's own cache already holds (process 0), Persistent keeps no entry: XLA:CPU serializes an
    executable jax loaded from its cache without its kernels, and loading that entry later would fail to run
    ("Function ... not found"). Whichever way each later process gets the program, it computes the same."""
    cache = str(tmp_path / "cache")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}

    def run():
        proc = subprocess.run([sys.executable, "-c", PERSISTENT, cache], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        import json

        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (out["a"], out["b"]) == (96.0, 4.5), out
        return out

    first = run()  # compiled: jax's entry and Persistent's
    assert first["steps_compiled"] == 1 and first["hits"] == 0
    aot = os.path.join(cache, "aot")
    assert len(os.listdir(aot)) == 1
    for name in os.listdir(aot):
        os.remove(os.path.join(aot, name))
    second = run()  # jax's cache has it, Persistent's does not: served by jax, nothing written to aot/
    assert second["hits"] >= 1 and os.listdir(aot) == []
    third = run()
    assert third["hits"] >= 1 and os.listdir(aot) == []
