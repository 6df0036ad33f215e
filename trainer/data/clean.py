"""Document cleaning: normalise text, drop empty, binary and exactly duplicated documents."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from typing import Iterable

# Control characters other than tab, newline, carriage return, form feed and vertical tab
# (C0 controls, DEL and the C1 block).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
# A document with more than this fraction of control characters is treated as binary.
MAX_CONTROL_FRACTION = 0.05


@dataclasses.dataclass
class CleanResult:
    """Documents kept (as (name, text) pairs, input order) and how many were dropped why."""

    docs: list[tuple[str, str]]
    dropped_empty: int = 0
    dropped_binary: int = 0
    dropped_duplicate: int = 0

    def counts(self) -> dict:
        return {
            "input_documents": len(self.docs) + self.dropped_empty + self.dropped_binary + self.dropped_duplicate,
            "kept": len(self.docs),
            "dropped_empty": self.dropped_empty,
            "dropped_binary": self.dropped_binary,
            "dropped_duplicate": self.dropped_duplicate,
        }


def decode_text(data: bytes | str) -> str | None:
    """Returns the document as text, or None when it looks binary.

    Binary means: contains a NUL, is not valid UTF-8, or has a high fraction of
    control characters.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        if b"\x00" in data:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    else:
        text = data
    if "\x00" in text:
        return None
    if text and len(_CONTROL.findall(text)) > MAX_CONTROL_FRACTION * len(text):
        return None
    return text


def clean_text(text: str) -> str:
    """NFC-normalises, unifies newlines to \\n, strips trailing whitespace on each line
    and blank lines at both ends (indentation of the first line is kept)."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip("\n")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def clean_documents(docs: Iterable[tuple[str, bytes | str]]) -> CleanResult:
    """Cleans (name, raw) documents; raw may be bytes (checked for binary) or str."""
    result = CleanResult(docs=[])
    seen: set[str] = set()
    for name, raw in docs:
        text = decode_text(raw)
        if text is None:
            result.dropped_binary += 1
            continue
        text = clean_text(text)
        if not text.strip():
            result.dropped_empty += 1
            continue
        digest = text_sha256(text)
        if digest in seen:
            result.dropped_duplicate += 1
            continue
        seen.add(digest)
        result.docs.append((name, text))
    return result
