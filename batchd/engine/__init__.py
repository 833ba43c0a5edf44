"""The engine interface the runner talks to, and the deterministic fake.

An engine takes a stream of requests and yields, after each scheduling step,
the answers that finished in it. It keeps at most ``window`` requests in
flight, so the whole file is never in memory and the scheduler never waits at
a chunk boundary. Closing the generator early aborts what is still in flight.

The stream may carry several jobs' requests at once (``Request.job`` tells
their answers apart, ``Request.sampling`` overrides the stream's defaults), and
its source may yield ``HOLD``: nothing to send now, ask again later. A stream
whose source holds stays open, yielding empty lists, until the source ends.

The real engine lives in ``vllm_engine.py`` (with ``serving.py`` and
``endpoints.py``, in the engine process: only this wing imports vLLM).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator, Protocol

import structlog

from ..lines import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, LineError, Request
from ..profiles import Profile

log = structlog.get_logger()


@dataclass(frozen=True)
class Answer:
    """One finished request: an OpenAI response body, or an error."""

    request: Request
    body: dict[str, Any] | None = None
    error: LineError | None = None


class EngineDead(Exception):
    """The inference engine died; it must be started again."""


HOLD = None  # what a source yields when it has nothing to send right now
_END = object()


def take(source: Iterator[Request | None], n: int) -> tuple[list[Request], bool]:
    """Up to N requests from SOURCE, stopping early at a HOLD; and whether the
    source has ended."""
    batch: list[Request] = []
    while len(batch) < n:
        request = next(source, _END)
        if request is _END:
            return batch, True
        if request is HOLD:
            break
        batch.append(request)  # type: ignore[arg-type]
    return batch, False


def sampling_of(request: Request, default: dict[str, Any]) -> dict[str, Any]:
    return default if request.sampling is None else request.sampling


class Engine(Protocol):
    profile: Profile

    def stream(
        self, requests: Iterable[Request | None], sampling: dict[str, Any], window: int
    ) -> Generator[list[Answer], None, None]:
        """Answers as they finish, one list per engine step (possibly empty)."""
        ...

    def close(self) -> None:
        """Release the model and everything it holds."""
        ...


def fail(request: Request, code: str, message: str, status: int = 400,
         param: str | None = None) -> Answer:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return Answer(request, error=LineError(request.line, request.custom_id, code, message,
                                           param, status, kind))


class FakeEngine:
    """A deterministic engine for plumbing tests: answers echo the request.

    Its completions are a hash of the prompt, with token counts from word
    counts; ``step_seconds`` makes each step take time, to test progress,
    cancel and stop without a model.
    """

    def __init__(self, profile: Profile, step_seconds: float = 0.0, per_step: int = 8):
        self.profile = profile
        self.step_seconds = step_seconds
        self.per_step = per_step
        self.closed = False
        self.answered = 0  # requests it answered: what reached the engine

    def stream(self, requests: Iterable[Request | None], sampling: dict[str, Any],
               window: int) -> Generator[list[Answer], None, None]:
        source = iter(requests)
        pending: list[Request] = []
        exhausted = False
        while True:
            if not exhausted and len(pending) < window:
                batch, exhausted = take(source, window - len(pending))
                pending += batch
            if not pending:
                if exhausted:
                    return
                time.sleep(self.step_seconds or 0.01)  # the source holds
                yield []
                continue
            if self.step_seconds:
                time.sleep(self.step_seconds)
            done, pending = pending[: self.per_step], pending[self.per_step:]
            yield [self._answer(r, sampling_of(r, sampling)) for r in done]

    def _answer(self, request: Request, sampling: dict[str, Any]) -> Answer:
        self.answered += 1
        if request.url == EMBEDDINGS:
            return fail(request, "invalid_request",
                        f"profile {self.profile.name} does not serve embeddings")
        body = request.body
        text_in = str(body.get("messages") or body.get("prompt"))
        prompt_tokens = len(text_in.split())
        limit = body.get("max_completion_tokens") or body.get("max_tokens") \
            or sampling.get("max_tokens") or 16
        if prompt_tokens > 100_000:
            return fail(request, "context_length_exceeded", "prompt too long")
        digest = hashlib.sha256(text_in.encode()).hexdigest()
        words = [digest[i:i + 4] for i in range(0, 64, 4)][: max(1, min(limit, 16))]
        text = " ".join(words)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        rid = f"fake-{request.line}"
        if request.url == MESSAGES:  # Anthropic's message shape
            return Answer(request, body={
                "id": f"msg_{rid}", "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": text}], "model": self.profile.model,
                "stop_reason": "max_tokens",
                "usage": {"input_tokens": prompt_tokens, "output_tokens": len(words)}})
        if request.url == CHAT:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": "length", "logprobs": None}
            obj: dict[str, Any] = {"id": f"chatcmpl-{rid}", "object": "chat.completion"}
        else:
            assert request.url == COMPLETIONS
            choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
            obj = {"id": f"cmpl-{rid}", "object": "text_completion"}
        obj.update(created=int(time.time()), model=self.profile.model,
                   choices=[choice], usage=usage)
        return Answer(request, body=obj)

    def close(self) -> None:
        self.closed = True


class EnginePool:
    """Keeps one engine warm; a different profile replaces it."""

    def __init__(self, factory: Callable[[Profile], Engine]):
        self.factory = factory
        self.engine: Engine | None = None

    def get(self, profile: Profile) -> tuple[Engine, float]:
        """The engine for PROFILE and the seconds spent loading it now (0 if warm)."""
        if self.engine is not None and self.engine.profile == profile:
            return self.engine, 0.0
        self.close()
        log.info("engine_loading", profile=profile.name, model=profile.model)
        started = time.monotonic()
        self.engine = self.factory(profile)
        seconds = time.monotonic() - started
        log.info("engine_loaded", profile=profile.name, seconds=round(seconds, 2))
        return self.engine, seconds

    def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            log.info("engine_closing", profile=engine.profile.name)
            engine.close()

    def discard(self) -> None:
        """Drop an engine that died; clean up what can be cleaned, never raise."""
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.close()
            except Exception as exc:  # noqa: BLE001 - its processes may be gone already
                log.warning("engine_close_failed", error=str(exc))
