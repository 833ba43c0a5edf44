"""Run one claimed job from ``work/`` to its final status line.

validating → loading the engine → generating (streamed, checkpointed) →
finalizing. Every step can be cut short by a crash and redone from the
checkpoint: answered lines are never asked again and never written twice.
"""

from __future__ import annotations

import json
import os
from functools import partial
import threading
import time
from typing import Any, Callable, Iterator

import structlog
import tomli_w

from . import bench
from .checkpoint import Checkpoint
from .config import Settings
from .engine import EngineDead, EnginePool
from .job import Job
from .lines import (Dedup, LineError, NotRegularFile, Request, iter_file_at, open_regular,
                    read_line_at)
from .order import PrefixOrder
from .outbox import (JobState, dumps_line, error_line, read_status, result_line,
                     sync_dir, utc_now, write_atomic)
from .profiles import ProfileSet
from .router import JobRejected, ModelVote, Sidecar, read_sidecar, route

log = structlog.get_logger()

# How often a running job looks for inbox/JOB.cancel: not a stat per engine step.
CANCEL_CHECK_SECONDS = 0.5


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

    # -- the job, start to end -----------------------------------------------

    def run(self, name: str, note: str = "", waited: float = 0.0) -> JobState | None:
        """Run a job to a final state; None when a stop interrupted it (it resumes later).

        NOTE says why it was claimed; WAITED is how long it sat in the inbox."""
        job = Job(name, self.settings, waited=waited)
        history = read_status(job.status.path)
        if history and JobState(history[-1]["state"]).final:
            return self._cleanup(job, JobState(history[-1]["state"]))  # crashed after publishing
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
            queued_s = job.waited + time.monotonic() - job.started
            try:
                sidecar, votes = self._validate(job, ckpt)
                job.profile, reason = route(name, sidecar, votes, self.profiles,
                                            self.settings.routing.default_profile)
            except JobRejected as exc:
                return self._reject(job, ckpt, exc)
            bound = bound.bind(profile=job.profile.name)
            bound.info("job_routed", reason=reason, total=job.total)
            self._write_job_toml(job, sidecar, reason)
            if self.cancel_requested(name):
                return self._finish_cancelled(job, ckpt, queued_s, 0.0, 0.0, None)
            return self._generate(job, ckpt, sidecar, queued_s, bound)
        finally:
            ckpt.close()

    def _classified(self, job: Job) -> Iterator[Request | LineError]:
        for _offset, item in self._classified_at(job):
            yield item

    def _classified_at(self, job: Job) -> Iterator[tuple[int, Request | LineError]]:
        dedup = Dedup()
        for offset, item in iter_file_at(job.input, self.settings.limits.max_line_bytes):
            yield offset, dedup.check(item)

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
        votes = ModelVote()
        order = PrefixOrder() if (sidecar.order or self.settings.engine.order) == "prefix" \
            else None
        for offset, item in self._classified_at(job):
            job.total += 1
            if job.total > limits.max_requests:
                raise JobRejected("too_many_requests",
                                  f"more than {limits.max_requests} requests", item.line)
            if isinstance(item, LineError):
                ckpt.add(item.line, "error", error_line(item))
            else:
                votes.add(item.model, item.line)
                if order is not None and item.line not in ckpt.done:
                    order.add(item, offset)
            if job.total % 8192 == 0 and \
                    time.monotonic() - job.status.written_at >= self.settings.status.interval:
                job.status.write(JobState.VALIDATING, phase="validating",
                                 message=f"{job.total} lines read",
                                 **self._progress(job, ckpt, 0, 0.0))
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

    def _write_job_toml(self, job: Job, sidecar: Sidecar, reason: str) -> None:
        assert job.profile is not None
        doc = {"job": job.name, "input": str(job.input), "profile": job.profile.name,
               "model": job.profile.model, "routed_by": reason, "priority": sidecar.priority,
               "requests": job.total, "order": job.order_name,
               "engine": job.profile.engine_args(self.settings.routing.models_dir),
               "sampling": {**job.profile.sampling, **sidecar.sampling},
               "chat": job.profile.chat.model_dump(exclude_none=True),
               "media": job.profile.media.model_dump()}
        write_atomic(job.out("job.toml"), [tomli_w.dumps(doc).encode()])

    # -- generation ------------------------------------------------------------

    def _generate(self, job: Job, ckpt: Checkpoint, sidecar: Sidecar, queued_s: float,
                  bound: Any) -> JobState | None:
        assert job.profile is not None
        sampling = {**job.profile.sampling, **sidecar.sampling}
        deaths = 0
        load_s = 0.0
        gen_s = 0.0
        first_result: float | None = None
        while True:
            job.status.write(JobState.IN_PROGRESS, phase="loading_model",
                             **self._progress(job, ckpt, 0, 0.0))
            try:
                engine, spent = self.pool.get(job.profile)
            except Exception as exc:  # noqa: BLE001 - a model that cannot load fails its job
                bound.error("engine_load_failed", error=str(exc))
                return self._fail_rest(job, ckpt, queued_s, load_s, gen_s, first_result,
                                       "engine_error", f"model failed to load: {exc}")
            load_s += spent
            started = time.monotonic()
            done_before = ckpt.tally.completed + ckpt.tally.failed
            job.status.write(JobState.IN_PROGRESS, phase="generating",
                             **self._progress(job, ckpt, 0, 0.0))
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
                            if first_result is None:
                                first_result = time.monotonic() - job.started
                    ckpt.tick()
                    if time.monotonic() - job.status.written_at >= self.settings.status.interval:
                        done_now = ckpt.tally.completed + ckpt.tally.failed - done_before
                        record = job.status.write(
                            JobState.IN_PROGRESS, phase="generating",
                            **self._progress(job, ckpt, done_now, time.monotonic() - started))
                        self.heartbeat(record)
                    if time.monotonic() >= cancel_check:
                        if self.cancel_requested(job.name):
                            outcome = "cancel"
                            break
                        cancel_check = time.monotonic() + CANCEL_CHECK_SECONDS
                    if self.stop.is_set():
                        outcome = "stop"
                        break
            except EngineDead as exc:
                deaths += 1
                gen_s += time.monotonic() - started
                bound.error("engine_died", error=str(exc), deaths=deaths)
                self.pool.discard()  # its process is gone; never reuse it
                if self.stop.is_set():
                    self._interrupted(job, ckpt, bound)  # no new engine while stopping
                    return None
                if deaths >= self.settings.engine.max_engine_failures:
                    return self._fail_rest(job, ckpt, queued_s, load_s, gen_s, first_result,
                                           "engine_error", f"the engine died {deaths} times "
                                           f"running this job: {exc}")
                continue
            finally:
                stream.close()  # aborts whatever is still in flight
            gen_s += time.monotonic() - started
            if outcome == "stop":
                self._interrupted(job, ckpt, bound)
                return None
            if outcome == "cancel":
                return self._finish_cancelled(job, ckpt, queued_s, load_s, gen_s, first_result)
            return self._publish(job, ckpt, JobState.COMPLETED, queued_s, load_s, gen_s,
                                 first_result)

    def _interrupted(self, job: Job, ckpt: Checkpoint, bound: Any) -> None:
        ckpt.sync()
        job.status.write(JobState.QUEUED, phase="interrupted",
                         message="daemon stopping; the job resumes at the next start",
                         **self._progress(job, ckpt, 0, 0.0))
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

    def _progress(self, job: Job, ckpt: Checkpoint, done_now: int, seconds: float
                  ) -> dict[str, Any]:
        tally = ckpt.tally
        rate = done_now / seconds if seconds > 0 else 0.0
        remaining = job.total - tally.completed - tally.failed
        return {
            "profile": job.profile.name if job.profile else None,
            "model": job.profile.model if job.profile else None,
            "request_counts": {"total": job.total, "completed": tally.completed,
                               "failed": tally.failed},
            "tokens": {"prompt": tally.prompt_tokens, "completion": tally.completion_tokens,
                       "cached": tally.cached_tokens},
            "order": job.order_name,
            "throughput": {"requests_per_s": round(rate, 3),
                           "output_tokens_per_s": round(
                               tally.completion_tokens / seconds if seconds > 0 else 0.0, 3)},
            "eta_s": round(remaining / rate, 1) if rate > 0 else None,
        }

    # -- endings ---------------------------------------------------------------

    def _fill(self, job: Job, ckpt: Checkpoint, code: str, message: str, status: int) -> None:
        """Give every line not yet answered an error line with CODE."""
        kind = "invalid_request_error" if status < 500 else "server_error"
        for item in self._classified(job):
            if item.line not in ckpt.done:
                ckpt.add(item.line, "error", error_line(LineError(
                    item.line, item.custom_id, code, message, None, status, kind)))

    def _finish_cancelled(self, job: Job, ckpt: Checkpoint, queued_s: float, load_s: float,
                          gen_s: float, first_result: float | None) -> JobState:
        self._fill(job, ckpt, "cancelled", "the job was cancelled before this line ran", 400)
        try:
            os.unlink(self.settings.inbox / f"{job.name}.cancel")
        except FileNotFoundError:
            pass
        log.info("job_cancelled", job=job.name)
        return self._publish(job, ckpt, JobState.CANCELLED, queued_s, load_s, gen_s,
                             first_result)

    def _fail_rest(self, job: Job, ckpt: Checkpoint, queued_s: float, load_s: float,
                   gen_s: float, first_result: float | None, code: str, message: str
                   ) -> JobState:
        self._fill(job, ckpt, code, message, 500)
        return self._publish(job, ckpt, JobState.FAILED, queued_s, load_s, gen_s, first_result,
                             errors=[{"code": code, "message": message, "line": None}])

    def _reject(self, job: Job, ckpt: Checkpoint, exc: JobRejected) -> JobState:
        log.warning("job_rejected", job=job.name, code=exc.code, reason=exc.message)
        if exc.code not in ("file_too_large", "not_a_regular_file"):
            self._fill(job, ckpt, exc.code, exc.message, 400)
        return self._publish(job, ckpt, JobState.FAILED, 0.0, 0.0, 0.0, None,
                             errors=[{"code": exc.code, "message": exc.message,
                                      "line": exc.line}], rejected=True)

    def _publish(self, job: Job, ckpt: Checkpoint, final: JobState, queued_s: float,
                 load_s: float, gen_s: float, first_result: float | None,
                 errors: list[dict[str, Any]] | None = None, rejected: bool = False
                 ) -> JobState:
        """Results, errors and bench in place, then the final status line, then the input."""
        job.status.write(JobState.FINALIZING, phase="publishing",
                         **self._progress(job, ckpt, 0, 0.0))
        outbox = self.settings.outbox
        tmp = {kind: outbox / f".{job.name}.{kind}s.jsonl.tmp" for kind in ("result", "error")}
        streams = {kind: open(path, "wb") for kind, path in tmp.items()}
        try:
            for _line, kind, out in ckpt.ordered():
                streams[kind].write(dumps_line(out))
            for stream in streams.values():
                stream.flush()
                os.fsync(stream.fileno())
        finally:
            for stream in streams.values():
                stream.close()
        for kind, path in tmp.items():
            os.replace(path, job.out(f"{kind}s.jsonl"))
        tally = ckpt.tally
        profile = job.profile
        record = bench.record(
            job=job.name, profile=profile.name if profile else None,
            model=profile.model if profile else None,
            engine_args=profile.engine_args(self.settings.routing.models_dir) if profile else {},
            total=job.total, succeeded=tally.completed, failed=tally.failed,
            prompt_tokens=tally.prompt_tokens, completion_tokens=tally.completion_tokens,
            queued_s=queued_s, model_load_s=load_s, generation_s=gen_s,
            total_s=job.waited + time.monotonic() - job.started, first_result_s=first_result,
            started_at=job.started_at, finished_at=utc_now(), state=final.value,
            resumed=ckpt.resumed_lines > 0, order=job.order_name,
            cached_tokens=tally.cached_tokens)
        write_atomic(job.out("bench.json"), [json.dumps(record, indent=2).encode() + b"\n"])
        sync_dir(outbox)
        fields = self._progress(job, ckpt, 0, 0.0)
        fields["throughput"] = {k: record["throughput"][k]
                                for k in ("requests_per_s", "output_tokens_per_s")}
        fields["eta_s"] = 0.0
        if errors:
            fields["errors"] = errors
        message = errors[0]["message"] if errors else ""
        if not rejected:
            self._place_input(job)
            sync_dir(outbox)
        job.status.write(final, phase="done", message=message, **fields)
        log.info("job_finished", job=job.name, state=final.value, total=job.total,
                 succeeded=tally.completed, failed=tally.failed,
                 profile=profile.name if profile else None)
        return self._cleanup(job, final, rejected)

    def _place_input(self, job: Job) -> None:
        """Put the input in the outbox before the final status line, so a reader
        who sees that line finds everything. A hard link keeps work/JOB.jsonl in
        place until the line is written (a crash in between just publishes again);
        filesystems without links get a copy."""
        target = job.out("input.jsonl")
        if target.exists() or not job.input.exists():
            return
        try:
            os.link(job.input, target, follow_symlinks=False)
        except OSError:
            with open_regular(job.input) as source:
                write_atomic(target, iter(partial(source.read, 1 << 20), b""))

    def _cleanup(self, job: Job, final: JobState, rejected: bool | None = None) -> JobState:
        """After the final status line: the input leaves work/, the checkpoint goes."""
        if rejected is None:  # recovering after a crash: the status says how it ended
            last = read_status(job.status.path)[-1]
            rejected = final == JobState.FAILED and last.get("profile") is None
        if rejected:
            if job.input.exists() or job.input.is_symlink():
                os.replace(job.input, self.settings.failed / f"{job.name}.jsonl")
        else:
            self._place_input(job)
            job.input.unlink(missing_ok=True)
        for path in (job.checkpoint, self.settings.work / f"{job.name}.toml"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        sync_dir(self.settings.work)
        return final
