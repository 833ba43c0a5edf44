"""``batchd api``: OpenAI's Files and Batches API and a dashboard over the spool.

Its own process beside the daemon: it only reads the spool and drops files
into the inbox (batches.py says how), so either may restart at any time. It
binds to localhost unless API keys are configured; with keys, every request
but the dashboard's empty page needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ConfigError, Settings
from ..layout import BENCH
from ..spool.daemons import Registry
from ..spool.listing import bench_groups, job_rows, waiting_file
from ..spool.outbox import read_status
from .batches import Store
from .files import ApiError
from .messages import MessageBatches
from .upload import receive


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port); ConfigError if malformed."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class Keys:
    """Bearer keys, one a line in a file (``#`` comments); re-read when it changes,
    so a key is added or revoked without a restart."""

    def __init__(self, path: Path):
        self.path = path
        self.stamp: tuple[int, int] | None = None
        self.keys: list[bytes] = []
        self.load()
        if not self.keys:
            raise ConfigError(f"api keys file {path} has no keys")

    def load(self) -> None:
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size) == self.stamp:
                return
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            if self.stamp is None:
                raise ConfigError(f"api keys file {self.path}: {exc}") from None
            return  # keep the keys last read
        self.keys = [line.strip().encode() for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
        self.stamp = (st.st_mtime_ns, st.st_size)

    def allows(self, header: str | None, api_key: str | None = None) -> bool:
        """``Authorization: Bearer KEY`` (OpenAI's clients) or ``x-api-key: KEY``
        (Anthropic's)."""
        if header and header.startswith("Bearer "):
            given = header[len("Bearer "):].strip().encode()
        elif api_key:
            given = api_key.strip().encode()
        else:
            return False
        self.load()
        # Compare with every key, in constant time for each.
        return any([hmac.compare_digest(given, key) for key in self.keys])


class BatchRetry(BaseModel):
    """batchd's own: POST /v1/batches/{id}/retry (`batchd retry` over HTTP)."""

    model_config = ConfigDict(extra="forbid")

    codes: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=32)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None,
                                                                              max_length=15)


class MessageBatchCreate(BaseModel):
    """Anthropic's POST /v1/messages/batches; each request is checked in messages.py."""

    model_config = ConfigDict(extra="forbid")

    requests: list[dict[str, Any]]


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = "24h"
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[str, str] | None = Field(None, max_length=16)
    output_expires_after: dict[str, Any] | None = None  # accepted; outputs stay until deleted


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
    messages = MessageBatches(store)
    app = FastAPI(title="batchd", docs_url=None, redoc_url=None, openapi_url="/openapi.json")

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

    def authorized(request: Request) -> None:
        if keys is not None and not keys.allows(request.headers.get("authorization"),
                                                request.headers.get("x-api-key")):
            raise ApiError(401, "Incorrect API key provided.", "invalid_api_key")

    v1 = [Depends(authorized)]

    # -- files -----------------------------------------------------------------

    @app.post("/v1/files", dependencies=v1)
    async def upload(request: Request) -> dict[str, Any]:
        return await receive(request, store.files, settings.limits.max_file_bytes)

    @app.get("/v1/files", dependencies=v1)
    def list_files(after: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                   order: Literal["asc", "desc"] = "desc",
                   purpose: str | None = None) -> dict[str, Any]:
        found = store.files.list(purpose)
        return _page(found if order == "desc" else found[::-1], after, limit)

    @app.get("/v1/files/{file_id}", dependencies=v1)
    def get_file(file_id: str) -> dict[str, Any]:
        return store.files.get(file_id)

    @app.delete("/v1/files/{file_id}", dependencies=v1)
    def delete_file(file_id: str) -> dict[str, Any]:
        return store.files.delete(file_id)

    @app.get("/v1/files/{file_id}/content", dependencies=v1)
    def file_content(file_id: str) -> FileResponse:
        store.files.get(file_id)  # 404 with OpenAI's error unless it exists
        path = store.files.path(file_id)
        assert path is not None
        return FileResponse(path, media_type="application/jsonl")

    # -- batches ---------------------------------------------------------------

    @app.post("/v1/batches", dependencies=v1)
    def create_batch(body: BatchCreate) -> dict[str, Any]:
        for key, value in (body.metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ApiError(400, "metadata keys are at most 64 characters and values at "
                               "most 512", "invalid_value", "metadata")
        return store.create_batch(body.input_file_id, body.endpoint, body.completion_window,
                                  body.metadata)

    @app.get("/v1/batches", dependencies=v1)
    def list_batches(after: str | None = None,
                     limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        return _page(store.batches(), after, limit)

    @app.get("/v1/batches/{batch_id}", dependencies=v1)
    def get_batch(batch_id: str) -> dict[str, Any]:
        return store.batch(batch_id)

    @app.post("/v1/batches/{batch_id}/retry", dependencies=v1)
    def retry_batch(batch_id: str, body: BatchRetry | None = None) -> dict[str, Any]:
        body = body or BatchRetry()
        return store.retry(batch_id, body.codes, body.metadata)

    @app.post("/v1/batches/{batch_id}/cancel", dependencies=v1)
    def cancel_batch(batch_id: str) -> dict[str, Any]:
        return store.cancel(batch_id)

    # -- Anthropic's Message Batches ---------------------------------------------

    def base(request: Request) -> str:
        return str(request.base_url)

    @app.post("/v1/messages/batches", dependencies=v1)
    def create_message_batch(body: MessageBatchCreate, request: Request) -> dict[str, Any]:
        return messages.create(body.requests, base(request))

    @app.get("/v1/messages/batches", dependencies=v1)
    def list_message_batches(request: Request, before_id: str | None = None,
                             after_id: str | None = None,
                             limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
        return messages.list(base(request), before_id, after_id, limit)

    @app.get("/v1/messages/batches/{batch_id}", dependencies=v1)
    def get_message_batch(batch_id: str, request: Request) -> dict[str, Any]:
        return messages.get(batch_id, base(request))

    @app.post("/v1/messages/batches/{batch_id}/cancel", dependencies=v1)
    def cancel_message_batch(batch_id: str, request: Request) -> dict[str, Any]:
        return messages.cancel(batch_id, base(request))

    @app.get("/v1/messages/batches/{batch_id}/results", dependencies=v1)
    def message_batch_results(batch_id: str) -> FileResponse:
        return FileResponse(messages.results(batch_id), media_type="application/x-jsonl")

    @app.delete("/v1/messages/batches/{batch_id}", dependencies=v1)
    def delete_message_batch(batch_id: str) -> dict[str, Any]:
        return messages.delete(batch_id)

    # -- dashboard -------------------------------------------------------------

    page = resources.files("batchd.api").joinpath("dashboard.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        return page  # no data in it: the page asks the routes below, with the key

    @app.get("/favicon.ico")
    def favicon() -> Response:
        # browsers ask for it whatever the page says: an icon, not a 404 in the log
        return Response(ICON, media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/dashboard/jobs", dependencies=v1)
    def dashboard_jobs() -> list[dict[str, Any]]:
        return job_rows(settings)

    @app.get("/dashboard/jobs/{job}", dependencies=v1)
    def dashboard_job(job: str) -> dict[str, Any]:
        batch = store.batch(job)  # checks the name
        bench = settings.layout.out(job, BENCH)
        try:
            record = json.loads(bench.read_text())
        except (OSError, ValueError):
            record = None
        history = read_status(settings.layout.status(job))
        # Still in the inbox: its waiting line (state waiting, phase settling or in_inbox)
        waiting = None if history else waiting_file(settings, job)
        return {"batch": batch, "history": history, "bench": record,
                "waiting": waiting.record() if waiting else None}

    @app.get("/dashboard/replicas", dependencies=v1)
    def dashboard_replicas() -> list[dict[str, Any]]:
        """Each live daemon's engine replicas (none with one engine each)."""
        registry = Registry(settings.layout, settings.scheduling.lease_seconds)
        return [{"daemon": record.get("daemon"), **line} for record in registry.all()
                if record.get("live") for line in record.get("replicas") or []]

    @app.get("/dashboard/bench", dependencies=v1)
    def dashboard_bench() -> dict[str, Any]:
        return bench_groups(settings.outbox)

    return app


# The dashboard's icon: a "b" on batchd's header colour.
ICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
        b'<rect width="16" height="16" rx="3" fill="#1d2330"/>'
        b'<text x="8" y="12.5" font-family="sans-serif" font-size="12" font-weight="bold" '
        b'fill="#fff" text-anchor="middle">b</text></svg>')


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the LIMIT items after the one with id AFTER."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    data = items[start:start + limit]
    return {"object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": start + limit < len(items)}
