"""Run one claimed job from ``work/`` to its final status line.

validating → loading the engine → generating (streamed, checkpointed) →
finalizing. Every step can be cut short by a crash and redone from the
checkpoint: answered lines are never asked again and never written twice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from ..config import Settings
from ..engine import EngineDead, EnginePool
from ..layout import JobState
from ..lines import LineError, Request, open_regular, read_line_at
from ..profiles import ProfileSet
from ..spool.outbox import error_line, read_status, result_line
from . import publish
from .job import Job
from .router import JobRejected, Sidecar, route
from .validate import classified, validate_job

# How often a running job looks for inbox/JOB.cancel: not a stat per engine step.
CANCEL_CHECK_SECONDS = 0.5


def _when(ts: Any) -> datetime | None:
    """A status line's timestamp, or None when it is not one."""
    try:
        return datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Outcome:
    """How a job ended: its final state and its bench record (None when a
    restart only finished the cleanup of a job published before a crash)."""

    state: JobState
    bench: dict[str, Any] | None


class Runner:
    """Runs jobs one at a time on a warm engine. ``stop`` is set by SIGTERM."""

    def __init__(self, settings: Settings, pool: EnginePool,
                 stop: threading.Event | None = None,
                 heartbeat: Callable[[dict[str, Any]], None] = lambda progress: None):
        self.settings = settings
        self.pool = pool
        self.stop = stop or threading.Event()
        self.heartbeat = heartbeat  # called after every engine step with the progress

    def cancel_requested(self, job: str) -> bool:
        return self.settings.layout.cancel(job).exists()

    @staticmethod
    def expired(job: Job) -> bool:
        return job.deadline is not None and datetime.now(timezone.utc) >= job.deadline

    # -- the job, start to end -----------------------------------------------

    def run(self, name: str, profiles: ProfileSet, note: str = "", waited: float = 0.0
            ) -> Outcome | None:
        """Run a job to a final state and say how it ended; None when a stop
        interrupted it (it resumes later).

        PROFILES are the daemon's (their one owner, reloaded on SIGHUP); NOTE
        says why it was claimed; WAITED is how long it sat in the inbox."""
        job = Job(name, self.settings, waited=waited)
        history = read_status(job.status.path)
        claimed_at = _when(history[0].get("ts") if history else None) or \
            _when(job.started_at) or datetime.now(timezone.utc)
        if history and JobState(history[-1]["state"]).final:
            # a crash came after publishing: only the cleanup is left
            return Outcome(publish.cleanup(job, JobState(history[-1]["state"])), None)
        if history:
            job.status.state = JobState(history[-1]["state"])
            if job.status.state != JobState.QUEUED:
                job.status.write(JobState.QUEUED, message="resuming after a restart")
        job.open_checkpoint()
        try:
            if job.status.state is None:
                job.status.write(JobState.QUEUED, message=note or "claimed")
            resumed = job.ckpt.resumed_lines
            message = f"resumed from checkpoint: {resumed} lines already answered" \
                if resumed else ""
            if resumed:
                job.log.info("job_resumed", lines=resumed)
            job.status.write(JobState.VALIDATING, phase="validating", message=message)
            job.queued_s = job.waited + time.monotonic() - job.started
            try:
                sidecar, votes = validate_job(job)
                job.profile, reason = route(name, sidecar, votes, profiles,
                                            self.settings.routing.default_profile)
            except JobRejected as exc:
                return self._reject(job, exc)
            job.log = job.log.bind(profile=job.profile.name)
            job.log.info("job_routed", reason=reason, total=job.total)
            job.deadline = sidecar.deadline(claimed_at)
            publish.job_toml(job, sidecar, reason, self.settings.routing.models_dir)
            if self.cancel_requested(name):
                return self._finish_cancelled(job)
            if self.expired(job):
                return self._finish_expired(job)
            return self._generate(job, sidecar)
        finally:
            job.ckpt.close()

    def _classified(self, job: Job) -> Iterator[Request | LineError]:
        for _offset, item in classified(job.input, self.settings.limits.max_line_bytes):
            yield item

    # -- generation ------------------------------------------------------------

    def _generate(self, job: Job, sidecar: Sidecar) -> Outcome | None:
        assert job.profile is not None
        sampling = {**job.profile.sampling, **sidecar.sampling}
        deaths = 0
        while True:
            job.status.write(JobState.IN_PROGRESS, phase="loading_model",
                             **job.progress())
            try:
                engine, spent = self.pool.get(job.profile)
            except Exception as exc:  # noqa: BLE001 - a model that cannot load fails its job
                job.log.error("engine_load_failed", error=str(exc))
                return self._fail_rest(job, "engine_error",
                                       f"model failed to load: {exc}")
            job.load_s += spent
            started = time.monotonic()
            done_before = job.answered
            job.status.write(JobState.IN_PROGRESS, phase="generating",
                             **job.progress())
            todo = self._runnable(job, sampling)
            stream = engine.stream(todo, sampling, self.settings.engine.window)
            outcome = None
            cancel_check = 0.0
            try:
                for answers in stream:
                    for answer in answers:
                        if answer.error is not None:
                            job.ckpt.add(answer.request.line, "error", error_line(answer.error))
                        else:
                            assert answer.body is not None  # an answer is one or the other
                            job.ckpt.add(answer.request.line, "result",
                                     result_line(answer.request, answer.body))
                            if job.first_result_s is None:
                                job.first_result_s = time.monotonic() - job.started
                    job.ckpt.tick()
                    if time.monotonic() - job.status.written_at >= self.settings.status.interval:
                        done_now = job.answered - done_before
                        record = job.status.write(
                            JobState.IN_PROGRESS, phase="generating",
                            **job.progress(done_now, time.monotonic() - started))
                        self.heartbeat(record)
                    if time.monotonic() >= cancel_check:
                        if self.cancel_requested(job.name):
                            outcome = "cancel"
                            break
                        if self.expired(job):
                            outcome = "expire"
                            break
                        cancel_check = time.monotonic() + CANCEL_CHECK_SECONDS
                    if self.stop.is_set():
                        outcome = "stop"
                        break
            except EngineDead as exc:
                deaths += 1
                job.gen_s += time.monotonic() - started
                job.log.error("engine_died", error=str(exc), deaths=deaths)
                self.pool.discard()  # its process is gone; never reuse it
                if self.stop.is_set():
                    self._interrupted(job)  # no new engine while stopping
                    return None
                if deaths >= self.settings.engine.max_engine_failures:
                    return self._fail_rest(job, "engine_error", f"the engine died "
                                           f"{deaths} times running this job: {exc}")
                continue
            finally:
                stream.close()  # aborts whatever is still in flight
            job.gen_s += time.monotonic() - started
            if outcome == "stop":
                self._interrupted(job)
                return None
            if outcome == "cancel":
                return self._finish_cancelled(job)
            if outcome == "expire":
                return self._finish_expired(job)
            return self._publish(job, JobState.COMPLETED)

    def _interrupted(self, job: Job) -> None:
        job.ckpt.sync()
        job.status.write(JobState.QUEUED, phase="interrupted",
                         message="daemon stopping; the job resumes at the next start",
                         **job.progress())
        job.log.info("job_interrupted", answered=job.answered)

    def _runnable(self, job: Job, sampling: dict[str, Any]
                  ) -> Iterator[Request]:
        """The valid, unanswered requests; one over the profile's limits gets its
        error line here and never reaches the engine."""
        assert job.profile is not None
        for item in self._pending(job):
            over = job.profile.limits.violation({**sampling, **item.body}) \
                or job.profile.media.violation(item.body)
            if over:
                job.ckpt.add(item.line, "error", error_line(LineError(
                    item.line, item.custom_id, "invalid_request", over[1], over[0])))
                continue
            yield item

    def _pending(self, job: Job) -> Iterator[Request]:
        """The valid, unanswered requests in the job's order (batchd/jobs/order.py)."""
        if job.order is None:
            for item in self._classified(job):
                if isinstance(item, Request) and item.line not in job.ckpt.done:
                    yield item
            return
        max_line = self.settings.limits.max_line_bytes
        with open_regular(job.input) as stream:
            for line, offset in job.order.sequence():
                if line not in job.ckpt.done:
                    item = read_line_at(stream, offset, line, max_line)
                    assert isinstance(item, Request)  # it was one when the order was made
                    yield item

    # -- endings ---------------------------------------------------------------

    def _fill(self, job: Job, code: str, message: str, status: int) -> None:
        """Give every line not yet answered an error line with CODE."""
        kind = "invalid_request_error" if status < 500 else "server_error"
        for item in self._classified(job):
            if item.line not in job.ckpt.done:
                job.ckpt.add(item.line, "error", error_line(LineError(
                    item.line, item.custom_id, code, message, None, status, kind)))

    def _finish_cancelled(self, job: Job) -> Outcome:
        self._fill(job, "cancelled", "the job was cancelled before this line ran", 400)
        job.layout.cancel(job.name).unlink(missing_ok=True)
        job.log.info("job_cancelled")
        return self._publish(job, JobState.CANCELLED)

    def _finish_expired(self, job: Job) -> Outcome:
        """OpenAI's expiry: answered lines stay; the rest get `batch_expired`."""
        self._fill(job, "batch_expired", "this request could not be executed before "
                   "the completion window expired", 400)
        job.log.info("job_expired")
        return self._publish(job, JobState.EXPIRED)

    def _fail_rest(self, job: Job, code: str, message: str) -> Outcome:
        self._fill(job, code, message, 500)
        return self._publish(job, JobState.FAILED,
                             errors=[{"code": code, "message": message, "line": None}])

    def _reject(self, job: Job, exc: JobRejected) -> Outcome:
        job.log.warning("job_rejected", code=exc.code, reason=exc.message)
        if exc.code not in ("file_too_large", "not_a_regular_file"):
            self._fill(job, exc.code, exc.message, 400)
        return self._publish(job, JobState.FAILED, errors=[
            {"code": exc.code, "message": exc.message, "line": exc.line}], rejected=True)

    def _publish(self, job: Job, final: JobState,
                 errors: list[dict[str, Any]] | None = None, rejected: bool = False
                 ) -> Outcome:
        record = publish.finish(job, final, self.settings.routing.models_dir, errors, rejected)
        return Outcome(final, record)
