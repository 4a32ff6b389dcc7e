"""The serving process's own set-up."""

from __future__ import annotations

import gc

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
