"""A job's end, kept in the spool until it has been signalled.

``record`` writes ``events/JOB.json`` before the job's final status line
(batchd/jobs/publish.py), so a daemon killed right after that line still
signals it at its next start; batchd/hooks.py runs the hook command and
delivers the webhook, updating the record, and removes it when both are done.
A record is acted on only once the job's status file ends in the state it
names (a crash before the final line republishes and rewrites it).

Several daemons may share a spool: ``dispatching`` lets one of them at a
time signal, so a record is handled by one daemon.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..config import Settings
from ..layout import JobState
from .outbox import write_atomic

EVENT_TYPES = {JobState.COMPLETED: "batch.completed", JobState.FAILED: "batch.failed",
               JobState.CANCELLED: "batch.cancelled", JobState.EXPIRED: "batch.expired"}


def record(settings: Settings, job: str, state: JobState, counts: dict[str, int]) -> None:
    """Note JOB's end for its hook and webhook (when config.toml has either)."""
    hooks = settings.hooks
    if not hooks.any:
        return
    now = time.time()
    doc = {"job": job, "state": state.value, "counts": counts, "ended_at": now,
           # OpenAI's event shape; the job name is the batch id, as in `batchd api`
           "event": {"id": f"evt_{uuid.uuid4().hex}", "object": "event",
                     "created_at": int(now), "type": EVENT_TYPES[state], "data": {"id": job}},
           "webhook_id": f"msg_{uuid.uuid4().hex}",  # the same on every redelivery
           "hook": "pending" if hooks.on_final else "none",
           "webhook": "pending" if hooks.webhook_url else "none",
           "attempts": 0, "next_at": 0.0}
    settings.layout.events.mkdir(exist_ok=True)
    write_atomic(settings.layout.event(job), [json.dumps(doc).encode()])


def save(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(path, [json.dumps(doc).encode()])


def pending(settings: Settings) -> list[Path]:
    folder = settings.layout.events
    try:
        return sorted(p for p in folder.iterdir()
                      if p.suffix == ".json" and not p.name.startswith("."))
    except FileNotFoundError:
        return []


@contextmanager
def dispatching(settings: Settings) -> Iterator[bool]:
    """Whether this daemon may signal now: one daemon of the spool at a time
    holds events/.lock (flock; released by the kernel if the holder dies)."""
    folder = settings.layout.events
    folder.mkdir(exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def load(path: Path) -> dict[str, Any] | None:
    """The record at PATH; None when it is gone or not a record (a stray file is left alone)."""
    try:
        with open(path, "rb") as stream:
            doc = json.loads(stream.read(1 << 20))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("job"), str) else None
