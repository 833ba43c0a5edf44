"""The validation pass over a JSONL file, shared by jobs/prepare.py and ``batchd
validate``: every line classified once (duplicate custom_ids included), the
request limit enforced, the lines' models counted for routing; and a claimed
job's whole validating phase (``validate_job``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator

from ..config import LimitsConfig
from ..layout import PUBLISHED_INPUT, JobState, Phase
from ..jsonl import NotRegularFile, open_regular
from ..lines import Dedup, LineError, Request, iter_file_at
from ..spool import media
from ..spool.outbox import error_line
from . import images
from .job import Job
from .order import PrefixOrder
from .router import JobRejected, ModelVote, Sidecar, read_sidecar


def classified(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Request | LineError]]:
    """(byte offset, Request or LineError) of every non-blank line; a repeated
    custom_id is a LineError (the first line wins)."""
    dedup = Dedup()
    for offset, item in iter_file_at(path, max_line_bytes):
        yield offset, dedup.check(item)


def validate(path: Path, limits: LimitsConfig,
             on_error: Callable[[LineError], None],
             on_request: Callable[[Request, int], None] = lambda request, offset: None,
             every_8192: Callable[[int], None] = lambda lines: None) -> tuple[int, ModelVote]:
    """Classify every line of PATH: ON_ERROR gets each bad line, ON_REQUEST each
    good one with its offset. Returns (lines, model votes); raises JobRejected
    past ``limits.max_requests``."""
    votes = ModelVote()
    total = 0
    for offset, item in classified(path, limits.max_line_bytes):
        total += 1
        if total > limits.max_requests:
            raise JobRejected("too_many_requests", f"more than {limits.max_requests} requests",
                              item.line)
        if isinstance(item, LineError):
            on_error(item)
        else:
            votes.add(item.model, item.line)
            on_request(item, offset)
        if total % 8192 == 0:
            every_8192(total)
    return total, votes


def validate_job(job: Job) -> tuple[Sidecar, ModelVote]:
    """A claimed job's validating phase: the input is a plain file within the
    limits, its sidecar is read, every line is classified (bad lines get their
    error line in the checkpoint), the prefix order is built; returns the
    sidecar and the lines' model votes for routing. JobRejected refuses it whole."""
    settings = job.settings
    limits = settings.limits
    try:
        with open_regular(job.input) as stream:
            st = os.fstat(stream.fileno())
    except NotRegularFile as exc:
        raise JobRejected("not_a_regular_file", f"{job.input.name} {exc.strerror}") from None
    if st.st_nlink > 1 and not _published(job, st):
        raise JobRejected("not_a_regular_file",
                          f"{job.input.name} is a hard link ({st.st_nlink} names)")
    size = st.st_size
    if size > limits.max_file_bytes:
        raise JobRejected("file_too_large",
                          f"{size} bytes is over the limit of {limits.max_file_bytes}")
    sidecar = read_sidecar(job.sidecar)
    order = PrefixOrder() if (sidecar.order or settings.engine.order) == "prefix" \
        else None
    folder = media.move(job.layout, job.name)  # after a crash mid-claim too

    def on_request(item: Request, offset: int) -> None:
        if item.anthropic:
            job.anthropic.add(item.line)
        if images.count(item.body):
            # each image path checked now, so a missing one is known before a load
            bad = images.check(item, folder)
            if bad is not None:
                if item.line not in job.ckpt.done:
                    job.record(item.line, "error", error_line(bad))
                return
            job.images += images.count(item.body, settings.media.allowed_domains)
        if order is not None and item.line not in job.ckpt.done:
            order.add(item, offset)

    def on_error(item: LineError) -> None:
        if item.anthropic:
            job.anthropic.add(item.line)
        job.record(item.line, "error", error_line(item))

    def every_8192(lines: int) -> None:
        job.total = lines
        if time.monotonic() - job.status.written_at >= settings.status.interval:
            job.status.write(JobState.VALIDATING, phase=Phase.VALIDATING,
                             message=f"{lines} lines read",
                             **job.progress())

    job.total, votes = validate(
        job.input, limits, on_error, on_request, every_8192)
    job.order = order if order is not None and not order.overflow else None
    return sidecar, votes

def _published(job: Job, st: os.stat_result) -> bool:
    """Whether the input's second name is its own outbox copy (a crash came
    between publishing the input and the final status line)."""
    try:
        out = os.stat(job.out(PUBLISHED_INPUT), follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (out.st_dev, out.st_ino) == (st.st_dev, st.st_ino) and st.st_nlink == 2
