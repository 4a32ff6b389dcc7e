"""Deterministic answers: the word cycle whose words are one token each, and embeddings."""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import orjson

# Each word is one token, bare and with a leading space, in cl100k_base and o200k_base, and
# the pre-tokenizer splits before every space: a text of N words is exactly N tokens.
WORDS: tuple[str, ...] = (
    "sit", "sed", "do", "ut", "et", "ad", "quis", "ex", "ea", "in", "esse", "non", "qui",
    "anim", "id", "est", "the", "of", "and", "to", "a", "is", "that", "for", "it", "as",
    "with", "was", "on", "be", "by", "this", "are", "from", "at", "or", "an", "have", "not",
    "but", "which", "one", "all", "were", "can", "more", "when", "there", "has", "will",
    "their", "if", "about", "so", "time", "up", "out", "some", "them", "into", "other",
    "than", "then", "its",
)  # fmt: skip
_SPACED = tuple(" " + w for w in WORDS)


def word_offset(prompt: Any) -> int:
    """Where in the word cycle the answer starts: a function of the prompt only."""
    return zlib.crc32(orjson.dumps(prompt, option=orjson.OPT_SORT_KEYS)) % len(WORDS)


def token_text(offset: int, start: int, count: int) -> str:
    """Tokens start..start+count of the answer beginning at word `offset`."""
    n = len(WORDS)
    parts = [_SPACED[(offset + i) % n] for i in range(start, start + count)]
    if start == 0 and parts:
        parts[0] = WORDS[offset % n]
    return "".join(parts)


def completion_text(offset: int, tokens: int) -> str:
    return token_text(offset, 0, tokens)


def embedding_vector(item: Any, dims: int) -> list[float]:
    """A deterministic unit vector for one input item (xorshift seeded by its CRC)."""
    state = zlib.crc32(orjson.dumps(item)) or 1
    out = []
    for _ in range(dims):
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        out.append(state / 2147483648.0 - 1.0)
    norm = math.sqrt(sum(v * v for v in out)) or 1.0
    # Rounded to float32 so the float and base64 forms carry the same numbers.
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in out]
