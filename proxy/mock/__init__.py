"""The built-in mock upstream: an OpenAI-compatible ASGI app with deterministic answers, usage
counted by the same TokenCounter as the proxy, pacing, fault injection and a request log."""

from .app import create_mock_app
from .errors import MockRequestError
from .faults import FAULT_HEADER, Faults, parse_faults
from .handlers import MAX_DIMENSIONS
from .plan import DEFAULT_MAX_TOKENS, MAX_CHOICES, MAX_COMPLETION_TOKENS
from .server import install_log_filter, mock_main
from .settings import MockSettings
from .text import WORDS, completion_text, embedding_vector, token_text, word_offset

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "FAULT_HEADER",
    "MAX_CHOICES",
    "MAX_COMPLETION_TOKENS",
    "MAX_DIMENSIONS",
    "WORDS",
    "Faults",
    "MockRequestError",
    "MockSettings",
    "completion_text",
    "create_mock_app",
    "embedding_vector",
    "install_log_filter",
    "mock_main",
    "parse_faults",
    "token_text",
    "word_offset",
]
