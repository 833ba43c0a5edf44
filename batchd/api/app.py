"""``batchd api``: OpenAI's Files and Batches API, Anthropic's Message Batches
API and a dashboard over the spool, one router each (openai_routes.py,
anthropic_routes.py, dashboard.py).

Its own process beside the daemon: it only reads the spool and drops files
into the inbox (batches.py says how), so either may restart at any time. It
binds to localhost unless API keys are configured; with keys, every request
but the dashboard's empty page needs ``Authorization: Bearer KEY`` (auth.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import Settings
from . import anthropic_routes, dashboard, openai_routes
from .auth import Keys, is_local, parse_listen
from .batches import Store
from .files import ApiError
from .messages import MessageBatches

__all__ = ["Keys", "create_app", "is_local", "parse_listen"]

# Anthropic's error types by HTTP status
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 409: "invalid_request_error",
                    413: "request_too_large", 429: "rate_limit_error"}


def _error(status: int, message: str, code: str | None = None, param: str | None = None,
           kind: str = "invalid_request_error", anthropic: bool = False) -> JSONResponse:
    if anthropic:  # under /v1/messages: Anthropic's error shape
        return JSONResponse({"type": "error", "error": {
            "type": ANTHROPIC_ERRORS.get(status, "api_error"), "message": message}},
            status_code=status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status)


def _anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def create_app(settings: Settings, keys: Keys | None = None) -> FastAPI:
    store = Store(settings)
    store.ensure_dirs()
    app = FastAPI(title="batchd", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.store = store
    app.state.messages = MessageBatches(store)
    app.state.keys = keys

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.code, exc.param,
                      anthropic=_anthropic(request))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path"))
        return _error(400, f"{param}: {err['msg']}", "invalid_value", param or None,
                      anthropic=_anthropic(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), anthropic=_anthropic(request))

    for router in (openai_routes.router, anthropic_routes.router, dashboard.router,
                   dashboard.data):
        app.include_router(router)
    return app
