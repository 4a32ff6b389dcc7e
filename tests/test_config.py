"""Configuration: validation errors name the path; secrets resolved at load time; CLI checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy.config import ConfigError, hash_key, load_config, parse_config
from tests.conftest import ROOT_EXAMPLE, config_dict


def errors_of(data, env=None) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "f.yaml", env or {})
    return str(exc.value)


def test_example_config_is_valid() -> None:
    cfg = load_config(ROOT_EXAMPLE)
    assert cfg.keys[0].name == "team-a"
    assert cfg.window_ms == 60_000
    # team-b is configured by digest; it must be the digest of the documented example key.
    assert cfg.keys[1].digest == hash_key("sk-team-b-example")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["keys"][1]["limits"].update(rpm=0),
            "f.yaml: keys[1].limits.rpm: must be a positive integer",
        ),
        (
            lambda d: d["keys"][0]["limits"].update(rpm=-5),
            "keys[0].limits.rpm: must be a positive integer",
        ),
        (
            lambda d: d["keys"][0]["limits"].update(rpm=2.5),
            "keys[0].limits.rpm: must be an integer",
        ),
        (lambda d: d["keys"][0]["limits"].update(burst=3), "keys[0].limits.burst: unknown field"),
        (lambda d: d.update(colour="blue"), "f.yaml: colour: unknown field"),
        (
            lambda d: d.update(default_upstream="nope"),
            "default_upstream 'nope' is not in upstreams",
        ),
        (lambda d: d.update(routes={"gpt-*": "nope"}), "names unknown upstream 'nope'"),
        (lambda d: d["keys"].append(dict(d["keys"][0])), "duplicate name 'team-a'"),
        (lambda d: d["keys"][0].pop("key"), "keys[0]: give exactly one of key or key_sha256"),
        (lambda d: d["keys"][0].update(key_sha256="abc"), "keys[0]"),
        (lambda d: d.update(window_s=0), "window_s: must be a positive number"),
        (
            lambda d: d["upstreams"].update(x={"type": "http", "base_url": "ftp://x"}),
            "upstreams.x.base_url",
        ),
        (
            lambda d: d.update(backend={"type": "redis", "timeout_ms": 0}),
            "backend.timeout_ms: must be a positive integer",
        ),
        (
            lambda d: d.update(backend={"type": "redis", "sentinels": ["h:1"]}),
            "sentinels need service_name",
        ),
        (lambda d: d.update(keys=[]), "keys"),
    ],
)
def test_errors_name_the_path(mutate, expected: str) -> None:
    data = config_dict()
    mutate(data)
    assert expected in errors_of(data)


def test_missing_upstream_key_env_is_a_startup_error() -> None:
    data = config_dict(
        upstreams={"o": {"type": "http", "base_url": "http://x/v1", "api_key_env": "NOPE_KEY"}},
        default_upstream="o",
    )
    assert "upstreams.o.api_key_env: environment variable NOPE_KEY is not set" in errors_of(data)
    cfg = parse_config(data, "f.yaml", {"NOPE_KEY": "sk-up"})
    assert cfg.upstreams["o"].api_key == "sk-up"
    assert "sk-up" not in repr(cfg)


def test_plain_key_never_in_repr() -> None:
    cfg = parse_config(config_dict(), "f.yaml", {})
    assert "sk-test-key-a" not in repr(cfg)


def test_routes_glob_first_match() -> None:
    data = config_dict(
        upstreams={"mock": {"type": "mock"}, "other": {"type": "mock", "latency_ms": 1}},
        routes={"gpt-4o*": "other"},
    )
    cfg = parse_config(data, "f.yaml", {})
    assert cfg.upstream_for("gpt-4o-mini") == "other"
    assert cfg.upstream_for("gpt-3.5-turbo") == "mock"
    assert cfg.upstream_for(None) == "mock"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_check_config_ok_and_summary() -> None:
    r = _cli("check-config", str(ROOT_EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "team-a: rpm 1000, input_tpm 50000, output_tpm 10000" in r.stdout
    assert "model gpt-4o: rpm 100" in r.stdout
    assert "sk-team-a-example" not in r.stdout


def test_cli_check_config_error(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(ROOT_EXAMPLE.read_text().replace("rpm: 5,", "rpm: -1,"))
    r = _cli("check-config", str(bad))
    assert r.returncode != 0
    assert f"{bad}: keys[1].limits.rpm: must be a positive integer" in r.stderr


def test_cli_hash_key() -> None:
    r = _cli("hash-key", "sk-team-b-example")
    assert r.stdout.strip() == hash_key("sk-team-b-example")


def test_cli_refuses_memory_backend_with_workers() -> None:
    r = _cli("serve", "--config", str(ROOT_EXAMPLE), "--workers", "2", "--port", "1")
    assert r.returncode == 2
    assert "memory backend" in r.stderr and "--workers 1" in r.stderr
