"""The persistent JAX compilation cache (trainer.compile_cache): one directory on this host's own disk.

`trainer.compile_cache` is `auto` (the default: $TPU_LAUNCHER_CACHE/jax-compile, else
~/.cache/tpu-launcher/jax-compile, on the host the process runs on: local disk on a TPU VM too), `off`, or an
absolute directory (`/PATH` or `~/PATH`, expanded on each host). Every attempt and every launch of a run on a host
finds what was compiled there before (as does any other run of the same program there, and eval/generate).
A run config without the key (written before it existed) compiles without the cache.

Two layers, public APIs only:
- jax's own persistent cache (jax_compilation_cache_dir) for every program. jax 0.10.2 writes its entries from
  JAX process 0 only (it expects one directory every host shares), and on CPU a program's key differs from one
  process to the next (compile options and device topology carry the process), so of a multi-process run only
  process 0 ever hits it.
- so the programs that cost the compile time, the state's init and the train and eval steps, are also kept per
  process: `Persistent`
  lowers a jitted step on its first call, and loads its executable from `aot/<key>` (written by this process in
  an earlier attempt or launch, through jax.experimental.serialize_executable) or compiles it and writes it there,
  atomically. The key is a SHA-256 of the lowered program's text (shapes, dtypes, shardings), this process's id
  and device ids, the jax/jaxlib versions and the XLA flags.

Why an entry is never reused for another program (jax 0.10.2's jax/_src/cache_key.py): the key is a SHA-256 over
the StableHLO module with debug info stripped (every shape, dtype and sharding annotation, so any change of model,
batch or mesh), the compile options (device assignment, partition count), the devices' topology or kinds, the
platform and its version, the jaxlib version and the XLA flags (a device-count flag excepted).
A cache that cannot be used (a directory that cannot be created) is a warning: the run compiles as before.
"""
import hashlib
import logging
import os
import pickle
import threading
from typing import Callable, Dict, Optional

from trainer.cache import cache_dir
from trainer.errors import first_line
from trainer.runfiles import write_atomic

log = logging.getLogger("trainer.compile_cache")

AUTO, OFF = "auto", "off"
_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
           "/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "writes"}  # jax records a "miss" when it writes an entry
_counts: Dict[str, int] = {}  # also "steps_loaded" / "steps_compiled": Persistent's own
_lock = threading.Lock()
_thread = threading.local()  # .hits: jax cache hits of compiles in this thread (jax reports them synchronously)
# Part of every Persistent key: entries of an earlier format are never loaded (format 1 could hold an executable
# that jax had loaded from its own cache, which XLA:CPU serializes without its kernels: "Function ... not found").
AOT_FORMAT = "2"
_enabled_dir: Optional[str] = None


def directory(setting: Optional[str]) -> Optional[str]:
    """The cache directory for a trainer.compile_cache setting on this host; None when off (or unset)."""
    if setting is None or str(setting) == OFF:
        return None
    return cache_dir("jax-compile") if str(setting) == AUTO else os.path.expanduser(str(setting))


def enable(setting: Optional[str]) -> Optional[str]:
    """Turn the persistent cache on for this process before its first compile; returns its directory (None: off).
    Compile requests, hits and writes from then on are counted (stats())."""
    global _enabled_dir
    path = directory(setting)
    if path is None:
        if setting is not None:  # off: also a JAX_COMPILATION_CACHE_DIR from the environment
            import jax

            jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("compile cache off: cannot create %s (%s); set trainer.compile_cache to a writable directory "
                    "or off", path, e)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # default 1 s: most programs here are faster
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if _enabled_dir is None:
        jax.monitoring.register_event_listener(_count)
    _enabled_dir = path
    return path


def stats() -> Dict[str, object]:
    """{"dir", "requests", "hits", "writes"} of jax's cache and {"steps_loaded", "steps_compiled"} of Persistent
    since enable(); {"dir": None} when the cache is off."""
    with _lock:
        counts = {name: _counts.get(name, 0) for name in (*_EVENTS.values(), "steps_loaded", "steps_compiled")}
    return {"dir": _enabled_dir, **counts} if _enabled_dir else {"dir": None}


def _count(event: str, **_) -> None:
    name = _EVENTS.get(event)
    if name is not None:
        with _lock:
            _counts[name] = _counts.get(name, 0) + 1
        if name == "hits":
            _thread.hits = getattr(_thread, "hits", 0) + 1


def _count_step(name: str) -> None:
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1


class Persistent:
    """A jitted step whose executable this process keeps in the cache directory across attempts and launches.
    Called like the jitted function, always with arguments of the same shapes and shardings (a train or eval
    step); with the cache off it is the jitted function itself."""

    def __init__(self, jitted: Callable, name: str):
        self.jitted, self.name = jitted, name
        self.compiled = None

    def __call__(self, *args):
        if _enabled_dir is None:
            return self.jitted(*args)
        if self.compiled is None:
            self.compiled = self._load_or_compile(args)
        return self.compiled(*args)

    def _load_or_compile(self, args):
        import jax
        import jaxlib
        from jax.experimental import serialize_executable

        lowered = self.jitted.lower(*args)
        key = hashlib.sha256("\n".join([
            lowered.as_text(), f"process {jax.process_index()} of {jax.process_count()}",
            " ".join(f"{d.id}@{d.process_index}" for d in jax.devices()), jax.__version__,
            jaxlib.__version__, os.environ.get("XLA_FLAGS", ""),
            os.environ.get("LIBTPU_INIT_ARGS", ""), f"aot format {AOT_FORMAT}"]).encode()).hexdigest()
        path = os.path.join(_enabled_dir, "aot", f"{self.name}-{key}")
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    payload, in_tree, out_tree = pickle.load(f)
                compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
                _count_step("steps_loaded")
                return compiled
            except Exception as e:  # noqa: BLE001 - a damaged or foreign entry: compile and replace it
                log.warning("compile cache: could not load %s (%s); compiling it again", path, first_line(e))
        hits = getattr(_thread, "hits", 0)
        compiled = lowered.compile()
        _count_step("steps_compiled")
        if getattr(_thread, "hits", 0) > hits:
            # jax's own cache had it (process 0): serialized again, an executable jax loaded from its cache
            # misses its kernels on XLA:CPU; jax's cache serves this process next time anyway
            return compiled
        try:
            write_atomic(path, pickle.dumps(serialize_executable.serialize(compiled)))
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written never stops a run
            log.warning("compile cache: could not write %s: %s", path, first_line(e))
        return compiled
