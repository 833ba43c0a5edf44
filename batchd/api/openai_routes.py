"""OpenAI's Files and Batches API over the spool (batches.py keeps the records)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from .auth import authorized
from .batches import Store
from .files import ApiError
from .upload import receive

router = APIRouter(dependencies=[Depends(authorized)])


def store_of(request: Request) -> Store:
    return request.app.state.store


Spool = Annotated[Store, Depends(store_of)]


class BatchRetry(BaseModel):
    """batchd's own: POST /v1/batches/{id}/retry (`batchd retry` over HTTP)."""

    model_config = ConfigDict(extra="forbid")

    codes: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=32)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None,
                                                                              max_length=15)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = "24h"
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[str, str] | None = Field(None, max_length=16)
    output_expires_after: dict[str, Any] | None = None  # accepted; outputs stay until deleted


# -- files -----------------------------------------------------------------

@router.post("/v1/files")
async def upload(request: Request, store: Spool) -> dict[str, Any]:
    return await receive(request, store.files, store.settings.limits.max_file_bytes)


@router.get("/v1/files")
def list_files(store: Spool, after: str | None = None,
               limit: int = Query(10000, ge=1, le=10000),
               order: Literal["asc", "desc"] = "desc",
               purpose: str | None = None) -> dict[str, Any]:
    found = store.files.list(purpose)
    return _page(found if order == "desc" else found[::-1], after, limit)


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, store: Spool) -> dict[str, Any]:
    return store.files.get(file_id)


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, store: Spool) -> dict[str, Any]:
    return store.files.delete(file_id)


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, store: Spool) -> FileResponse:
    store.files.get(file_id)  # 404 with OpenAI's error unless it exists
    path = store.files.path(file_id)
    assert path is not None
    return FileResponse(path, media_type="application/jsonl")


# -- batches ---------------------------------------------------------------

@router.post("/v1/batches")
def create_batch(body: BatchCreate, store: Spool) -> dict[str, Any]:
    for key, value in (body.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise ApiError(400, "metadata keys are at most 64 characters and values at "
                           "most 512", "invalid_value", "metadata")
    return store.create_batch(body.input_file_id, body.endpoint, body.completion_window,
                              body.metadata)


@router.get("/v1/batches")
def list_batches(store: Spool, after: str | None = None,
                 limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
    return _page(store.batches(), after, limit)


@router.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, store: Spool) -> dict[str, Any]:
    return store.batch(batch_id)


@router.post("/v1/batches/{batch_id}/retry")
def retry_batch(batch_id: str, store: Spool, body: BatchRetry | None = None) -> dict[str, Any]:
    body = body or BatchRetry()
    return store.retry(batch_id, body.codes, body.metadata)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, store: Spool) -> dict[str, Any]:
    return store.cancel(batch_id)


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
