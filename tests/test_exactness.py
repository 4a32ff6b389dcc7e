"""The exactness check: its analysis on made-up logs, then the real thing (three nodes, one Redis,
short windows), graded from the mock upstream's own log."""

from __future__ import annotations

import pytest

from loadtest.exactness import Settings, analyze, format_outcome, run, window_sums

W = 2.0
LIMITS = (10, 1000, 100)


def burst(start: float, n: int, gap: float = 0.01) -> list[tuple[float, int, int]]:
    """``n`` requests of (40 input, 10 output) tokens, ``gap`` apart."""
    return [(start + i * gap, 40, 10) for i in range(n)]


def by_name(results):
    return {r.name: r for r in results}


def test_window_sums() -> None:
    times = [0.0, 0.5, 1.0, 1.5, 2.0, 2.6]
    assert window_sums(times, [1] * 6, 1.0) == [1, 2, 2, 2, 2, 2]
    assert window_sums(times, [1, 2, 3, 4, 5, 6], 2.0) == [1, 3, 6, 10, 14, 18]


def test_a_limiter_that_fills_every_window_passes() -> None:
    # Like a real overloaded limiter: each burst starts as the one before it has expired.
    entries = burst(0.0, 10) + burst(2.1, 10) + burst(4.2, 10) + burst(6.3, 10)
    r = by_name(analyze(entries, LIMITS, W, skew_s=0.01))
    assert r["requests"].binding and r["output_tokens"].binding
    assert not r["input_tokens"].binding  # 400 of 1000: not the limit that binds
    assert (r["requests"].peak, r["requests"].reach_min) == (10, 10)
    assert not any(x.over or x.short for x in r.values())


def test_one_request_too_many_is_caught() -> None:
    entries = burst(0.0, 10) + burst(2.1, 11) + burst(4.2, 10)
    r = by_name(analyze(entries, LIMITS, W, skew_s=0.05))
    assert r["requests"].over and r["requests"].peak == 11
    assert r["output_tokens"].over and r["output_tokens"].peak == 110


def test_a_conservative_limiter_is_caught() -> None:
    # 10 allowed per window, but the third window only got 8.
    entries = burst(0.0, 10) + burst(2.1, 10) + burst(4.2, 8) + burst(6.3, 10)
    r = by_name(analyze(entries, LIMITS, W, skew_s=0.01))
    assert r["requests"].short and r["requests"].reach_min == 8
    assert not r["requests"].over


def test_late_arrival_at_the_mock_is_not_an_over_admission() -> None:
    # Admitted 2.0 s apart (exactly one window), but the first reached the mock 30 ms late:
    # on the mock's clock the two are 1.97 s apart. A full window would count 11; the graded
    # window (W - D, with D bounding that lateness) does not.
    entries = [(0.03, 40, 10), *burst(0.04, 9), (2.0, 40, 10)]
    r = by_name(analyze(entries, LIMITS, W, skew_s=0.031))
    assert r["requests"].full_window_peak == 11
    assert not r["requests"].over
    # The same log with no lateness allowed for would be flagged: the bound matters.
    assert by_name(analyze(entries, LIMITS, W, skew_s=0.0))["requests"].over


@pytest.mark.redis
@pytest.mark.parametrize(
    "settings",
    [
        # The request limit binds: 200 requests per 3 s window.
        Settings(rpm=200, input_tpm=20_000, output_tpm=10_000, window_s=3.0),
        # The output-token limit binds, and every answer is shorter than its reservation, so
        # reconciliation refunds: 3000 output tokens of 16-token answers, 24 reserved each.
        Settings(
            rpm=1000,
            input_tpm=50_000,
            output_tpm=3_000,
            window_s=3.0,
            max_tokens=24,
            answer_tokens=16,
        ),
    ],
    ids=["requests-bind", "output-tokens-bind-with-refunds"],
)
def test_three_nodes_sharing_redis_are_exact(settings: Settings) -> None:
    outcome = run(settings)
    report = format_outcome(outcome)
    print(report)
    assert outcome.passed, report
    binding = [d for d in outcome.dims if d.binding]
    assert binding and all(d.peak <= d.limit for d in outcome.dims)
    assert outcome.refused > 0 and outcome.ok == outcome.mock_requests
