"""A claimed job up to its first request: opened, validated and routed
(``prepare``), then its requests one at a time as a session sends them
(``runnable``). Every step can be cut short by a crash and redone from the
checkpoint: answered lines are never asked again and never written twice.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from ..clock import Wall, parse_iso, wall, wall_datetime
from ..config import Settings
from ..layout import CANCELLED, EXPIRED, Ending, JobState, Phase
from ..jsonl import open_regular
from ..lines import LineError, Request, read_line_at
from ..profiles import ProfileSet
from ..spool import cache
from ..spool.cache import ResultCache
from ..spool.outbox import error_line, read_status, result_line
from . import images, publish
from .job import Job
from .publish import Outcome
from .router import JobRejected, explain, route, routes
from .validate import classified, validate_job

MODELS_SAID = 5  # models named in the routing line of a job's status


def prepare(settings: Settings, name: str, profiles: ProfileSet,
            results: ResultCache | None, note: str = "", waited: float = 0.0,
            now: Wall = wall) -> Job | Outcome:
    """Open a claimed job, validate and route it: the Job, ready for a session
    (batchd/jobs/session.py), or how it ended when it cannot run (rejected,
    cancelled or expired before it ran, or already published before a crash).

    PROFILES are the daemon's (reloaded on SIGHUP); RESULTS the daemon's result
    cache (None when off); NOTE says why it was claimed; WAITED is how long it
    sat in the inbox; NOW the daemon's wall clock (clock.py)."""
    job = Job(name, settings, waited=waited, wall=now)
    history = read_status(job.status.path)
    claimed_at = parse_iso(history[0].get("ts") if history else None) or \
        parse_iso(job.started_at) or wall_datetime(now)
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
        job.status.write(JobState.VALIDATING, phase=Phase.VALIDATING, message=message)
        job.queued_s = job.waited + time.monotonic() - job.started
        try:
            sidecar, votes = validate_job(job)
            job.profile, reason = route(name, sidecar, votes, profiles,
                                        settings.routing.default_profile)
        except JobRejected as exc:
            return publish.reject(job, exc)
        job.routes = routes(reason, votes, profiles)
        job.stages = list(job.routes.stages) if job.routes else [job.profile]
        job.log = job.log.bind(profile=job.profile.name)
        said = explain(list(votes.models), job.profile, reason, job.routes)
        job.log.info("job_routed", reason=reason, total=job.total,
                     parts=[p.name for p in job.stages], models=said[:MODELS_SAID])
        if said:  # which profile answers each model the lines name, said once
            more = f"; and {len(said) - MODELS_SAID} more" if len(said) > MODELS_SAID else ""
            job.status.write(JobState.VALIDATING, phase=Phase.VALIDATING,
                             message="routed: " + "; ".join(said[:MODELS_SAID]) + more)
        job.deadline = sidecar.deadline(claimed_at)
        job.sidecar_sampling = sidecar.sampling
        job.priority = sidecar.priority
        job.cache = results if sidecar.cache else None
        job.retry_of, job.retry_codes = sidecar.retry_of, sidecar.retry_codes
        publish.job_toml(job, sidecar, reason, settings.routing.models_dir)
        if cancel_requested(job):
            return publish.end(job, CANCELLED)
        if expired(job):
            return publish.end(job, EXPIRED)
        ready = True
        return job
    finally:
        if not ready:
            job.ckpt.close()


def requested_ending(job: Job) -> Ending | None:
    """CANCELLED when a cancel marker waits for JOB, EXPIRED past its window."""
    return CANCELLED if cancel_requested(job) else EXPIRED if expired(job) else None


def cancel_requested(job: Job) -> bool:
    """Whether a cancel marker waits for the job."""
    return job.layout.cancel(job.name).exists()


def expired(job: Job) -> bool:
    return job.deadline is not None and wall_datetime(job.wall) >= job.deadline


def runnable(job: Job) -> Iterator[Request]:
    """The valid, unanswered requests of the job's current profile; one over
    the profile's limits, or naming a model no profile knows, gets its error
    line here and never reaches the engine; one the result cache answers is
    answered here."""
    assert job.profile is not None
    sampling = job.sampling
    allowed_domains = job.settings.media.allowed_domains
    # what answers depend on besides the request, read once per pass over the
    # job: a profile reloaded (SIGHUP) or a model rebuilt since is another key
    identity = cache.identity(job.profile, job.settings.routing.models_dir) \
        if job.cache is not None else ""
    for item in _pending(job):
        target = job.profile_of(item)
        if target is None:
            job.record(item.line, "error", error_line(LineError(
                item.line, item.custom_id, "model_not_found",
                f"The model `{item.model}` does not exist: no profile serves it "
                f"(known profiles: {', '.join(p.name for p in job.stages)} and the "
                "others in `batchd profiles list`)", "model", 404)))
            continue
        if target != job.profile.name:
            continue  # another stage's line: it runs when that profile is loaded
        over = job.profile.limits.violation({**sampling, **item.body})
        if over:
            job.record(item.line, "error", error_line(LineError(
                item.line, item.custom_id, "invalid_request", over[1], over[0])))
            continue
        sent = images.for_engine(item, job.media, job.profile.media, allowed_domains)
        if isinstance(sent, LineError):
            job.record(item.line, "error", error_line(sent))
            continue
        item = sent
        over = job.profile.media.violation(item.body, allowed_domains)  # audio, video
        if over:
            job.record(item.line, "error", error_line(LineError(
                item.line, item.custom_id, "invalid_request", over[1], over[0])))
            continue
        if job.cache is not None and _cached(job, item, sampling, identity):
            continue
        yield item


def _cached(job: Job, item: Request, sampling: dict[str, Any], identity: str) -> bool:
    """Answer ITEM from the result cache when it holds its answer (True); a
    cacheable miss is noted so its answer is stored when it comes."""
    assert job.cache is not None and job.profile is not None
    request = {**sampling, **item.body}
    if not cache.cacheable(item.url, request):
        return False
    # a picture of the media folder keys by its bytes, not its name
    key = cache.key(identity, item.url, images.cache_body(request, job.media))
    body = job.cache.get(key)
    if body is not None:
        job.record(item.line, "result", result_line(item, cache.fresh(body)))
        job.cache_hits += 1
        return True
    if item.line not in job.cache_pending:
        job.cache_misses += 1
    job.cache_pending[item.line] = key
    return False


def _pending(job: Job) -> Iterator[Request]:
    """The valid, unanswered requests in the job's order (batchd/jobs/order.py)."""
    max_line = job.settings.limits.max_line_bytes
    if job.order is None:
        for _offset, item in classified(job.input, max_line):
            if isinstance(item, Request) and item.line not in job.ckpt.done:
                yield item
        return
    with open_regular(job.input) as stream:
        for line, offset in job.order.sequence():
            if line not in job.ckpt.done:
                item = read_line_at(stream, offset, line, max_line)
                assert isinstance(item, Request)  # it was one when the order was made
                yield item
