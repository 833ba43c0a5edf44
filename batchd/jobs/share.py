"""One stream's fair share: which running job's request goes next, and whose
answer is whose (batchd/jobs/session.py runs the stream).

The source takes the next request from the job served least so far, each
request costing 1/weight (stride scheduling). A job's weight is ``1 + priority``
for a sidecar priority of 0 or more and ``1 / (1 - priority)`` below. A job that
joins starts level with the least served, and its first few requests
(``head_start``) go before anyone else's, so they are the next sent.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator

from ..engine import HOLD, Answer, Engine
from ..lines import Request
from ..profiles import Profile
from ..spool.outbox import error_line, result_line
from .job import Job
from .prepare import runnable


def weight(priority: int) -> float:
    return 1.0 + priority if priority >= 0 else 1.0 / (1 - priority)


def head_start_for(engine: Engine) -> int:
    """How many requests of a job that joins go before everyone else's: a
    thirty-second of vLLM's batch (max_num_seqs)."""
    seqs = getattr(engine, "max_num_seqs", None) or 256
    return max(1, seqs // 32)


def auto_window(engine: Engine) -> int:
    """Requests in flight when `[engine] window = 0`: vLLM's batch and a quarter
    more, refilled as a sixteenth of it frees (engine/vllm_engine.py). The
    batch stays full (requests of one length end together, and the quarter
    waiting refills their slots at once: within 2 % of a 1,024 window's
    throughput on CPU), while vLLM's own queue stays short, so a job that joins
    waits behind at most a quarter of a batch, not thousands of requests."""
    seqs = getattr(engine, "max_num_seqs", None) or 256
    return seqs + max(1, seqs // 4)


PACE_SECONDS = 30.0  # the window of a running job's recent rate (its ETA)


@dataclass(eq=False)
class Running:
    """A job in the session's stream and its place in the fair share."""

    job: Job
    level: float  # service received, in requests / weight
    todo: Iterator[Request] = field(default_factory=lambda: iter(()))
    head: Request | None = None  # the next request to send
    inflight: int = 0
    since: float | None = None  # when it joined the current stream (None: not yet)
    done_before: int = 0  # lines answered when it joined it
    tokens_at_join: tuple[int, int] = (0, 0)
    head_start: int = 0  # requests still to send before jobs without one (it just joined)
    # (when, lines answered) at its recent status lines: its pace for the ETA
    pace: deque[tuple[float, int]] = field(default_factory=deque)

    def recent_rate(self, now: float, answered: int) -> float | None:
        """Lines answered a second over the last PACE_SECONDS (None before two
        looks): answers come in waves as a batch finishes, so the rate since
        the stream began, slow start included, would overstate the time left."""
        self.pace.append((now, answered))
        while len(self.pace) > 2 and now - self.pace[1][0] >= PACE_SECONDS:
            self.pace.popleft()
        then, before = self.pace[0]
        return (answered - before) / (now - then) if now > then else None

    @property
    def answered(self) -> bool:
        return self.head is None and self.inflight == 0


class Share:
    """The jobs running in one stream of PROFILE's engine and their places in it."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.running: dict[str, Running] = {}
        self.tokens = [0, 0]  # prompt and completion tokens answered in this session

    def add(self, job: Job, head_start: int = 0) -> Running:
        """JOB joins level with the least served; its first CREDIT requests go
        before those of jobs that have used theirs."""
        level = min((r.level for r in self.running.values()), default=0.0)
        for other in self.running.values():
            other.job.overlapped.add(job.name)
            job.overlapped.add(other.job.name)
        self.running[job.name] = running = Running(job, level, head_start=head_start)
        return running

    def prime(self, r: Running) -> None:
        """Its unanswered lines from the checkpoint, in order, up to the first that
        needs the engine: those the result cache answers are answered on the way."""
        r.todo = self._tagged(r.job)
        r.head = next(r.todo, None)
        r.inflight = 0

    def _tagged(self, job: Job) -> Iterator[Request]:
        sampling = job.sampling
        if self.profile.priority_scheduling and job.priority:
            sampling = {**sampling, "priority": -job.priority}  # vLLM: lower runs first
        for request in runnable(job):
            yield replace(request, job=job.name, sampling=sampling)

    def source(self) -> Iterator[Request | None]:
        """The shared window's feed: the least served job with a request to send."""
        while True:
            ready = [r for r in self.running.values() if r.head is not None]
            if not ready:
                yield HOLD
                continue
            r = min(ready, key=lambda r: (r.head_start <= 0, r.level))
            request = r.head
            r.head_start -= 1
            r.level += 1.0 / weight(r.job.priority)
            r.inflight += 1
            r.head = next(r.todo, None)
            yield request

    def record(self, answers: list[Answer]) -> None:
        for answer in answers:
            r = self.running.get(answer.request.job)
            if r is None:
                continue  # its job left (cancelled, expired): that line is answered already
            r.inflight -= 1
            job, request = r.job, answer.request
            job.remember(request.line, answer.body)
            if answer.error is not None:
                job.record(request.line, "error", error_line(answer.error))
                continue
            assert answer.body is not None  # an answer is one or the other
            job.record(request.line, "result", result_line(request, answer.body))
            if job.first_result_s is None:
                job.first_result_s = time.monotonic() - job.started
            usage = answer.body.get("usage") or {}  # OpenAI's names, or Anthropic's
            self.tokens[0] += usage.get("prompt_tokens") or usage.get("input_tokens") or 0
            self.tokens[1] += usage.get("completion_tokens") or usage.get("output_tokens") or 0
