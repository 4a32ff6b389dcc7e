"""Token counting: known counts, the cookbook chat rule, model mapping and offline BPE seeding."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import tiktoken
import tiktoken.load

from proxy import tokens
from proxy.tokens import BUNDLED_SHA256, BpeDataError, TokenCounter, cache_path, seed_cache

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", refuse)


# --------------------------------------------------------------------------- counting


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o", None])
def test_hello_world_is_two_tokens(counter: TokenCounter, model: str | None) -> None:
    assert counter.count_text("hello world", model) == 2
    assert counter.count_text("", model) == 0


def test_special_tokens_are_ordinary_text(counter: TokenCounter) -> None:
    # encode() would raise on "<|endoftext|>"; as ordinary text it is several tokens.
    assert counter.count_text("<|endoftext|>", "gpt-4") > 1
    assert counter.count_text("x <|endofprompt|> y", "gpt-4o") > 3


COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo-0613", 129), ("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_cookbook_example(counter: TokenCounter, model: str, expected: int) -> None:
    # prompt_tokens published in OpenAI's "How to count tokens with tiktoken" cookbook.
    assert counter.count_chat(COOKBOOK_MESSAGES, model) == expected


def test_chat_rule_structure(counter: TokenCounter) -> None:
    t = lambda s: counter.count_text(s, "gpt-4")  # noqa: E731
    one = [{"role": "user", "content": "hello world"}]
    assert counter.count_chat(one, "gpt-4") == 3 + 3 + t("user") + t("hello world")
    named = [{"role": "user", "name": "bob", "content": "hello world"}]
    assert counter.count_chat(named, "gpt-4") == counter.count_chat(one, "gpt-4") + t("bob") + 1
    assert counter.count_chat([], "gpt-4") == 3


def test_chat_content_parts_and_none(counter: TokenCounter) -> None:
    m = "gpt-4o"
    plain = counter.count_chat([{"role": "user", "content": "describe this picture"}], m)
    parts = [
        {"type": "text", "text": "describe this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": " picture"},
    ]
    with_parts = counter.count_chat([{"role": "user", "content": parts}], m)
    t = lambda s: counter.count_text(s, m)  # noqa: E731
    assert with_parts == plain - t("describe this picture") + t("describe this") + t(" picture")
    none = counter.count_chat([{"role": "assistant", "content": None}], m)
    assert none == 3 + 3 + t("assistant")  # reply priming + message overhead + role


def test_chat_tool_calls_and_tools(counter: TokenCounter) -> None:
    m = "gpt-4o"
    t = lambda s: counter.count_text(s, m)  # noqa: E731
    args = '{"city": "Paris"}'
    msg = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": args}}
        ],
    }
    base = counter.count_chat([{"role": "assistant", "content": None}], m)
    assert counter.count_chat([msg], m) == base + t("weather") + t(args)
    legacy = {"role": "assistant", "function_call": {"name": "weather", "arguments": args}}
    assert counter.count_chat([legacy], m) == base + t("weather") + t(args)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    text = '[{"type":"function","function":{"name":"weather","parameters":{}}}]'
    assert counter.count_chat([msg], m, tools=tools) == counter.count_chat([msg], m) + t(text)


@pytest.mark.parametrize("bad", [None, "hi", {"role": "user"}, [1], ["user"]])
def test_chat_bad_shapes_raise_type_error(counter: TokenCounter, bad: object) -> None:
    with pytest.raises(TypeError):
        counter.count_chat(bad, "gpt-4")  # type: ignore[arg-type]


def test_chat_unserialisable_tools(counter: TokenCounter) -> None:
    with pytest.raises(TypeError):
        counter.count_chat([], "gpt-4", tools=[object()])


def test_prompt_shapes(counter: TokenCounter) -> None:
    m = "gpt-3.5-turbo-instruct"
    assert counter.count_prompt("hello world", m) == 2
    assert counter.count_prompt(["hello world", "hello"], m) == 3
    assert counter.count_prompt([1, 2, 3], m) == 3
    assert counter.count_prompt([[1, 2], [3], []], m) == 3
    assert counter.count_prompt([], m) == 0
    assert counter.count_embedding_input(["hello world", [5, 6, 7]], m) == 5


@pytest.mark.parametrize("bad", [None, 3, {"a": 1}, [1, "a"], [True], [[1, "x"]], [None], 2.5])
def test_prompt_bad_shapes(counter: TokenCounter, bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        counter.count_prompt(bad, "gpt-4")
    with pytest.raises((TypeError, ValueError)):
        counter.count_embedding_input(bad, "gpt-4")


def test_count_text_rejects_non_strings(counter: TokenCounter) -> None:
    with pytest.raises(TypeError):
        counter.count_text(b"bytes", "gpt-4")  # type: ignore[arg-type]


def test_rust_panic_becomes_windowed_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiktoken raises pyo3's PanicException (a BaseException) e.g. on ~1M-char whitespace runs.
    PanicException = type("PanicException", (BaseException,), {})
    enc = tokens.get_encoding("cl100k_base")

    class Fragile:
        def encode_ordinary(self, text: str) -> list[int]:
            if len(text) > tokens._WINDOW_CHARS:
                raise PanicException("stack overflow")
            return enc.encode_ordinary(text)

    text = "word " * 40_000  # 200k chars: about four windows
    n = tokens._encode_len(Fragile(), text)  # type: ignore[arg-type]
    assert abs(n - len(enc.encode_ordinary(text))) <= 4

    class Broken:
        def encode_ordinary(self, text: str) -> list[int]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # only panics are swallowed
        tokens._encode_len(Broken(), "x")  # type: ignore[arg-type]


def test_real_panic_input_is_counted(counter: TokenCounter) -> None:
    # A ~1M-char whitespace run overflows tiktoken's regex stack (a Rust panic) in 0.14.
    text = " " * 1_100_000 + "x"
    assert counter.count_text(text, "gpt-4o") > 1_100_000 // 200


# --------------------------------------------------------------------------- model mapping


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("GPT-4O", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-32k-0314", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("ft:gpt-4o-mini-2024-07-18:my-org::abc123", "o200k_base"),
        ("ft:gpt-3.5-turbo-0125:my-org:custom:id", "cl100k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("azure/openai/gpt-4-turbo", "cl100k_base"),
        ("llama-3.1-8b", "cl100k_base"),
        ("", "cl100k_base"),
    ],
)
def test_model_to_encoding(counter: TokenCounter, model: str, name: str) -> None:
    assert counter.encoding_for(model).name == name


def test_configurable_default() -> None:
    c = TokenCounter("o200k_base")
    assert c.encoding_for("llama-3.1-8b").name == "o200k_base"
    assert c.encoding_for(None).name == "o200k_base"
    assert c.encoding_for("gpt-4").name == "cl100k_base"
    with pytest.raises(ValueError):
        TokenCounter("no_such_encoding")


def test_encodings_built_once_across_threads() -> None:
    seen: list[tiktoken.Encoding] = []
    threads = [
        threading.Thread(target=lambda: seen.append(tokens.get_encoding("o200k_base")))
        for _ in range(8)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(seen) == 8 and all(e is seen[0] for e in seen)


# --------------------------------------------------------------------------- offline seeding


def test_cache_dir_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    key = hashlib.sha1(CL100K_URL.encode()).hexdigest()
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    assert cache_path("cl100k_base") == os.path.join(tmp_path, key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert cache_path("cl100k_base") is None  # caching disabled


def test_seed_then_tiktoken_loads_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str], no_network: None
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    path = seed_cache("cl100k_base")
    assert path is not None
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == BUNDLED_SHA256["cl100k_base"]
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    ranks = tiktoken.load.load_tiktoken_bpe(CL100K_URL, BUNDLED_SHA256["cl100k_base"])
    assert len(ranks) == 100256


def test_valid_cache_file_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    path = seed_cache("cl100k_base")
    assert path is not None
    before = os.stat(path)
    assert seed_cache("cl100k_base") == path
    after = os.stat(path)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_corrupted_cache_file_is_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    path = cache_path("o200k_base")
    assert path is not None
    with open(path, "wb") as f:
        f.write(b"garbage")
    seed_cache("o200k_base")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == BUNDLED_SHA256["o200k_base"]


def test_wrong_hash_fails_loudly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(BUNDLED_SHA256, "cl100k_base", "0" * 64)
    with pytest.raises(BpeDataError, match="sha256"):
        seed_cache("cl100k_base")
    assert os.listdir(tmp_path) == []  # nothing unverified was written


def test_cache_disabled_builds_in_memory(monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    enc = tokens._build_from_memory("cl100k_base")
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    # The loader swap is undone.
    assert tokens._openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe


def test_unwritable_cache_falls_back_to_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str], no_network: None
) -> None:
    blocker = os.path.join(tmp_path, "not-a-dir")
    with open(blocker, "w") as f:
        f.write("x")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.join(blocker, "cache"))
    monkeypatch.setattr(tokens, "_ENCODINGS", {})
    enc = tokens.get_encoding("cl100k_base")
    assert len(enc.encode_ordinary("hello world")) == 2
