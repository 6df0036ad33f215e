"""Byte-level tokenizer: UTF-8 bytes are token ids 0..255, plus one EOS id; no downloads."""

from __future__ import annotations

import numpy as np

EOS_ID = 256
VOCAB_SIZE = 257


class ByteTokenizer:
    """Maps text to its UTF-8 bytes (ids 0..255); id 256 is end-of-document."""

    name = "bytes"
    eos_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of `text` as a uint16 array (no EOS appended)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Inverse of encode; ids >= 256 (EOS, padding) are dropped, bad UTF-8 replaced."""
        arr = np.asarray(ids).reshape(-1)
        arr = arr[(arr >= 0) & (arr < 256)].astype(np.uint8)
        return arr.tobytes().decode("utf-8", errors="replace")
