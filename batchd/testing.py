"""For testing only: the deterministic fake engine, and the command line on it.

Nothing in production turns this on: no setting of ``config.toml`` or of the
environment selects it, and no module of the package imports it (only tests and
benchmarks do; ``tests/test_layering.py`` checks this). Tests run it in process
(``Daemon(settings, factory=FakeEngine)``) or as a real daemon process::

    python -m batchd.testing run --config X [--once]

which is the ``batchd`` command line with every model loaded as a
``FakeEngine``; ``BATCHD_FAKE_STEP_SECONDS`` makes each of its steps take time,
while the file ``BATCHD_FAKE_HOLD`` names exists it answers nothing, and
``BATCHD_FAKE_STOP_AT=PHASE[:N]`` stops the process where it writes the Nth
status line of PHASE (for a kill -9 there).

Tests whose assertions are about order or overlap drive time themselves, so
they hold at any speed of the machine: a ``FakeClock`` is the daemon's clock
and the fake engine's sleep (in process), and a hold keeps jobs running until
the test has seen what it looks for (in process or as a daemon process).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Generator, Iterable

from .engine import Answer, Engine, fail, sampling_of, take
from .lines import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, Request
from .profiles import Profile


class FakeClock:
    """Time that moves only when told: the daemon's clock (``Daemon(clock=...)``)
    and the fake engine's ``sleep``, so a step of 10 ms is 10 ms of this clock
    however long the machine took for it."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeEngine:
    """A deterministic engine for plumbing tests: answers echo the request.

    Its completions are a hash of the prompt, with token counts from word
    counts; ``step_seconds`` makes each step take time (on ``sleep``: a
    ``FakeClock``'s to take none), to test progress, cancel and stop without a
    model. While ``held()`` is true it takes requests but answers none. Every
    request it takes is appended to ``fed``, when a test gives it a list.
    """

    def __init__(self, profile: Profile, step_seconds: float = 0.0, per_step: int = 8,
                 sleep: Callable[[float], None] = time.sleep,
                 held: Callable[[], bool] = lambda: False,
                 fed: list[Request] | None = None):
        self.profile = profile
        self.fed = fed
        self.step_seconds = step_seconds
        self.per_step = per_step
        self.sleep = sleep
        self.held = held
        self.closed = False
        self.answered = 0  # requests it answered: what reached the engine

    def more(self, joining: int = 0) -> None:
        pass  # it takes from its source at every step anyway

    def stream(self, requests: Iterable[Request | None], sampling: dict[str, Any],
               window: int) -> Generator[list[Answer], None, None]:
        source = iter(requests)
        pending: list[Request] = []
        exhausted = False
        while True:
            if not exhausted and len(pending) < window:
                batch, exhausted = take(source, window - len(pending))
                pending += batch
                if self.fed is not None:
                    self.fed.extend(batch)
            if not pending:
                if exhausted:
                    return
                self.sleep(self.step_seconds or 0.01)  # the source holds
                yield []
                continue
            if self.held():
                self.sleep(self.step_seconds or 0.01)
                yield []
                continue
            if self.step_seconds:
                self.sleep(self.step_seconds)
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


def fake_factory() -> Callable[[Profile], Engine]:
    """Every profile loaded as a FakeEngine, its step time from
    ``BATCHD_FAKE_STEP_SECONDS`` (default 0), held while the file
    ``BATCHD_FAKE_HOLD`` names exists. Without a step time it answers 64 a
    step, as a real engine process hands answers over in bunches (8 a step
    made a million-line file a million-line loop of tiny turns)."""
    step = float(os.environ.get("BATCHD_FAKE_STEP_SECONDS", "0"))
    per_step = 8 if step else 64
    hold = os.environ.get("BATCHD_FAKE_HOLD")
    held = (lambda: Path(hold).exists()) if hold else (lambda: False)
    return lambda profile: FakeEngine(profile, step_seconds=step, per_step=per_step,
                                      held=held)


def stop_at(where: str) -> None:
    """The process stops itself (SIGSTOP) right after it writes the Nth status
    line of PHASE (``BATCHD_FAKE_STOP_AT=PHASE[:N]``, N=1 by default): a
    test's kill -9 then lands in that phase however fast or slow the machine."""
    from .spool.outbox import StatusFile

    phase, _, nth = where.partition(":")
    left = [int(nth or 1)]
    write = StatusFile.write

    def stopping(self: StatusFile, *args: Any, **fields: Any) -> dict[str, Any]:
        record = write(self, *args, **fields)
        if record.get("phase") == phase:
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGSTOP)
        return record

    StatusFile.write = stopping  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """The ``batchd`` command line, its daemon on the fake engine."""
    from .cli import main as batchd_main

    if os.environ.get("BATCHD_FAKE_STOP_AT"):
        stop_at(os.environ["BATCHD_FAKE_STOP_AT"])
    return batchd_main(argv, factory=fake_factory())


if __name__ == "__main__":
    sys.exit(main())
