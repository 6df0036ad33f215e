"""sha256 over the full parameter values in a fixed (sorted path) order: identical on any device layout."""
import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils


def params_digest(params) -> str:
    """Gathers every parameter to every host (collective: call on all hosts), hashes name, shape and bytes."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    items = sorted((jax.tree_util.keystr(path), leaf) for path, leaf in flat)
    h = hashlib.sha256()
    for name, leaf in items:
        value = np.asarray(multihost_utils.process_allgather(leaf, tiled=True), dtype=np.float32)
        h.update(name.encode())
        h.update(str(value.shape).encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()
