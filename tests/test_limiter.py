"""The limiter above the backend: scopes, never-fits, refusals, headers, settlement."""

from __future__ import annotations

import pytest

from proxy.backends.memory import MemoryBackend
from proxy.errors import RateLimited
from proxy.limiter import Limiter, build_policy, format_duration, scope_tag
from tests.conftest import FakeClock, make_config


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (12, "12ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (61_250, "1m1.25s"),
    ],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def _setup(**limits):
    clock = FakeClock()
    keys = [
        {
            "name": "k1",
            "key": "sk-k1-0123456789",
            "limits": limits,
            "models": {"gpt-4o": {"rpm": 2, "output_tpm": 100}},
        }
    ]
    cfg = make_config(keys=keys)
    policy = build_policy(cfg.keys[0], cfg.window_ms)
    return clock, Limiter(MemoryBackend(clock)), policy


async def test_scopes_key_and_model() -> None:
    _, _, policy = _setup(rpm=5)
    assert [s.name for s in policy.scopes_for("gpt-4o")] == ["k", "m:gpt-4o"]
    assert [s.name for s in policy.scopes_for("gpt-3.5")] == ["k"]
    assert {s.tag for s in policy.all_scopes()} == {scope_tag("k1")}
    assert "{" not in scope_tag("a{b}c") and "}" not in scope_tag("a{b}c")


async def test_model_scope_refuses_while_key_scope_has_room() -> None:
    _clock, lim, policy = _setup(rpm=100)
    for _ in range(2):
        await lim.admit(policy, "gpt-4o", 1, 10)
    with pytest.raises(RateLimited) as exc:
        await lim.admit(policy, "gpt-4o", 1, 10)
    err = exc.value
    assert err.type == "requests"
    assert "model gpt-4o" in err.message and "Limit 2, Used 2, Requested 1" in err.message
    assert err.headers["retry-after"] == "60"
    assert err.headers["retry-after-ms"] == "60000"
    # The refusal reserved nothing: another model still has the key's room.
    await lim.admit(policy, "gpt-3.5", 1, 10)


async def test_retry_after_is_exact_and_rounded_up() -> None:
    clock, lim, policy = _setup(rpm=2)
    await lim.admit(policy, None, 1, 1)
    clock.advance(20_500)
    await lim.admit(policy, None, 1, 1)
    with pytest.raises(RateLimited) as exc:
        await lim.admit(policy, None, 1, 1)
    assert exc.value.headers["retry-after-ms"] == "39500"
    assert exc.value.headers["retry-after"] == "40"
    clock.advance(39_499)
    with pytest.raises(RateLimited):
        await lim.admit(policy, None, 1, 1)
    clock.advance(1)
    await lim.admit(policy, None, 1, 1)


async def test_never_fits_is_refused_without_retry() -> None:
    _, lim, policy = _setup(input_tpm=100, output_tpm=50)
    with pytest.raises(RateLimited) as exc:
        await lim.admit(policy, None, 101, 1)
    assert exc.value.type == "input_tokens"
    assert exc.value.headers == {"x-should-retry": "false"}
    assert "can never fit" in exc.value.message and "Limit 100, Requested 101" in exc.value.message
    with pytest.raises(RateLimited) as exc:
        await lim.admit(policy, None, 1, 51)
    assert exc.value.type == "output_tokens"


async def test_headers_show_tightest_scope_and_settlement() -> None:
    _clock, lim, policy = _setup(rpm=10, input_tpm=1000, output_tpm=500)
    adm = await lim.admit(policy, "gpt-4o", 100, 80)
    h = adm.headers()
    assert h["x-ratelimit-limit-requests"] == "2"  # the model scope is tighter
    assert h["x-ratelimit-remaining-requests"] == "1"
    assert h["x-ratelimit-limit-input-tokens"] == "1000"
    assert h["x-ratelimit-remaining-input-tokens"] == "900"
    assert h["x-ratelimit-limit-output-tokens"] == "100"
    assert h["x-ratelimit-remaining-output-tokens"] == "20"
    assert h["x-ratelimit-remaining-tokens"] == "20"
    assert h["x-ratelimit-reset-requests"] == "1m0s"
    await lim.settle(adm, (1, 90, 30))
    h = adm.headers()
    assert h["x-ratelimit-remaining-output-tokens"] == "70"
    assert h["x-ratelimit-remaining-input-tokens"] == "910"
    states = await lim.backend.peek(policy.scopes_for("gpt-4o"))
    assert states[0].used == (1, 90, 30) and states[1].used == (1, 90, 30)
    await lim.settle(adm, (1, 0, 0))  # settling twice changes nothing
    states = await lim.backend.peek(policy.scopes_for("gpt-4o"))
    assert states[0].used == (1, 90, 30)


async def test_unlimited_key_skips_backend() -> None:
    clock = FakeClock()
    cfg = make_config(keys=[{"name": "free", "key": "sk-free-0123456789"}])
    policy = build_policy(cfg.keys[0], cfg.window_ms)
    backend = MemoryBackend(clock)
    lim = Limiter(backend)
    adm = await lim.admit(policy, "m", 10**6, 10**6)
    assert adm.reservation is None and adm.headers() == {}
    assert backend.sweep() == 0
