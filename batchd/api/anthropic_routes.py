"""Anthropic's Message Batches API over the spool (messages.py does the work)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from .auth import authorized
from .messages import MessageBatches

router = APIRouter(dependencies=[Depends(authorized)])


def messages_of(request: Request) -> MessageBatches:
    return request.app.state.messages


Batches = Annotated[MessageBatches, Depends(messages_of)]


class MessageBatchCreate(BaseModel):
    """Anthropic's POST /v1/messages/batches; each request is checked in messages.py."""

    model_config = ConfigDict(extra="forbid")

    requests: list[dict[str, Any]]


def base(request: Request) -> str:
    return str(request.base_url)


@router.post("/v1/messages/batches")
def create_message_batch(body: MessageBatchCreate, request: Request,
                         messages: Batches) -> dict[str, Any]:
    return messages.create(body.requests, base(request))


@router.get("/v1/messages/batches")
def list_message_batches(request: Request, messages: Batches, before_id: str | None = None,
                         after_id: str | None = None,
                         limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
    return messages.list(base(request), before_id, after_id, limit)


@router.get("/v1/messages/batches/{batch_id}")
def get_message_batch(batch_id: str, request: Request, messages: Batches) -> dict[str, Any]:
    return messages.get(batch_id, base(request))


@router.post("/v1/messages/batches/{batch_id}/cancel")
def cancel_message_batch(batch_id: str, request: Request, messages: Batches) -> dict[str, Any]:
    return messages.cancel(batch_id, base(request))


@router.get("/v1/messages/batches/{batch_id}/results")
def message_batch_results(batch_id: str, messages: Batches) -> FileResponse:
    return FileResponse(messages.results(batch_id), media_type="application/x-jsonl")


@router.delete("/v1/messages/batches/{batch_id}")
def delete_message_batch(batch_id: str, messages: Batches) -> dict[str, Any]:
    return messages.delete(batch_id)
