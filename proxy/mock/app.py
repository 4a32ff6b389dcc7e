"""The mock upstream as a Starlette app: its routes, error pages and lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import _error_body
from .handlers import _MockApp
from .settings import MockSettings


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return Response(
        _error_body(f"{request.method} {request.url.path} not found", status),
        status_code=status,
        media_type="application/json",
    )


def create_mock_app(settings: MockSettings) -> Starlette:
    mock = _MockApp(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            mock.log.close()

    routes = [
        Route("/v1/chat/completions", mock.chat, methods=["POST"]),
        Route("/v1/completions", mock.completions, methods=["POST"]),
        Route("/v1/embeddings", mock.embeddings, methods=["POST"]),
        Route("/v1/models", mock.models, methods=["GET"]),
        Route("/health", mock.health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_found},
    )
    app.state.mock = mock
    return app
