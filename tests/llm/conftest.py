"""Fixtures for the end-to-end suite against a real llama-server (run with `make test-llm`).

The folder is skipped unless RUN_LLM_TESTS=1, so a plain `pytest` never builds or starts anything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.procs import Proc, start_proxy, write_config

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build_llama.sh"
ENABLE_VAR = "RUN_LLM_TESTS"

# A cold start loads a ~100 MB model; allow for a busy 2-core machine.
HEALTH_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3
# Served model id (`--alias`); llama-server answers whatever model a request names, so this only
# fixes what /v1/models and the responses' "model" field say instead of the GGUF path.
MODEL_ALIAS = "smollm2-135m"


def llm_enabled() -> bool:
    return os.environ.get(ENABLE_VAR) == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item of the session, not only ours: filter by path.
    skip = pytest.mark.skip(reason=f"needs a real llama-server: set {ENABLE_VAR}=1 (make test-llm)")
    for item in items:
        if HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.llm)
        if not llm_enabled():
            item.add_marker(skip)


def _artifacts() -> tuple[Path, Path]:
    """Return (llama-server binary, model), building them into the cache when missing."""
    binary, model = os.environ.get("LLAMA_SERVER_BIN"), os.environ.get("LLAMA_MODEL")
    if binary and model:
        return Path(binary), Path(model)
    # The build script is a no-op when the cache is complete; a cold build takes minutes,
    # which is why `make test-llm` runs it before pytest (outside any per-test timeout).
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], env=env, check=True, stdout=subprocess.PIPE, text=True
    )
    found = dict(
        line.split("=", 1) for line in done.stdout.splitlines() if line.startswith("LLAMA_")
    )
    return Path(found["LLAMA_SERVER_BIN"]), Path(found["LLAMA_MODEL"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def _wait_healthy(proc: subprocess.Popen[bytes], base_url: str) -> bool:
    """True once /health says ok; False if the process died (e.g. lost the port race)."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                r = client.get(f"{base_url}/health")
                # 503 with "Loading model" until the model is in memory.
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"llama-server at {base_url} not healthy after {HEALTH_TIMEOUT_S} s")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def llama_model_name() -> str:
    """The model id llama-server reports (its `--alias`)."""
    return MODEL_ALIAS


def _launch(args: list[str], log_dir: Path, label: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start llama-server with ``args`` on a free loopback port until /health is ok (a port
    taken meanwhile costs another attempt); returns the process and its base URL."""
    binary, model = _artifacts()
    for attempt in range(1, START_ATTEMPTS + 1):
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = log_dir / f"attempt-{attempt}.log"
        cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            healthy = _wait_healthy(proc, base_url)
        except BaseException:
            _stop(proc)
            raise
        if healthy:
            return proc, base_url
        _stop(proc)
    pytest.fail(
        f"{label} exited with {proc.returncode} before /health was ok\n"
        f"command: {' '.join(cmd)}\n{_tail(log_path)}"
    )


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (without /v1) of a llama-server on a free loopback port, for the whole session."""
    args = [
        "-c", "4096", "-np", "4", "-t", "2", "--embeddings",
        # The GGUF declares no pooling, and /v1/embeddings rejects pooling "none".
        "--pooling", "mean", "--alias", MODEL_ALIAS,
    ]  # fmt: skip
    proc, base_url = _launch(args, tmp_path_factory.mktemp("llama-server"), "llama-server")
    try:
        yield base_url
    finally:
        _stop(proc)


# -- the proxy in front of llama-server -----------------------------------------------------

# The shared llama-server checks no key: the proxy still sends one (from api_key_env) so the
# client's own key provably never travels upstream; the keyed server below checks it.
UPSTREAM_KEY_ENV = "LLM_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-llama-upstream-0123456789"
# Far longer than the suite: no entry leaves the window while a test reads its key's usage.
PROXY_WINDOW_S = 600
ROOMY_LIMITS = {"rpm": 1000, "input_tpm": 100_000, "output_tpm": 100_000}
FRESH_KEYS = 24  # one unused key per test that asks for `fresh_key`
# For the concurrency test: room for output_tpm // max_tokens concurrent reservations only.
TIGHT_LIMITS = {"rpm": 1000, "input_tpm": 100_000, "output_tpm": 28}


@dataclass(frozen=True)
class ProxyKey:
    """A client key configured in the proxy, with its limits."""

    name: str
    secret: str
    limits: dict[str, int]


@dataclass
class LlmProxy:
    """A proxy process in front of llama-server; `url` has no /v1."""

    url: str
    proc: Proc
    keys: dict[str, ProxyKey]
    _fresh: list[ProxyKey] = field(default_factory=list)

    def fresh_key(self) -> ProxyKey:
        if not self._fresh:
            raise RuntimeError(f"all {FRESH_KEYS} fresh proxy keys are used: raise FRESH_KEYS")
        return self._fresh.pop(0)


def proxy_config(upstream_v1: str, keys: list[ProxyKey]) -> dict:
    """A mock-free config: one http upstream (llama-server), memory backend, the given keys."""
    return {
        "backend": {"type": "memory"},
        "upstreams": {
            "llama": {
                "type": "http",
                "base_url": upstream_v1,
                "api_key_env": UPSTREAM_KEY_ENV,
                "timeout_s": 300,  # a slow, busy CPU: generation can take a while
            }
        },
        "default_upstream": "llama",
        "window_s": PROXY_WINDOW_S,
        "keys": [{"name": k.name, "key": k.secret, "limits": k.limits} for k in keys],
    }


def start_llm_proxy(
    upstream_v1: str, keys: list[ProxyKey], directory: Path, upstream_key: str
) -> Proc:
    path = write_config(proxy_config(upstream_v1, keys), directory)
    return start_proxy(path, env={UPSTREAM_KEY_ENV: upstream_key})


@pytest.fixture(scope="session")
def llm_proxy(llama_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmProxy]:
    """`python -m proxy serve` in front of the shared llama-server."""
    fresh = [
        ProxyKey(f"fresh-{i:02d}", f"sk-llm-fresh-{i:02d}-0123456789", ROOMY_LIMITS)
        for i in range(FRESH_KEYS)
    ]
    tight = ProxyKey("tight", "sk-llm-tight-0123456789", TIGHT_LIMITS)
    keys = [*fresh, tight]
    proc = start_llm_proxy(
        f"{llama_server}/v1", keys, tmp_path_factory.mktemp("llm-proxy"), UPSTREAM_KEY
    )
    try:
        yield LlmProxy(proc.url, proc, {k.name: k for k in keys}, list(fresh))
    finally:
        proc.stop()


@pytest.fixture
def fresh_key(llm_proxy: LlmProxy) -> ProxyKey:
    """A proxy key no other test used: its usage starts at zero."""
    return llm_proxy.fresh_key()


# A second, small llama-server that requires an API key, to show which key reaches upstream.
KEYED_LLAMA_KEY = "sk-keyed-llama-0123456789"


@pytest.fixture(scope="module")
def keyed_llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a one-slot llama-server started with --api-key KEYED_LLAMA_KEY."""
    args = [
        "-c",
        "512",
        "-np",
        "1",
        "-t",
        "1",
        "--alias",
        MODEL_ALIAS,
        "--api-key",
        KEYED_LLAMA_KEY,
    ]
    proc, base_url = _launch(
        args, tmp_path_factory.mktemp("keyed-llama-server"), "keyed llama-server"
    )
    try:
        yield base_url
    finally:
        _stop(proc)
