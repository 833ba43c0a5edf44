"""One claimed job from ``work/`` to its final status line.

validating (``prepare``) → loading the engine and generating, beside other
jobs (batchd/jobs/session.py) → finalizing (``end``). Every step can be cut
short by a crash and redone from the checkpoint: answered lines are never
asked again and never written twice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from ..config import Settings
from ..engine import EnginePool
from ..layout import JobState
from ..lines import LineError, Request, open_regular, read_line_at
from ..profiles import ProfileSet
from ..spool import cache
from ..spool.outbox import error_line, read_status, result_line
from . import publish
from .job import Job
from .router import JobRejected, route, routes
from .validate import classified, validate_job


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
    """Takes a claimed job to its first request (``prepare``) and from its last
    answer to the outbox (``end``); a session (batchd/jobs/session.py) runs it
    in between, beside others on the same engine. ``stop`` is set by SIGTERM."""

    def __init__(self, settings: Settings, pool: EnginePool,
                 stop: threading.Event | None = None,
                 heartbeat: Callable[[dict[str, Any]], None] = lambda progress: None):
        self.settings = settings
        self.pool = pool
        self.stop = stop or threading.Event()
        self.heartbeat = heartbeat  # called after every engine step with the progress
        config = settings.cache
        self.cache = cache.ResultCache(config.folder or settings.layout.cache,
                                       int(config.size_limit)) if config.enabled else None

    def cancel_requested(self, job: str) -> bool:
        return self.settings.layout.cancel(job).exists()

    @staticmethod
    def expired(job: Job) -> bool:
        return job.deadline is not None and datetime.now(timezone.utc) >= job.deadline

    # -- the job, up to its first request ----------------------------------------

    def prepare(self, name: str, profiles: ProfileSet, note: str = "", waited: float = 0.0
                ) -> Job | Outcome:
        """Open a claimed job, validate and route it: the Job, ready for a session
        (batchd/jobs/session.py), or how it ended when it cannot run (rejected,
        cancelled or expired before it ran, or already published before a crash).

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
        ready = False
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
            job.routes = routes(reason, votes, profiles)
            job.parts = list(job.routes.parts) if job.routes else [job.profile]
            job.log = job.log.bind(profile=job.profile.name)
            job.log.info("job_routed", reason=reason, total=job.total,
                         parts=[p.name for p in job.parts])
            job.deadline = sidecar.deadline(claimed_at)
            job.sidecar_sampling = sidecar.sampling
            job.priority = sidecar.priority
            job.cache = self.cache if sidecar.cache else None
            job.retry_of, job.retry_codes = sidecar.retry_of, sidecar.retry_codes
            publish.job_toml(job, sidecar, reason, self.settings.routing.models_dir)
            if self.cancel_requested(name):
                return self.end(job, "cancelled")
            if self.expired(job):
                return self.end(job, "expired")
            ready = True
            return job
        finally:
            if not ready:
                job.ckpt.close()

    def _classified(self, job: Job) -> Iterator[Request | LineError]:
        for _offset, item in classified(job.input, self.settings.limits.max_line_bytes):
            yield item

    def interrupted(self, job: Job) -> None:
        job.ckpt.sync()
        job.status.write(JobState.QUEUED, phase="interrupted",
                         message="daemon stopping; the job resumes at the next start",
                         **job.progress())
        job.log.info("job_interrupted", answered=job.answered)

    def runnable(self, job: Job) -> Iterator[Request]:
        """The valid, unanswered requests of the job's current profile; one over
        the profile's limits, or naming a model no profile knows, gets its error
        line here and never reaches the engine."""
        assert job.profile is not None
        sampling = job.sampling
        # what answers depend on besides the request, read once per pass over the
        # job: a profile reloaded (SIGHUP) or a model rebuilt since is another key
        identity = cache.identity(job.profile, self.settings.routing.models_dir) \
            if job.cache is not None else ""
        for item in self._pending(job):
            target = job.profile_of(item)
            if target is None:
                job.record(item.line, "error", error_line(LineError(
                    item.line, item.custom_id, "model_not_found",
                    f"The model `{item.model}` does not exist: no profile serves it "
                    f"(known profiles: {', '.join(p.name for p in job.parts)} and the "
                    "others in `batchd profiles list`)", "model", 404)))
                continue
            if target != job.profile.name:
                continue  # another part's line: it runs when that profile is loaded
            over = job.profile.limits.violation({**sampling, **item.body}) \
                or job.profile.media.violation(item.body)
            if over:
                job.record(item.line, "error", error_line(LineError(
                    item.line, item.custom_id, "invalid_request", over[1], over[0])))
                continue
            if job.cache is not None and self._cached(job, item, sampling, identity):
                continue
            yield item

    def _cached(self, job: Job, item: Request, sampling: dict[str, Any], identity: str
                ) -> bool:
        """Answer ITEM from the result cache when it holds its answer (True); a
        cacheable miss is noted so its answer is stored when it comes."""
        assert job.cache is not None and job.profile is not None
        request = {**sampling, **item.body}
        if not cache.cacheable(item.url, request):
            return False
        key = cache.key(identity, item.url, request)
        body = job.cache.get(key)
        if body is not None:
            job.record(item.line, "result", result_line(item, cache.fresh(body)))
            job.cache_hits += 1
            return True
        if item.line not in job.cache_pending:
            job.cache_misses += 1
        job.cache_pending[item.line] = key
        return False

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

    def end(self, job: Job, how: str) -> Outcome:
        """Publish JOB as HOW says: "completed", "cancelled", "expired", or
        "CODE:message" for a failure that gives every unanswered line CODE."""
        if how == "completed":
            return self._publish(job, JobState.COMPLETED)
        if how == "cancelled":
            return self._finish_cancelled(job)
        if how == "expired":
            return self._finish_expired(job)
        code, _, message = how.partition(":")
        return self._fail_rest(job, code, message)

    def _fill(self, job: Job, code: str, message: str, status: int) -> None:
        """Give every line not yet answered an error line with CODE."""
        kind = "invalid_request_error" if status < 500 else "server_error"
        for item in self._classified(job):
            if item.line not in job.ckpt.done:
                job.record(item.line, "error", error_line(LineError(
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
