"""Load generator for OpenAI-compatible HTTP APIs: closed/open loop, multi-process, reports."""

from loadtest.config import LoadConfig
from loadtest.generator import run_load, run_load_sync
from loadtest.results import Results

__all__ = ["LoadConfig", "Results", "run_load", "run_load_sync"]
