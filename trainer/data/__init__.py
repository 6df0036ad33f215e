"""Token-shard datasets: prepare a corpus into shards, stream per-host training/eval batches."""

from .corpus import default_cache_dir, ensure_default_corpus
from .errors import DataError
from .prepare import prepare
from .stream import BatchStream, eval_batches, read_manifest
from .tokenizer import EOS_ID, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "BatchStream", "ByteTokenizer", "DataError", "EOS_ID", "VOCAB_SIZE", "default_cache_dir",
    "ensure_default_corpus", "eval_batches", "prepare", "read_manifest",
]
