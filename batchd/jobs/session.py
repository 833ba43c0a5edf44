"""Many jobs at once on one warm engine: one stream, a shared window.

An engine runs one stream of requests at a time. A session feeds it from every
job running on the loaded profile and hands each answer to its own job:

- **Fair share.** The stream's source takes the next request from the job served
  least so far, each request costing 1/weight (stride scheduling). A job's
  weight is ``1 + priority`` for a sidecar priority of 0 or more and
  ``1 / (1 - priority)`` below. A job that joins starts level with the least
  served, so its first requests go out at the engine's next refill, however
  long the others are; with vLLM's priority scheduling they also run first.
- **Joining and leaving.** Between engine steps the daemon's ``admit`` may add
  jobs (up to ``scheduling.max_running_jobs``). A job leaves when every line is
  answered (it publishes), or on cancel or expiry: its lines still in the
  engine run on, and their answers are dropped (its checkpoint already holds an
  error line for each).
- **Ending together.** A stop (SIGTERM) or a yield (``admit`` says a file for
  another profile is overdue) closes the stream, which aborts what is in
  flight; every job keeps its checkpoint and resumes from it, losing nothing.
- **Engine death.** The stream starts again on a fresh engine with every job's
  unanswered lines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterator

import structlog

from ..engine import HOLD, Answer, EngineDead
from ..layout import JobState
from ..lines import Request
from ..profiles import Profile
from ..spool.outbox import error_line, result_line
from .job import Job

if TYPE_CHECKING:
    from .runner import Outcome, Runner

log = structlog.get_logger()

# How often running jobs look for inbox/JOB.cancel and the daemon is asked for
# more work: not a stat and an inbox scan per engine step.
CHECK_SECONDS = 0.5
YIELD = "yield"  # what admit answers when the running jobs must make way


def _close_quietly(job: Job) -> None:
    try:
        job.ckpt.close()
    except OSError:
        pass


def weight(priority: int) -> float:
    return 1.0 + priority if priority >= 0 else 1.0 / (1 - priority)


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

    @property
    def answered(self) -> bool:
        return self.head is None and self.inflight == 0


class Session:
    """The jobs running on PROFILE's engine, start to end; see the module text.

    ADMIT(session) returns jobs to add, or YIELD; ENDED(job, outcome) is told of
    every job that leaves with a final state, STALLED(name, error) of one whose
    publishing failed (it stays in work/ with its checkpoint), HOLD(job) of one
    that leaves unfinished (it made way, or its next part needs another
    profile): it stays open and resumes from its checkpoint."""

    def __init__(self, runner: Runner, profile: Profile,
                 admit: Callable[[Session], list[Job] | str] = lambda session: [],
                 ended: Callable[[Job, Outcome], None] = lambda job, outcome: None,
                 stalled: Callable[[str, OSError], None] = lambda name, error: None,
                 hold: Callable[[Job], None] | None = None):
        self.runner = runner
        self.profile = profile
        self.admit = admit
        self.ended = ended
        self.stalled = stalled
        self.held: list[Job] = []  # without HOLD: the jobs that left unfinished
        self.hold = hold or self.held.append
        self.running: dict[str, Running] = {}
        self.ready_at: float | None = None  # when its engine first answered to it
        self.tokens = [0, 0]  # prompt and completion tokens answered in this session

    # -- membership --------------------------------------------------------------

    def add(self, job: Job, now: float | None = None) -> None:
        """JOB joins: into the running stream at NOW, or the next one to start."""
        level = min((r.level for r in self.running.values()), default=0.0)
        for other in self.running.values():
            other.job.overlapped.add(job.name)
            job.overlapped.add(other.job.name)
        self.running[job.name] = running = Running(job, level)
        if now is not None:
            self._start(running, now)

    def _prime(self, r: Running) -> None:
        """Its unanswered lines from the checkpoint, in order, up to the first that
        needs the engine: those the result cache answers are answered on the way."""
        r.todo = self._tagged(r.job)
        r.head = next(r.todo, None)
        r.inflight = 0

    def _start(self, r: Running, now: float, primed: bool = False) -> None:
        """(Re)join the stream at NOW."""
        if not primed:
            self._prime(r)
        r.since = now
        r.done_before = r.job.answered
        r.tokens_at_join = (self.tokens[0], self.tokens[1])
        r.job.status.write(JobState.IN_PROGRESS, phase="generating", **r.job.progress())

    def _tagged(self, job: Job) -> Iterator[Request]:
        sampling = job.sampling
        if self.profile.priority_scheduling and job.priority:
            sampling = {**sampling, "priority": -job.priority}  # vLLM: lower runs first
        for request in self.runner.runnable(job):
            yield replace(request, job=job.name, sampling=sampling)

    def _stopped(self, r: Running, now: float) -> None:
        """Out of the stream, for now or for good: time and tokens counted."""
        job = r.job
        if r.since is not None:  # it was in a stream
            job.gen_s += now - r.since
            job.engine_tokens[0] += self.tokens[0] - r.tokens_at_join[0]
            job.engine_tokens[1] += self.tokens[1] - r.tokens_at_join[1]
        r.since = now
        r.tokens_at_join = (self.tokens[0], self.tokens[1])

    def _leave(self, r: Running, how: str) -> None:
        self._stopped(r, time.monotonic())
        del self.running[r.job.name]
        try:
            outcome = self.runner.end(r.job, how)
        except OSError as exc:  # its outbox files failed (disk full): the others go on
            _close_quietly(r.job)
            self.stalled(r.job.name, exc)
            return
        r.job.ckpt.close()
        self.ended(r.job, outcome)

    def _part_done(self, r: Running) -> None:
        """Every line of the job's current profile is answered: it publishes, or
        waits for the profile of its next part (a file whose lines name several)."""
        job = r.job
        if job.answered >= job.total or not job.next_part():
            self._leave(r, "completed" if job.answered >= job.total else
                        "engine_error:internal error: lines left without a profile")
            return
        self._stopped(r, time.monotonic())
        del self.running[job.name]
        job.ckpt.sync()
        assert job.profile is not None  # next_part() set it
        job.status.write(JobState.IN_PROGRESS, phase="waiting_for_model",
                         message=f"lines for {self.profile.name} answered; those for "
                         f"{job.profile.name} run when it is loaded", **job.progress())
        job.log.info("job_part_done", next_profile=job.profile.name)
        self.hold(job)

    def abandon(self) -> list[str]:
        """After an error the session cannot go on from (a disk gone read-only):
        close what is open, quietly, and say which jobs were running."""
        names = list(self.running)
        for r in self.running.values():
            _close_quietly(r.job)
        self.running.clear()
        return names

    # -- the stream --------------------------------------------------------------

    def running_for(self) -> float:
        """Seconds since its engine was ready (0 while it loads): the daemon lets a
        session run max_wait_seconds before it makes way, so each turn makes
        progress even when a load takes longer than the wait."""
        return 0.0 if self.ready_at is None else time.monotonic() - self.ready_at

    def _source(self) -> Iterator[Request | None]:
        """The shared window's feed: the least served job with a request to send."""
        while True:
            ready = [r for r in self.running.values() if r.head is not None]
            if not ready:
                yield HOLD
                continue
            r = min(ready, key=lambda r: r.level)
            request = r.head
            r.level += 1.0 / weight(r.job.priority)
            r.inflight += 1
            r.head = next(r.todo, None)
            yield request

    def run(self, jobs: list[Job]) -> str:
        """Run JOBS and every job admitted on the way until none is left ("done"),
        the daemon stops ("stopped") or the jobs make way ("yielded")."""
        runner = self.runner
        pool = runner.pool
        for job in jobs:
            self.add(job)
        while self.running:
            for r in list(self.running.values()):
                self._prime(r)
                if r.answered:  # by the cache, or nothing was left: no engine needed
                    self._part_done(r)
            if not self.running:
                return "done"
            if pool.engine is None or pool.engine.profile != self.profile:
                for r in self.running.values():
                    r.job.status.write(JobState.IN_PROGRESS, phase="loading_model",
                                       **r.job.progress())
            try:
                engine, spent = pool.get(self.profile)
            except Exception as exc:  # noqa: BLE001 - a model that cannot load fails its jobs
                for r in list(self.running.values()):
                    r.job.log.error("engine_load_failed", error=str(exc))
                    self._leave(r, f"engine_error:model failed to load: {exc}")
                return "done"
            now = time.monotonic()
            if self.ready_at is None:
                self.ready_at = now
            for r in self.running.values():
                r.job.load_s += spent
                self._start(r, now, primed=True)
            stream = engine.stream(self._source(), {}, runner.settings.engine.window)
            try:
                how = self._consume(stream)
            except EngineDead as exc:
                self._died(exc)
                if runner.stop.is_set():
                    self._end_all("stop")  # no new engine while stopping
                    return "stopped"
                continue
            finally:
                stream.close()  # aborts whatever is still in flight
            if how in ("stop", "yield"):
                self._end_all(how)
                return "stopped" if how == "stop" else "yielded"
        return "done"

    def _died(self, exc: EngineDead) -> None:
        """The engine died under the running jobs. Each counts the death; one at
        its max_engine_failures fails the rest of its lines. Which request killed
        it cannot be told, so jobs that shared the engine run one at a time from
        now on (the others wait, phase `waiting`): a file that kills the engine again
        then fails alone, and the others finish."""
        now = time.monotonic()
        for r in self.running.values():
            self._stopped(r, now)
            r.job.deaths += 1
        log.error("engine_died", error=str(exc), jobs=sorted(self.running),
                  deaths=max((r.job.deaths for r in self.running.values()), default=0))
        self.runner.pool.discard()  # its process is gone; never reuse it
        if self.runner.stop.is_set():
            return
        limit = self.runner.settings.engine.max_engine_failures
        for r in list(self.running.values()):
            if r.job.deaths >= limit:
                self._leave(r, f"engine_error:the engine died {r.job.deaths} times "
                            f"running this job: {exc}")
        for r in list(self.running.values())[1:]:
            del self.running[r.job.name]
            r.job.ckpt.sync()
            r.job.status.write(JobState.IN_PROGRESS, phase="waiting",
                               message="the engine died while this job ran beside others; "
                               "it runs alone next", **r.job.progress())
            self.hold(r.job)

    def _consume(self, stream: Iterator[list[Answer]]) -> str:
        """Answers to their jobs' checkpoints until the session empties, the
        daemon stops or the jobs must yield; returns which."""
        runner = self.runner
        interval = runner.settings.status.interval
        next_check = 0.0
        for answers in stream:
            self._record(answers)
            now = time.monotonic()
            for r in list(self.running.values()):
                job = r.job
                job.ckpt.tick()
                if r.answered:
                    self._part_done(r)
                elif now - job.status.written_at >= interval:
                    record = job.status.write(
                        JobState.IN_PROGRESS, phase="generating",
                        **job.progress(job.answered - r.done_before,
                                       now - (r.since if r.since is not None else now)))
                    runner.heartbeat(record)
            if runner.stop.is_set():
                return "stop"
            if now >= next_check or not self.running:
                next_check = now + CHECK_SECONDS
                for r in list(self.running.values()):
                    if runner.cancel_requested(r.job.name):
                        self._leave(r, "cancelled")
                    elif runner.expired(r.job):
                        self._leave(r, "expired")
                more = self.admit(self)
                if isinstance(more, str):  # YIELD
                    return "yield"
                for joining in more:
                    self.add(joining, time.monotonic())
            if not self.running:
                return "done"
        raise AssertionError("a shared stream ends only when the session closes it")

    def _record(self, answers: list[Answer]) -> None:
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

    def _end_all(self, how: str) -> None:
        """Every running job out of the stream with its checkpoint synced: for a
        stop they wait for the next start, for a yield for this daemon's next turn."""
        now = time.monotonic()
        for r in list(self.running.values()):
            self._stopped(r, now)
            job = r.job
            job.ckpt.sync()
            if how == "stop":
                self.runner.interrupted(job)
                job.ckpt.close()
            else:
                job.status.write(JobState.IN_PROGRESS, phase="yielded",
                                 message="made way for a file of another profile that "
                                 "waited over max_wait_seconds; resumes from its checkpoint",
                                 **job.progress())
                job.log.info("job_yielded", answered=job.answered)
                self.hold(job)
        self.running.clear()
