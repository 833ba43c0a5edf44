"""Many jobs at once on one warm engine: one stream, a shared window, stepped
by the daemon's loop (batchd/daemon.py), one engine step a turn.

An engine runs one stream of requests at a time. A session feeds it from every
job running on its profile and hands each answer to its own job:

- **Fair share** (``share.py``): the next request is the least served job's,
  by priority weight; a job that joins is served next, however long the
  others are, and the engine is told to take it at once (``Engine.more``).
- **Turns.** ``add`` puts a job in; ``step`` loads the engine when it must, or
  moves one engine step's answers into their checkpoints; ``leave`` ends a job
  (cancel, expiry); ``drain`` ends the stream for a stop or a yield. The jobs
  that left (``Left``: ended, stalled or waiting) are handed over by
  ``take_left``, also when an error cut a call short.
- **Leaving.** A job leaves when every line is answered (it publishes), or on
  cancel or expiry: its lines still in the engine run on, and their answers are
  dropped (its checkpoint already holds an error line for each).
- **Engine death**, while loading or while generating: every job counts it; one
  at ``max_engine_failures`` fails the rest of its lines. The next load starts
  after a backoff, with every job's unanswered lines. Jobs that shared an engine
  that died under them run one at a time from then on: a file that kills the
  engine fails alone, and the others finish. A load that fails by itself (no
  such model, a setting vLLM refuses) fails its jobs at once with the reason.

Decisions use the loop's clock (``now``: the backoff, how long the session has
run); the durations a bench record reports are measured with the process's
monotonic clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generator

import structlog

from ..config import Settings
from ..engine import Answer, EngineDead, EnginePool, Unplaced
from ..layout import COMPLETED, Ending, JobState, Phase
from ..profiles import Profile
from . import publish
from .job import Job
from .share import Running, Share, auto_window, head_start_for
from .publish import Outcome

log = structlog.get_logger()


class Drain(str, Enum):
    """Why a session ends with jobs still running."""

    STOP = "stop"  #: the daemon stops: each job resumes at the next start
    YIELD = "yield"  #: an overdue file of another profile runs first: they wait their turn


@dataclass(frozen=True)
class Left:
    """A job that left its session: ended (OUTCOME), stalled (ERROR: publishing
    failed; it stays in work/ with its checkpoint), or neither: it waits,
    unfinished, for its profile's next turn (a yield, its next stage, running alone)."""

    job: Job
    outcome: Outcome | None = None
    error: OSError | None = None


@dataclass
class Turn:
    """What one step did: the jobs that left, the progress lines it wrote, and
    whether it did anything (answers, a load) or only waited."""

    left: list[Left] = field(default_factory=list)
    progress: list[dict[str, Any]] = field(default_factory=list)
    worked: bool = False


class Session:
    """The jobs running on PROFILE's engine, from the first that needs it to
    the last; see the module text."""

    def __init__(self, settings: Settings, pool: EnginePool, profile: Profile):
        self.settings = settings
        self.pool = pool
        self.profile = profile
        self.share = Share(profile)
        self.running = self.share.running  # the jobs in it, by name
        self.tokens = self.share.tokens
        self.stream: Generator[list[Answer], None, None] | None = None
        self.ready_at: float | None = None  # the loop's clock when its engine first answered
        self.load_at = 0.0  # after an engine death: not loading again before this
        self._turn = Turn()
        self.head_start = 0  # requests a joining job sends before anyone else's

    # -- membership --------------------------------------------------------------

    def add(self, job: Job) -> None:
        """JOB joins: into the running stream, its requests the next ones sent,
        or into the next stream to start."""
        running = self.share.add(job, self.head_start)
        if self.stream is not None:
            self.share.prime(running)
            if running.answered:  # by the cache, or nothing was left: no engine time
                self._stage_done(running)
                return
            self._start(running)
            if running.head is not None and self.pool.engine is not None:
                # its first requests go in now, into running slots
                self.pool.engine.more(min(running.head_start, job.total - job.answered))

    def remove(self, name: str) -> None:
        """NAME could not join after all (its files failed to open): out, with
        nothing written for it (the daemon stalls it)."""
        self.running.pop(name, None)

    def leave(self, name: str, ending: Ending) -> None:
        """End the running job NAME as ENDING says (cancel, expiry)."""
        self._leave(self.running[name], ending)

    def drop(self, name: str) -> None:
        """Take NAME out at once and write nothing more for it: another daemon
        took its lease over (this one was cut off from the spool)."""
        r = self.running.pop(name)
        self._stopped(r)
        _close_quietly(r.job)
        # the stream starts afresh with the others: what the engine held of the
        # dropped job's requests goes with it (the others' unanswered lines are
        # sent again; nothing is lost, nothing answered twice)
        self.close()
        for other in self.running.values():
            self._stopped(other)

    def take_left(self) -> list[Left]:
        """The jobs that left in the last call (``step``, ``leave``, ``drain``),
        handed over once: also after an error cut that call short."""
        left, self._turn.left = self._turn.left, []
        return left

    def running_for(self, now: float) -> float:
        """Seconds since its engine was ready (0 while it loads): the daemon lets a
        session run max_wait_seconds before it makes way, so each turn makes
        progress even when a load takes longer than the wait."""
        return 0.0 if self.ready_at is None else now - self.ready_at

    # -- one turn ----------------------------------------------------------------

    def step(self, now: float) -> Turn:
        """Start the stream (loading the engine when it must), or move one engine
        step's answers into their jobs' checkpoints."""
        self._turn = turn = Turn(left=self._turn.left)  # what was not taken yet stays
        if self.stream is None:
            turn.worked = self._open(now)
            return turn
        try:
            answers = next(self.stream)
        except EngineDead as exc:
            self._died(exc, now, loading=False)
            turn.worked = True
            return turn
        self.share.record(answers)
        turn.worked = bool(answers)
        interval = self.settings.status.interval
        measured = time.monotonic()
        for r in list(self.running.values()):
            job = r.job
            job.ckpt.tick()
            if r.answered:
                self._stage_done(r)
            elif measured - job.status.written_at >= interval:
                since = r.since if r.since is not None else measured
                turn.progress.append(job.status.write(
                    JobState.IN_PROGRESS, phase=Phase.GENERATING,
                    **job.progress(job.answered - r.done_before, measured - since,
                                   r.recent_rate(measured, job.answered))))
        return turn

    def _open(self, now: float) -> bool:
        """Prime every job, load the engine and start the stream; False while it
        waits out the backoff after an engine death."""
        if now < self.load_at:
            return False
        for r in list(self.running.values()):
            self.share.prime(r)
            if r.answered:  # by the cache, or nothing was left: no engine needed
                self._stage_done(r)
        if not self.running:
            return True
        if self.pool.engine is None or self.pool.engine.profile != self.profile:
            for r in self.running.values():
                r.job.status.write(JobState.IN_PROGRESS, phase=Phase.LOADING_MODEL,
                                   **r.job.progress())
        try:
            engine, spent = self.pool.get(self.profile)
        except Unplaced as exc:  # no Ray node has room yet: wait, no death counted
            self.load_at = now + max(1.0, self.settings.engine.restart_backoff_seconds)
            log.warning("engine_not_placed", profile=self.profile.name, error=str(exc),
                        jobs=sorted(self.running))
            return True
        except EngineDead as exc:  # killed while loading (OOM killer, kill): a death
            self._died(exc, now, loading=True)
            return True
        except Exception as exc:  # noqa: BLE001 - a model that cannot load fails its jobs
            for r in list(self.running.values()):
                r.job.log.error("engine_load_failed", error=str(exc))
                self._leave(r, Ending.failed("engine_error", f"model failed to load: {exc}"))
            return True
        if self.ready_at is None:
            self.ready_at = now + spent  # the loop's clock once the load is over
        for r in self.running.values():
            r.job.load_s += spent
            self._start(r)
        window = self.settings.engine.window or auto_window(engine)
        # a fixed window is the operator's: requests go in fair-share order only
        self.head_start = 0 if self.settings.engine.window else head_start_for(engine)
        log.info("stream_opened", profile=self.profile.name, window=window,
                 max_num_seqs=getattr(engine, "max_num_seqs", None), jobs=sorted(self.running))
        self.stream = engine.stream(self.share.source(), {}, window)
        return True

    def drain(self, how: Drain) -> None:
        """Close the stream (what is in flight is aborted) and take every job out
        with its checkpoint synced: for a stop each waits for the next start, for
        a yield for this daemon's next turn of its profile (each a Left)."""
        self.close()
        for r in list(self.running.values()):
            self._stopped(r)
            job = r.job
            job.ckpt.sync()
            if how == Drain.STOP:
                publish.interrupted(job)
                job.ckpt.close()
            else:
                job.status.write(JobState.IN_PROGRESS, phase=Phase.YIELDED,
                                 message="made way for a file of another profile that "
                                 "waited over max_wait_seconds; resumes from its checkpoint",
                                 **job.progress())
                job.log.info("job_yielded", answered=job.answered)
                self._turn.left.append(Left(job))
        self.running.clear()

    def close(self) -> None:
        """End the stream; the engine stays warm in its pool."""
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.close()  # aborts whatever is still in flight

    def abandon(self) -> list[str]:
        """After an error the session cannot go on from (a disk gone read-only):
        close what is open, quietly, and say which jobs were running."""
        names = list(self.running)
        try:
            self.close()
        except EngineDead:
            self.pool.discard()
        for r in self.running.values():
            _close_quietly(r.job)
        self.running.clear()
        return names

    # -- the stream --------------------------------------------------------------

    def _start(self, r: Running) -> None:
        """(Re)join the stream."""
        r.since = time.monotonic()
        r.done_before = r.job.answered
        r.tokens_at_join = (self.tokens[0], self.tokens[1])
        r.job.status.write(JobState.IN_PROGRESS, phase=Phase.GENERATING, **r.job.progress())

    # -- leaving -----------------------------------------------------------------

    def _stopped(self, r: Running) -> None:
        """Out of the stream, for now or for good: time and tokens counted."""
        job = r.job
        if r.since is not None:  # it was in a stream
            job.gen_s += time.monotonic() - r.since
            take_job = getattr(self.pool.engine, "take_job", None)  # engine replicas
            if take_job is not None:
                job.count_replicas(take_job(job.name))
            job.engine_tokens[0] += self.tokens[0] - r.tokens_at_join[0]
            job.engine_tokens[1] += self.tokens[1] - r.tokens_at_join[1]
        r.since = None
        r.tokens_at_join = (self.tokens[0], self.tokens[1])

    def _leave(self, r: Running, ending: Ending) -> None:
        self._stopped(r)
        del self.running[r.job.name]
        try:
            outcome = publish.end(r.job, ending)
        except OSError as exc:  # its outbox files failed (disk full): the others go on
            _close_quietly(r.job)
            self._turn.left.append(Left(r.job, error=exc))
            return
        r.job.ckpt.close()
        self._turn.left.append(Left(r.job, outcome))

    def _stage_done(self, r: Running) -> None:
        """Every line of the job's current profile is answered: it publishes, or
        waits for the profile of its next stage (a file whose lines name several)."""
        job = r.job
        if job.answered >= job.total or not job.next_stage():
            self._leave(r, COMPLETED if job.answered >= job.total else Ending.failed(
                "engine_error", "internal error: lines left without a profile"))
            return
        self._stopped(r)
        del self.running[job.name]
        job.ckpt.sync()
        assert job.profile is not None  # next_stage() set it
        job.status.write(JobState.IN_PROGRESS, phase=Phase.WAITING_FOR_MODEL,
                         message=f"lines for {self.profile.name} answered; those for "
                         f"{job.profile.name} run when it is loaded", **job.progress())
        job.log.info("job_stage_done", next_profile=job.profile.name)
        self._turn.left.append(Left(job))

    def _died(self, exc: EngineDead, now: float, loading: bool) -> None:
        """The engine died, under the running jobs or while loading for them; see
        the module text."""
        self.stream = None  # a generator that raised is over
        for r in self.running.values():
            self._stopped(r)
            r.job.deaths += 1
        deaths = max((r.job.deaths for r in self.running.values()), default=0)
        log.error("engine_died", error=str(exc), jobs=sorted(self.running), deaths=deaths,
                  while_loading=loading, profile=self.profile.name)
        self.pool.discard()  # its process is gone; never reuse it
        limit = self.settings.engine.max_engine_failures
        for r in list(self.running.values()):
            if r.job.deaths >= limit:
                self._leave(r, Ending.failed(
                    "engine_error", f"the engine died {r.job.deaths} times "
                    f"{'loading the model for' if loading else 'running'} this job: {exc}"))
        if not loading:  # a request may have killed it: shared jobs run one at a time
            for r in list(self.running.values())[1:]:
                del self.running[r.job.name]
                r.job.ckpt.sync()
                r.job.status.write(JobState.IN_PROGRESS, phase=Phase.WAITING_TO_RUN_ALONE,
                                   message="the engine died while this job ran beside "
                                   "others; it runs alone next", **r.job.progress())
                self._turn.left.append(Left(r.job))
        backoff = min(60.0, self.settings.engine.restart_backoff_seconds
                      * 2 ** max(0, deaths - 1))
        self.load_at = now + backoff
        for r in self.running.values():
            r.job.ckpt.sync()
            r.job.status.write(JobState.IN_PROGRESS, phase=Phase.ENGINE_DIED,
                               message=f"the engine died{' while loading' if loading else ''}"
                               f" ({r.job.deaths} of {limit}); loading again in "
                               f"{backoff:.0f}s", **r.job.progress())
            log.info("engine_reload_scheduled", job=r.job.name, in_s=backoff)


def _close_quietly(job: Job) -> None:
    try:
        job.ckpt.close()
    except OSError:
        pass
