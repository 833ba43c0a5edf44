"""The engine interface a session talks to (the deterministic fake, for tests
only, is in ``batchd/testing.py``).

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

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator, Protocol

import structlog

from ..lines import LineError, Request
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


class Unplaced(EngineDead):
    """No node of the Ray cluster had room for an engine replica in time: not a
    death (the replica is tried again after the backoff, and no line fails for it)."""


HOLD = None  # what a source yields when it has nothing to send right now
_END = object()


def take(source: Iterator[Request | None], n: int) -> tuple[list[Request], bool]:
    """Up to N requests from SOURCE, stopping early at a HOLD; and whether the
    source has ended. A source that asks for its requests (the engine process's
    feed) is told N first."""
    want = getattr(source, "want", None)
    if want is not None:
        want(n)
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

    def more(self, joining: int = 0) -> None:
        """A job joined the running stream: take from its source now, not at the
        next refill of the window; the JOINING requests the source gives first
        (the job's) start at once, the latest admitted making way if the batch
        is full."""
        ...

    def close(self) -> None:
        """Release the model and everything it holds."""
        ...


def fail(request: Request, code: str, message: str, status: int = 400,
         param: str | None = None) -> Answer:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return Answer(request, error=LineError(request.line, request.custom_id, code, message,
                                           param, status, kind))


class EnginePool:
    """Keeps one engine warm; a different profile replaces it. A load is timed
    on CLOCK, the loop's own (a session's turn begins when its load ends)."""

    def __init__(self, factory: Callable[[Profile], Engine],
                 clock: Callable[[], float] = time.monotonic):
        self.factory = factory
        self.clock = clock
        self.engine: Engine | None = None

    def get(self, profile: Profile) -> tuple[Engine, float]:
        """The engine for PROFILE and the seconds spent loading it now (0 if warm)."""
        if self.engine is not None and self.engine.profile == profile:
            return self.engine, 0.0
        self.close()
        log.info("engine_loading", profile=profile.name, model=profile.model)
        started = self.clock()
        self.engine = self.factory(profile)
        seconds = self.clock() - started
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
