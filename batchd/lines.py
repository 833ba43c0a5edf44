"""Input lines: each line of a JSONL file (read by ``jsonl.py``) turned into a
request or a line error. Nothing here raises for bad input; every non-blank
line gets exactly one outcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import first_error
from .jsonl import RawLine, open_regular, read_lines

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"  # Anthropic's Messages API, answered by vLLM's own layer for it
# Score and rerank under every path vLLM's server and batch runner take.
SCORE_URLS = ("/v1/score", "/score")
RERANK_URLS = ("/v1/rerank", "/rerank", "/v2/rerank")
URLS = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, *SCORE_URLS, *RERANK_URLS)
ANTHROPIC_KEYS = {"custom_id", "params"}  # a line of Anthropic's Message Batches


@dataclass(frozen=True)
class Request:
    """One valid request: where it came from and the OpenAI body to run."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]
    # Set when a job hands the request to a shared engine stream: whose it is
    # (answers are told apart by ``key``) and the sampling defaults to apply
    # under the line's own fields (the profile's, the sidecar's, and the job's
    # vLLM priority where the profile schedules by priority).
    job: str = ""
    sampling: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    anthropic: bool = False  # an Anthropic batch line: answered in Anthropic's result shape

    @property
    def key(self) -> tuple[str, int]:
        return self.job, self.line

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) and model else None


@dataclass(frozen=True)
class LineError:
    """A line that cannot run, with an OpenAI-style error code."""

    line: int
    custom_id: str
    code: str
    message: str
    param: str | None = None
    status_code: int = 400
    type: str = "invalid_request_error"
    anthropic: bool = False  # of an Anthropic batch line


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Sampling(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: Literal[False] | None = None  # a batch has nobody to stream to


class _Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class _ChatBody(_Sampling):
    messages: list[_Message] = Field(min_length=1)


class _CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class _EmbeddingBody(_Lenient):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]


class _ResponsesBody(_Sampling):
    input: str | list[dict[str, Any]]


class _MessagesBody(_Lenient):
    """Anthropic's Messages request; vLLM's own request model checks the rest."""

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    stream: Literal[False] | None = None


class _ScoringBody(_Lenient):
    """Score and rerank: vLLM's request models check the rest in the engine process."""

    model: str | None = None


BODY_MODELS: dict[str, type[BaseModel]] = {
    CHAT: _ChatBody, COMPLETIONS: _CompletionBody, EMBEDDINGS: _EmbeddingBody,
    RESPONSES: _ResponsesBody, MESSAGES: _MessagesBody,
    **{url: _ScoringBody for url in (*SCORE_URLS, *RERANK_URLS)}}
BATCH_KEYS = {"custom_id", "method", "url", "body"}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every line: json.loads with any keyword builds a new
# JSONDecoder per call, a third of the parse time of a short line.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_line(raw: RawLine, max_line_bytes: int = 1 << 62) -> Request | LineError:
    """Turn one raw line into a Request or a LineError; never raises."""
    default_id = f"line-{raw.number}"
    if raw.data is None:
        return LineError(
            raw.number, default_id, "invalid_request",
            f"line is {raw.length} bytes, over the limit of {max_line_bytes}",
        )
    try:
        obj = _DECODER.decode(raw.data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return LineError(raw.number, default_id, "invalid_json_line", _why_not_json(exc))
    if not isinstance(obj, dict):
        return LineError(
            raw.number, default_id, "invalid_json_line",
            f"a line must be a JSON object, got {type(obj).__name__}",
        )
    return _to_request(raw.number, obj)


def _why_not_json(exc: Exception) -> str:
    """A plain reason, placed by character: the error already names the file's
    line, and json's own "line 1 column 2" would be a second, different line number."""
    if isinstance(exc, json.JSONDecodeError):
        reason = exc.msg[:1].lower() + exc.msg[1:]
        return f"not valid JSON: {reason} at character {exc.pos + 1}"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text: byte {exc.object[exc.start]:#04x} at character {exc.start + 1}"
    if isinstance(exc, RecursionError):
        return "not valid JSON here: nested too deeply"
    return f"not valid JSON: {exc}"


def _to_request(number: int, obj: dict[str, Any]) -> Request | LineError:
    custom_id = obj.get("custom_id", f"line-{number}")
    anthropic = "params" in obj and "body" not in obj and "url" not in obj
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, f"line-{number}", "invalid_request",
                         "custom_id must be a non-empty string", "custom_id",
                         anthropic=anthropic)
    if anthropic:
        extra = sorted(set(obj) - ANTHROPIC_KEYS)
        if extra:
            return LineError(number, custom_id, "invalid_request",
                             f"unknown field {extra[0]!r} in a batch line", extra[0],
                             anthropic=True)
        url: Any = MESSAGES
        body, prefix = obj["params"], "params."
        if not isinstance(body, dict):
            return LineError(number, custom_id, "invalid_request",
                             "params must be a JSON object", "params", anthropic=True)
    elif "body" in obj or "url" in obj:
        extra = sorted(set(obj) - BATCH_KEYS)
        if extra:
            return LineError(number, custom_id, "invalid_request",
                             f"unknown field {extra[0]!r} in a batch line", extra[0])
        url, body = obj.get("url"), obj.get("body")
        if obj.get("method", "POST") != "POST":
            return LineError(number, custom_id, "invalid_request",
                             "method must be POST", "method")
        if url not in URLS:
            return LineError(number, custom_id, "unsupported_url",
                             f"url {url!r} is not one of {', '.join(URLS)}", "url")
        if not isinstance(body, dict):
            return LineError(number, custom_id, "invalid_request",
                             "body must be a JSON object", "body")
        prefix = "body."
    else:
        body = {k: v for k, v in obj.items() if k != "custom_id"}
        if "messages" in body:
            url = CHAT
        elif "prompt" in body:
            url = COMPLETIONS
        elif "input" in body:
            url = EMBEDDINGS
        else:
            return LineError(number, custom_id, "invalid_request",
                             "a line needs body, messages, prompt or input", None)
        prefix = ""
    try:
        BODY_MODELS[url].model_validate(body)
    except ValidationError as exc:
        key, msg = first_error(exc)
        param = prefix + key
        return LineError(number, custom_id, "invalid_request", f"{param}: {msg}", param,
                         anthropic=anthropic)
    except RecursionError:
        return LineError(number, custom_id, "invalid_request", "body is nested too deeply",
                         anthropic=anthropic)
    return Request(number, custom_id, url, body, anthropic=anthropic)


def iter_file(path: Path, max_line_bytes: int) -> Iterator[Request | LineError]:
    """Every non-blank line of a file as a Request or LineError, streamed."""
    for _offset, item in iter_file_at(path, max_line_bytes):
        yield item


def iter_file_at(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Request | LineError]]:
    """As iter_file, with the byte offset where each line starts."""
    with open_regular(path) as stream:
        for raw in read_lines(stream, max_line_bytes):
            yield raw.offset, parse_line(raw, max_line_bytes)


def read_line_at(stream: BinaryIO, offset: int, number: int, max_line_bytes: int
                 ) -> Request | LineError:
    """The line NUMBER that starts at OFFSET, parsed as iter_file parses it."""
    stream.seek(offset)
    raw = next(read_lines(stream, max_line_bytes))
    return parse_line(RawLine(number, raw.data, raw.length, offset), max_line_bytes)


@dataclass
class Dedup:
    """Remembers custom_ids seen so far; the first occurrence wins.

    Keeps 8-byte hashes rather than the ids, so a million lines cost tens of
    megabytes at most.
    """

    seen: set[int] = field(default_factory=set)

    def check(self, item: Request | LineError) -> Request | LineError:
        key = hash(item.custom_id)
        if key in self.seen:
            return LineError(item.line, item.custom_id, "duplicate_custom_id",
                             f"custom_id {item.custom_id!r} was used by an earlier line",
                             "custom_id", anthropic=item.anthropic)
        self.seen.add(key)
        return item


PREFIX_FAMILY_CHARS = 256  # the prefix text lines of one family share (jobs/order.py)


def prefix_text(body: dict[str, Any]) -> str:
    """What a prompt template renders first, as one comparable string."""
    # a prefix cached under one LoRA adapter does not serve another: lines that
    # name a model (an adapter) group by it first
    parts: list[str] = [str(body["model"])] if body.get("model") else []
    for key in ("tools", "instructions"):
        if body.get(key):
            parts.append(json.dumps(body[key], sort_keys=True))
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                parts.append(str(message.get("role")))
                parts.append(content if isinstance(content, str)
                             else json.dumps(content, sort_keys=True))
    for key in ("prompt", "input", "query", "text_1"):
        value = body.get(key)
        if value is not None:
            parts.append(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    return "\x1f".join(parts)
