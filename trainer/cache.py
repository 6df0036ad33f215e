"""This machine's cache directory: $TPU_LAUNCHER_CACHE, else ~/.cache/tpu-launcher (corpus, locks, measured peak)."""
import os

ENV = "TPU_LAUNCHER_CACHE"


def cache_dir(*parts: str) -> str:
    root = os.environ.get(ENV) or os.path.join("~", ".cache", "tpu-launcher")
    return os.path.join(os.path.expanduser(root), *parts)
