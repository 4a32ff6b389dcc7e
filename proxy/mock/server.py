"""Running the mock upstream as a server (`mock-upstream`), quiet about its own faults."""

from __future__ import annotations

import logging

from .app import create_mock_app
from .settings import MockSettings


class _DropCutNoise(logging.Filter):
    # A cut-after fault closes the connection on purpose; uvicorn reports that as an error.
    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


def install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropCutNoise) for f in logger.filters):
        logger.addFilter(_DropCutNoise())


def mock_main(host: str, port: int, settings: MockSettings) -> None:
    import uvicorn

    install_log_filter()
    app = create_mock_app(settings)
    app.state.mock.counter.preload()
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="auto",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
