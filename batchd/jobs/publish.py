"""Publishing a finished job into outbox/, in the order a reader can trust.

Results and errors (read back from the checkpoint in input order, under temp
names, fsynced, renamed), then the bench record, then the input, then the final
status line (``finish``), and only then is work/ cleaned. A reader who
sees the final line finds every other file in place; a crash at any point
publishes again or only cleans up at the next start.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import tomli_w

from .. import bench
from ..config import Settings
from ..clock import utc_now
from ..layout import (BENCH, ERRORS, INPUT, JOB_TOML, PUBLISHED_INPUT, RESULTS, Ending,
                      JobState, Phase)
from ..jsonl import open_regular
from ..lines import LineError
from ..spool import events, inbox, media
from ..spool.outbox import (StatusFile, atomic_files, error_line, read_status, sync_dir,
                            write_atomic)
from . import retry
from .job import Job
from .router import JobRejected, Sidecar
from .validate import classified

log = structlog.get_logger()


@dataclass(frozen=True)
class Outcome:
    """How a job ended: its final state and its bench record (None when a
    restart only finished the cleanup of a job published before a crash)."""

    state: JobState
    bench: dict[str, Any] | None


def end(job: Job, ending: Ending) -> Outcome:
    """Publish JOB as ENDING says: every line not answered yet gets the ending's
    error line (``cancelled``, ``batch_expired``, or a failure's code), then
    ``finish``."""
    if ending.state == JobState.CANCELLED:
        _fill(job, "cancelled", "the job was cancelled before this line ran", 400)
        job.layout.cancel(job.name).unlink(missing_ok=True)
        job.log.info("job_cancelled")
    elif ending.state == JobState.EXPIRED:  # OpenAI's expiry: answered lines stay
        _fill(job, "batch_expired", "this request could not be executed before "
              "the completion window expired", 400)
        job.log.info("job_expired")
    errors = None
    if ending.state == JobState.FAILED:
        assert ending.code is not None  # a failure says which
        _fill(job, ending.code, ending.message, 500)
        errors = [{"code": ending.code, "message": ending.message, "line": None}]
    record = finish(job, ending.state, job.settings.routing.models_dir, errors)
    job.layout.cancel(job.name).unlink(missing_ok=True)
    return Outcome(ending.state, record)


def reject(job: Job, exc: JobRejected) -> Outcome:
    """A job refused as a whole (validation, routing): every line gets its error."""
    job.log.warning("job_rejected", code=exc.code, reason=exc.message)
    if exc.code not in ("file_too_large", "not_a_regular_file"):
        _fill(job, exc.code, exc.message, 400)
    record = finish(job, JobState.FAILED, job.settings.routing.models_dir, [
        {"code": exc.code, "message": exc.message, "line": exc.line}], rejected=True)
    return Outcome(JobState.FAILED, record)


def _fill(job: Job, code: str, message: str, status: int) -> None:
    """Give every line not yet answered an error line with CODE."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    for _offset, item in classified(job.input, job.settings.limits.max_line_bytes):
        if item.line not in job.ckpt.done:
            job.record(item.line, "error", error_line(LineError(
                item.line, item.custom_id, code, message, None, status, kind)))


def interrupted(job: Job) -> None:
    """The daemon stops: the job keeps its checkpoint and resumes at the next start."""
    job.ckpt.sync()
    job.status.write(JobState.QUEUED, phase=Phase.INTERRUPTED,
                     message="daemon stopping; the job resumes at the next start",
                     **job.progress())
    job.log.info("job_interrupted", answered=job.answered)


def job_toml(job: Job, sidecar: Sidecar, reason: str, models_dir: Path) -> None:
    """JOB.job.toml: what the job runs with, written once it is routed."""
    assert job.profile is not None
    # where the input is once the job has ended (outbox/JOB.input.jsonl), not
    # work/JOB.jsonl, which is gone by then
    doc = {"job": job.name, "input": str(job.out(PUBLISHED_INPUT)),
           "profile": job.profile.name, "model": job.profile.model, "routed_by": reason,
           "priority": sidecar.priority,
           "requests": job.total, "order": job.order_name,
           "engine": job.profile.engine_args(models_dir),
           "sampling": job.sampling,
           "chat": job.profile.chat.model_dump(exclude_none=True),
           "media": job.profile.media.model_dump()}
    if job.deadline is not None:
        doc["expires_at"] = job.deadline
    if job.routes is not None and len(job.routes.stages) > 1:
        doc["parts"] = [p.name for p in job.routes.stages]  # lines run on each (per line)
    write_atomic(job.out(JOB_TOML), [tomli_w.dumps(doc).encode()])


def finish(job: Job, final: JobState, models_dir: Path,
           errors: list[dict[str, Any]] | None = None, rejected: bool = False
           ) -> dict[str, Any]:
    """Results, errors and bench in place, then the input, then the final status
    line, then the cleanup of work/ (the module docstring says why this order).
    Returns the bench record."""
    job.status.write(JobState.FINALIZING, phase=Phase.PUBLISHING, **job.progress())
    record = outputs(job, final, models_dir)
    fields = job.progress()
    fields["throughput"] = {k: record["throughput"][k]
                            for k in ("requests_per_s", "output_tokens_per_s")}
    fields["eta_s"] = 0.0
    if errors:
        fields["errors"] = errors
    if job.retry_of and not rejected:
        problem = retry.publish_merged(job.settings, job.name, job.retry_of, job.retry_codes,
                                       job.input)
        if problem:
            job.log.warning("merged_not_written", retry_of=job.retry_of, error=problem)
        fields["merged_file" if problem is None else "merged_error"] = \
            problem or job.out(retry.MERGED).name
    if not rejected:
        place_input(job)
    media.publish(job.layout, job.name, job.settings.media.keep)
    if not rejected:
        sync_dir(job.layout.outbox)
    # before the final line: a daemon killed right after it still signals the end
    events.record(job.settings, job.name, final, {"total": job.total,
                  "completed": job.ckpt.tally.completed, "failed": job.ckpt.tally.failed})
    job.status.write(final, phase=Phase.DONE, message=errors[0]["message"] if errors else "",
                     **fields)
    job.log.info("job_finished", state=final.value, total=job.total,
                 succeeded=job.ckpt.tally.completed, failed=job.ckpt.tally.failed)
    cleanup(job, final, rejected)
    return record


def outputs(job: Job, final: JobState, models_dir: Path) -> dict[str, Any]:
    """JOB.results.jsonl, JOB.errors.jsonl and JOB.bench.json; returns the record."""
    with atomic_files(job.out(RESULTS), job.out(ERRORS)) as (results, errors):
        # an Anthropic line's failures go with its results, as Anthropic's do
        streams = {"result": results, "error": errors, "errored": results}
        for _line, kind, out in job.ckpt.ordered():  # already as dumps_line writes it
            streams[kind].write(out)
    tally = job.ckpt.tally
    profile = job.routes.stages[0] if job.routes else job.profile  # the first named
    record = bench.record(
        job=job.name, profile=profile.name if profile else None,
        model=profile.model if profile else None,
        engine_args=profile.engine_args(models_dir) if profile else {},
        total=job.total, succeeded=tally.completed, failed=tally.failed,
        prompt_tokens=tally.prompt_tokens, completion_tokens=tally.completion_tokens,
        queued_s=job.queued_s, model_load_s=job.load_s, generation_s=job.gen_s,
        total_s=job.waited + time.monotonic() - job.started,
        first_result_s=job.first_result_s,
        started_at=job.started_at, finished_at=utc_now(), state=final.value,
        resumed=job.ckpt.resumed_lines > 0,
        order=job.order_name, images=job.images,
        cached_tokens=tally.cached_tokens, concurrency=job.concurrency(),
        parts=[p.name for p in job.routes.stages] if job.routes else None,
        cache=job.cache_counts(), by_model=tally.by_model,
        replicas=list(job.replicas.values()))
    write_atomic(job.out(BENCH), [json.dumps(record, indent=2).encode() + b"\n"])
    return record


def place_input(job: Job) -> None:
    """Put the input in the outbox before the final status line, so a reader
    who sees that line finds everything. A hard link keeps work/JOB.jsonl in
    place until the line is written (a crash in between just publishes again);
    filesystems without links, and files another user dropped (whose mode we
    may not change), get a copy. Either way its mode is the outbox files'."""
    target = job.out(PUBLISHED_INPUT)
    if target.exists() or not job.input.exists():
        return
    try:
        os.link(job.input, target, follow_symlinks=False)
        # the dropper's mode (often world-readable) made like the other outbox files'
        os.chmod(target, 0o666 & ~job.settings.spool.umask)
        return
    except PermissionError:
        target.unlink(missing_ok=True)  # another user's file: a copy of our own instead
    except OSError:
        pass
    with open_regular(job.input) as source:
        write_atomic(target, iter(partial(source.read, 1 << 20), b""))


def cleanup(job: Job, final: JobState, rejected: bool | None = None) -> JobState:
    """After the final status line: the input leaves work/, the checkpoint goes."""
    layout = job.layout
    if rejected is None:  # recovering after a crash: the status says how it ended
        last = read_status(job.status.path)[-1]
        rejected = final == JobState.FAILED and last.get("profile") is None
    if rejected:
        if job.input.exists() or job.input.is_symlink():
            os.replace(job.input, layout.failed / f"{job.name}{INPUT}")
    else:
        place_input(job)
        job.input.unlink(missing_ok=True)
    media.publish(layout, job.name, job.settings.media.keep)
    for path in (job.checkpoint, layout.sidecar(job.name)):
        path.unlink(missing_ok=True)
    sync_dir(layout.work)
    return final


def stalled(settings: Settings, name: str, exc: OSError) -> None:
    """Disk full, a read-only or vanished outbox: the job stays in work/ with
    its checkpoint and is tried again later; say so if the outbox allows."""
    try:
        StatusFile(settings.layout.status(name), name).write(
            JobState.QUEUED, phase=Phase.STALLED, message=f"stalled: {exc}; kept in "
            "work/ with its checkpoint, retried automatically")
    except OSError:
        pass  # the outbox itself is what fails; the log says why


def reject_entry(settings: Settings, name: str, why: str) -> bool:
    """A symlink, FIFO, socket, device, folder or hard link named *.jsonl in
    the inbox: never opened, never followed; moved to failed/ with a failed
    status. False when it could not be moved (it is then left in the inbox)."""
    moved = inbox.move_to_failed(settings, name)
    job = inbox.reserve_name(settings, inbox.safe_stem(name))
    message = f"{name!r} {why}" + ("" if moved else "; left in inbox")
    events.record(settings, job, JobState.FAILED, {"total": 0, "completed": 0, "failed": 0})
    StatusFile(settings.layout.status(job), job).write(
        JobState.FAILED, phase=Phase.DONE, message=message,
        errors=[{"code": "not_a_regular_file", "message": message, "line": None}])
    log.warning("job_rejected", job=job, code="not_a_regular_file", file=name)
    return moved is not None
