"""The persistent JAX compilation cache of one process (trainer.compile_cache): a directory on this host's own disk.

`trainer.compile_cache` is `auto` (the default: $TPU_LAUNCHER_CACHE/jax-compile, else
~/.cache/tpu-launcher/jax-compile, on the host the process runs on: local disk on a TPU VM too), `off`, or an
absolute directory (`/PATH` or `~/PATH`, expanded on each host). Each process uses the subdirectory
`process-<JAX process id>` of it, so every attempt and every launch of a run on a host finds what that host
compiled before (as does any other run of the same program there). The one-process commands (eval, generate)
use `process-0`. `off` turns jax's cache off, even where JAX_COMPILATION_CACHE_DIR is set. A run config without
the key (written before it existed) compiles as jax would without it.

Why an entry is never reused for another program (read in jax 0.10.2's jax/_src/cache_key.py): the key is a
SHA-256 over the StableHLO module with debug info stripped (every shape, dtype and sharding annotation, so any
change of model, batch or mesh), the compile options (device assignment, partition count, SPMD and debug
options), the devices' topology fingerprint (or their kinds), the platform and its version, the jaxlib version
and the XLA flags (XLA_FLAGS, LIBTPU_INIT_ARGS; a device-count flag excepted).

Two things of jax 0.10.2's own cache this module changes (jax/_src/compiler.py, jax/_src/lru_cache.py), so that
the cache works per host: (1) jax writes entries from process 0 only (it expects one directory shared by all
hosts, e.g. on GCS), so with a cache on each host's own disk the other hosts would never get any: here every
process writes its own; (2) jax writes an entry in place (open + write), so a process killed mid-write leaves a
truncated entry that jax then warns about and never replaces: here an entry is written to a temporary file and
renamed into place, so a reader (another run on this machine, a later attempt) sees a whole entry or none.
With a jax where the hooks differ, the cache still works with jax's own behaviour, and a warning says so.
A cache that cannot be used (a directory that cannot be created) is a warning too: the run compiles as before.
"""
import logging
import os
import threading
from typing import Dict, Optional

from trainer.cache import cache_dir

log = logging.getLogger("trainer.compile_cache")

AUTO, OFF = "auto", "off"
_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
           "/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "writes"}  # jax records a "miss" when it writes the entry
_counts: Dict[str, int] = {}
_lock = threading.Lock()
_enabled_dir: Optional[str] = None


def directory(setting: Optional[str], process_id: int = 0) -> Optional[str]:
    """This process's cache directory for a trainer.compile_cache setting; None when off (or unset)."""
    if setting is None or str(setting) == OFF:
        return None
    base = cache_dir("jax-compile") if str(setting) == AUTO else os.path.expanduser(str(setting))
    return os.path.join(base, f"process-{int(process_id)}")


def enable(setting: Optional[str], process_id: int = 0) -> Optional[str]:
    """Turn the persistent cache on for this process before its first compile; returns its directory (None: off).
    Compile requests, hits and writes from then on are counted (stats())."""
    global _enabled_dir
    path = directory(setting, process_id)
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
    _install_hooks()
    if _enabled_dir is None:
        jax.monitoring.register_event_listener(_count)
    _enabled_dir = path
    return path


def stats() -> Dict[str, object]:
    """{"dir", "requests", "hits", "writes"} since enable(); {"dir": None} when the cache is off."""
    with _lock:
        counts = {name: _counts.get(name, 0) for name in _EVENTS.values()}
    return {"dir": _enabled_dir, **counts} if _enabled_dir else {"dir": None}


def _count(event: str, **_) -> None:
    name = _EVENTS.get(event)
    if name is not None:
        with _lock:
            _counts[name] = _counts.get(name, 0) + 1


_hooks_installed = False
_WRITE_PARAMS = ("cache_key", "compile_time_secs", "module_name", "backend", "executable", "host_callbacks")


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    import inspect

    try:
        from jax._src import compilation_cache, compiler
        from jax._src import config as jax_config
        from jax._src.lru_cache import LRUCache

        params = tuple(inspect.signature(compiler._cache_write).parameters)
        file_cache_params = tuple(inspect.signature(compilation_cache.get_file_cache).parameters)
    except (ImportError, AttributeError, ValueError) as e:
        log.warning("compile cache: jax's cache internals differ from jax 0.10.2's (%s): only process 0 writes "
                    "entries, in place", e)
        return
    if params != _WRITE_PARAMS or file_cache_params != ("path",):
        log.warning("compile cache: jax's cache internals differ from jax 0.10.2's: only process 0 writes "
                    "entries, in place")
        return

    class AtomicFileCache(LRUCache):
        """jax's file cache (no size limit) whose entries appear whole: written aside, then renamed."""

        def put(self, key: str, value: bytes) -> None:
            if not key:
                raise ValueError("key cannot be empty")
            final = os.path.join(str(self.path), f"{key}-cache")  # jax's LRUCache file name: get() reads it
            if os.path.exists(final):
                return
            tmp = f"{final}.tmp-{os.getpid()}-{threading.get_ident()}"
            try:
                with open(tmp, "wb") as f:
                    f.write(value)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def get_file_cache(path):
        return AtomicFileCache(path, max_size=-1), path

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        """jax's _cache_write without its process-0 rule: each process writes to its own host's directory."""
        if host_callbacks:  # baked into the program: not reusable by another process (jax skips these too)
            return
        if compile_time_secs < jax_config.persistent_cache_min_compile_time_secs.value:
            return
        try:
            compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                      int(compile_time_secs))
        except Exception as e:  # noqa: BLE001 - like jax: a cache that cannot be written never stops a compile
            log.warning("compile cache: could not write the entry for %s: %s: %s", module_name, type(e).__name__, e)

    compilation_cache.get_file_cache = get_file_cache
    compiler._cache_write = cache_write
    _hooks_installed = True
