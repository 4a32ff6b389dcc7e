"""The live usage page in a real headless Chromium (tests/browser/admin_page.mjs, playwright-core):
token prompt, keys shown, bars that grow with traffic, the recent 429s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import KEY_A, KEY_B
from tests.procs import start_proxy, write_config

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
ADMIN_TOKEN = "adm-page-token-0123456789"


def _chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(found, os.X_OK):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.skip("playwright-core is not installed: run `npm ci` in tests/browser")
    return node


def test_usage_page_in_a_browser(tmp_path) -> None:
    chromium, node = _chromium(), _node()
    cfg = {
        "upstreams": {"mock": {"type": "mock"}},
        "default_upstream": "mock",
        "admin": {"token_env": "PAGE_ADMIN"},
        "keys": [
            {
                "name": "team-a",
                "key": KEY_A,
                "limits": {"rpm": 4, "input_tpm": 10_000, "output_tpm": 2_000},
                "models": {"gpt-4o": {"rpm": 10}},
            },
            {"name": "team-b", "key": KEY_B},
        ],
    }
    proxy = start_proxy(write_config(cfg, tmp_path), env={"PAGE_ADMIN": ADMIN_TOKEN})
    shot = tmp_path / "admin.png"
    try:
        run = subprocess.run(
            [node, str(BROWSER_DIR / "admin_page.mjs")],
            cwd=BROWSER_DIR,
            env={
                **os.environ,
                "PROXY_URL": proxy.url,
                "ADMIN_TOKEN": ADMIN_TOKEN,
                "CLIENT_KEY": KEY_A,
                "SCREENSHOT": str(shot),
                "CHROMIUM": chromium,
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        proxy.stop()
    assert run.returncode == 0, run.stderr + run.stdout
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    if os.environ.get("ADMIN_PAGE_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["ADMIN_PAGE_SCREENSHOT"])
    assert shot.stat().st_size > 10_000

    assert seen["errors"] == []
    assert "not accepted" in seen["wrongTokenMessage"]
    assert seen["keysShown"] == ["team-a", "team-b"]
    assert seen["statuses"] == [200, 200, 200, 200, 429]

    def bar(bars: list[dict], scope: str, dim: str) -> dict:
        (b,) = [b for b in bars if b["key"] == "team-a" and b["scope"] == scope and b["dim"] == dim]
        return b

    before, after = seen["before"], seen["after"]
    b, a = bar(before, "key", "requests"), bar(after, "key", "requests")
    assert (b["used"], b["pct"], b["limit"]) == (0, 0, "4")
    assert (a["used"], a["pct"]) == (4, 100)
    assert a["width"] > b["width"] + 50  # the bar really grew on screen
    out_b, out_a = bar(before, "key", "output_tokens"), bar(after, "key", "output_tokens")
    assert out_b["used"] == 0 and out_a["used"] == 200 and out_a["pct"] == 10
    assert bar(after, "model:gpt-4o", "requests")["used"] == 4
    assert len(seen["refusalRows"]) == 1 and "requests" in seen["refusalRows"][0]
    assert seen["tokenKept"] and seen["loginHiddenAfterReload"]
    # Self-contained: the page talked to nothing but the proxy.
    assert all(u.startswith(proxy.url) for u in seen["requests"]), seen["requests"]
