"""The serving process's own set-up."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

from proxy.cli import GC_THRESHOLD, tune_gc


def test_tune_gc_freezes_what_is_loaded_and_collects_the_young_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLD
        assert GC_THRESHOLD[0] > before[0]
        # This process has imported the proxy, pytest and their dependencies.
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_serving_process_tunes_its_collector(tmp_path) -> None:
    """``app_factory`` is what uvicorn calls in each serving process."""
    probe = (
        "import gc, os, sys\n"
        "os.environ['PROXY_CONFIG_FILE'] = sys.argv[1]\n"
        "from proxy import cli\n"
        "cli.app_factory()\n"
        "print(gc.get_threshold() == cli.GC_THRESHOLD, gc.get_freeze_count() > 10_000)\n"
    )
    config = Path(__file__).parents[1] / "config" / "example.yaml"
    out = subprocess.run(
        [sys.executable, "-c", probe, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]
