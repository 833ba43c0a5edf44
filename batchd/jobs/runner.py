"""Run one claimed job from ``work/`` to its final status line.

validating → loading the engine → generating (streamed, checkpointed) →
finalizing. Every step can be cut short by a crash and redone from the
checkpoint: answered lines are never asked again and never written twice.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import structlog

from . import publish
from ..spool.checkpoint import Checkpoint
from ..config import Settings
from ..engine import EngineDead, EnginePool
from .job import Job
from ..lines import LineError, NotRegularFile, Request, open_regular, read_line_at
from .order import PrefixOrder
from ..spool.outbox import (JobState, error_line, read_status, result_line,
                     sync_dir)
from ..profiles import ProfileSet
from .router import JobRejected, ModelVote, Sidecar, read_sidecar, route
from .validate import classified, validate

log = structlog.get_logger()

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

    def __init__(self, settings: Settings, profiles: ProfileSet, pool: EnginePool,
                 stop: threading.Event | None = None,
                 heartbeat: Callable[[dict[str, Any]], None] = lambda progress: None):
        self.settings = settings
        self.profiles = profiles
        self.pool = pool
        self.stop = stop or threading.Event()
        self.heartbeat = heartbeat  # called after every engine step with the progress

    def cancel_requested(self, job: str) -> bool:
        return (self.settings.inbox / f"{job}.cancel").exists()

    @staticmethod
    def expired(job: Job) -> bool:
        return job.deadline is not None and datetime.now(timezone.utc) >= job.deadline

    # -- the job, start to end -----------------------------------------------

    def run(self, name: str, note: str = "", waited: float = 0.0) -> Outcome | None:
        """Run a job to a final state and say how it ended; None when a stop
        interrupted it (it resumes later).

        NOTE says why it was claimed; WAITED is how long it sat in the inbox."""
        job = Job(name, self.settings, waited=waited)
        history = read_status(job.status.path)
        claimed_at = _when(history[0].get("ts") if history else None) or \
            _when(job.started_at) or datetime.now(timezone.utc)
        if history and JobState(history[-1]["state"]).final:
            # a crash came after publishing: only the cleanup is left
            return Outcome(publish.cleanup(self.settings, job, JobState(history[-1]["state"])),
                           None)
        if history:
            job.status.state = JobState(history[-1]["state"])
            if job.status.state != JobState.QUEUED:
                job.status.write(JobState.QUEUED, message="resuming after a restart")
        bound = log.bind(job=name)
        ckpt = Checkpoint(job.checkpoint, self.settings.engine.checkpoint_every,
                          self.settings.engine.checkpoint_seconds)
        try:
            if job.status.state is None:
                job.status.write(JobState.QUEUED, message=note or "claimed")
            resumed = ckpt.resumed_lines
            message = f"resumed from checkpoint: {resumed} lines already answered" \
                if resumed else ""
            if resumed:
                bound.info("job_resumed", lines=resumed)
            job.status.write(JobState.VALIDATING, phase="validating", message=message)
            job.queued_s = job.waited + time.monotonic() - job.started
            try:
                sidecar, votes = self._validate(job, ckpt)
                job.profile, reason = route(name, sidecar, votes, self.profiles,
                                            self.settings.routing.default_profile)
            except JobRejected as exc:
                return self._reject(job, ckpt, exc)
            bound = bound.bind(profile=job.profile.name)
            bound.info("job_routed", reason=reason, total=job.total)
            job.deadline = sidecar.deadline(claimed_at)
            publish.job_toml(job, sidecar, reason, self.settings.routing.models_dir)
            if self.cancel_requested(name):
                return self._finish_cancelled(job, ckpt)
            if self.expired(job):
                return self._finish_expired(job, ckpt)
            return self._generate(job, ckpt, sidecar, bound)
        finally:
            ckpt.close()

    def _classified(self, job: Job) -> Iterator[Request | LineError]:
        for _offset, item in classified(job.input, self.settings.limits.max_line_bytes):
            yield item

    def _validate(self, job: Job, ckpt: Checkpoint) -> tuple[Sidecar, ModelVote]:
        limits = self.settings.limits
        try:
            with open_regular(job.input) as stream:
                st = os.fstat(stream.fileno())
        except NotRegularFile as exc:
            raise JobRejected("not_a_regular_file", f"{job.input.name} {exc.strerror}") from None
        if st.st_nlink > 1 and not self._published(job, st):
            raise JobRejected("not_a_regular_file",
                              f"{job.input.name} is a hard link ({st.st_nlink} names)")
        size = st.st_size
        if size > limits.max_file_bytes:
            raise JobRejected("file_too_large",
                              f"{size} bytes is over the limit of {limits.max_file_bytes}")
        sidecar = read_sidecar(job.sidecar)
        order = PrefixOrder() if (sidecar.order or self.settings.engine.order) == "prefix" \
            else None

        def on_request(item: Request, offset: int) -> None:
            if order is not None and item.line not in ckpt.done:
                order.add(item, offset)

        def every_8192(lines: int) -> None:
            job.total = lines
            if time.monotonic() - job.status.written_at >= self.settings.status.interval:
                job.status.write(JobState.VALIDATING, phase="validating",
                                 message=f"{lines} lines read",
                                 **job.progress(ckpt.tally, 0, 0.0))

        job.total, votes = validate(
            job.input, limits, lambda item: ckpt.add(item.line, "error", error_line(item)),
            on_request, every_8192)
        job.order = order if order is not None and not order.overflow else None
        return sidecar, votes

    def _published(self, job: Job, st: os.stat_result) -> bool:
        """Whether the input's second name is its own outbox copy (a crash came
        between publishing the input and the final status line)."""
        try:
            out = os.stat(job.out("input.jsonl"), follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (out.st_dev, out.st_ino) == (st.st_dev, st.st_ino) and st.st_nlink == 2

    # -- generation ------------------------------------------------------------

    def _generate(self, job: Job, ckpt: Checkpoint, sidecar: Sidecar, bound: Any
                  ) -> Outcome | None:
        assert job.profile is not None
        sampling = {**job.profile.sampling, **sidecar.sampling}
        deaths = 0
        while True:
            job.status.write(JobState.IN_PROGRESS, phase="loading_model",
                             **job.progress(ckpt.tally, 0, 0.0))
            try:
                engine, spent = self.pool.get(job.profile)
            except Exception as exc:  # noqa: BLE001 - a model that cannot load fails its job
                bound.error("engine_load_failed", error=str(exc))
                return self._fail_rest(job, ckpt, "engine_error",
                                       f"model failed to load: {exc}")
            job.load_s += spent
            started = time.monotonic()
            done_before = ckpt.tally.completed + ckpt.tally.failed
            job.status.write(JobState.IN_PROGRESS, phase="generating",
                             **job.progress(ckpt.tally, 0, 0.0))
            todo = self._runnable(job, ckpt, sampling)
            stream = engine.stream(todo, sampling, self.settings.engine.window)
            outcome = None
            cancel_check = 0.0
            try:
                for answers in stream:
                    for answer in answers:
                        if answer.error is not None:
                            ckpt.add(answer.request.line, "error", error_line(answer.error))
                        else:
                            assert answer.body is not None  # an answer is one or the other
                            ckpt.add(answer.request.line, "result",
                                     result_line(answer.request, answer.body))
                            if job.first_result_s is None:
                                job.first_result_s = time.monotonic() - job.started
                    ckpt.tick()
                    if time.monotonic() - job.status.written_at >= self.settings.status.interval:
                        done_now = ckpt.tally.completed + ckpt.tally.failed - done_before
                        record = job.status.write(
                            JobState.IN_PROGRESS, phase="generating",
                            **job.progress(ckpt.tally, done_now, time.monotonic() - started))
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
                bound.error("engine_died", error=str(exc), deaths=deaths)
                self.pool.discard()  # its process is gone; never reuse it
                if self.stop.is_set():
                    self._interrupted(job, ckpt, bound)  # no new engine while stopping
                    return None
                if deaths >= self.settings.engine.max_engine_failures:
                    return self._fail_rest(job, ckpt, "engine_error", f"the engine died "
                                           f"{deaths} times running this job: {exc}")
                continue
            finally:
                stream.close()  # aborts whatever is still in flight
            job.gen_s += time.monotonic() - started
            if outcome == "stop":
                self._interrupted(job, ckpt, bound)
                return None
            if outcome == "cancel":
                return self._finish_cancelled(job, ckpt)
            if outcome == "expire":
                return self._finish_expired(job, ckpt)
            return self._publish(job, ckpt, JobState.COMPLETED)

    def _interrupted(self, job: Job, ckpt: Checkpoint, bound: Any) -> None:
        ckpt.sync()
        job.status.write(JobState.QUEUED, phase="interrupted",
                         message="daemon stopping; the job resumes at the next start",
                         **job.progress(ckpt.tally, 0, 0.0))
        bound.info("job_interrupted", answered=ckpt.tally.completed + ckpt.tally.failed)

    def _runnable(self, job: Job, ckpt: Checkpoint, sampling: dict[str, Any]
                  ) -> Iterator[Request]:
        """The valid, unanswered requests; one over the profile's limits gets its
        error line here and never reaches the engine."""
        assert job.profile is not None
        for item in self._pending(job, ckpt):
            over = job.profile.limits.violation({**sampling, **item.body}) \
                or job.profile.media.violation(item.body)
            if over:
                ckpt.add(item.line, "error", error_line(LineError(
                    item.line, item.custom_id, "invalid_request", over[1], over[0])))
                continue
            yield item

    def _pending(self, job: Job, ckpt: Checkpoint) -> Iterator[Request]:
        """The valid, unanswered requests in the job's order (batchd/order.py)."""
        if job.order is None:
            for item in self._classified(job):
                if isinstance(item, Request) and item.line not in ckpt.done:
                    yield item
            return
        max_line = self.settings.limits.max_line_bytes
        with open_regular(job.input) as stream:
            for line, offset in job.order.sequence():
                if line not in ckpt.done:
                    item = read_line_at(stream, offset, line, max_line)
                    assert isinstance(item, Request)  # it was one when the order was made
                    yield item

    # -- endings ---------------------------------------------------------------

    def _fill(self, job: Job, ckpt: Checkpoint, code: str, message: str, status: int) -> None:
        """Give every line not yet answered an error line with CODE."""
        kind = "invalid_request_error" if status < 500 else "server_error"
        for item in self._classified(job):
            if item.line not in ckpt.done:
                ckpt.add(item.line, "error", error_line(LineError(
                    item.line, item.custom_id, code, message, None, status, kind)))

    def _finish_cancelled(self, job: Job, ckpt: Checkpoint) -> Outcome:
        self._fill(job, ckpt, "cancelled", "the job was cancelled before this line ran", 400)
        try:
            os.unlink(self.settings.inbox / f"{job.name}.cancel")
        except FileNotFoundError:
            pass
        log.info("job_cancelled", job=job.name)
        return self._publish(job, ckpt, JobState.CANCELLED)

    def _finish_expired(self, job: Job, ckpt: Checkpoint) -> Outcome:
        """OpenAI's expiry: answered lines stay; the rest get `batch_expired`."""
        self._fill(job, ckpt, "batch_expired", "this request could not be executed before "
                   "the completion window expired", 400)
        log.info("job_expired", job=job.name)
        return self._publish(job, ckpt, JobState.EXPIRED)

    def _fail_rest(self, job: Job, ckpt: Checkpoint, code: str, message: str) -> Outcome:
        self._fill(job, ckpt, code, message, 500)
        return self._publish(job, ckpt, JobState.FAILED,
                             errors=[{"code": code, "message": message, "line": None}])

    def _reject(self, job: Job, ckpt: Checkpoint, exc: JobRejected) -> Outcome:
        log.warning("job_rejected", job=job.name, code=exc.code, reason=exc.message)
        if exc.code not in ("file_too_large", "not_a_regular_file"):
            self._fill(job, ckpt, exc.code, exc.message, 400)
        return self._publish(job, ckpt, JobState.FAILED, errors=[
            {"code": exc.code, "message": exc.message, "line": exc.line}], rejected=True)

    def _publish(self, job: Job, ckpt: Checkpoint, final: JobState,
                 errors: list[dict[str, Any]] | None = None, rejected: bool = False
                 ) -> Outcome:
        """Results, errors and bench in place, then the input, then the final
        status line, then the cleanup of work/ (publish.py says why this order)."""
        job.status.write(JobState.FINALIZING, phase="publishing",
                         **job.progress(ckpt.tally, 0, 0.0))
        record = publish.outputs(job, ckpt, final, self.settings.routing.models_dir)
        fields = job.progress(ckpt.tally, 0, 0.0)
        fields["throughput"] = {k: record["throughput"][k]
                                for k in ("requests_per_s", "output_tokens_per_s")}
        fields["eta_s"] = 0.0
        if errors:
            fields["errors"] = errors
        if not rejected:
            publish.place_input(job)
            sync_dir(self.settings.outbox)
        job.status.write(final, phase="done", message=errors[0]["message"] if errors else "",
                         **fields)
        log.info("job_finished", job=job.name, state=final.value, total=job.total,
                 succeeded=ckpt.tally.completed, failed=ckpt.tally.failed,
                 profile=job.profile.name if job.profile else None)
        return Outcome(publish.cleanup(self.settings, job, final, rejected), record)
