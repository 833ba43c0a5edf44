"""What a job publishes: status lines, output lines and atomic files.

Publication follows Maildir's rule: write under a temp name in the same
folder, fsync, then ``os.replace`` into place; nothing is modified after it
has its final name. The final status line is written last, so a reader that
sees it can trust everything else.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import structlog

from pydantic import BaseModel, ConfigDict

from ..clock import utc_now
from ..layout import TRANSITIONS, JobState, Phase
from ..lines import LineError, Request
from .lease import daemon_id

log = structlog.get_logger()


# Which daemon wrote a status line: several may share one spool.
OWNER = daemon_id()


class StatusLine(BaseModel):
    """One line of a job's status file (docs/FORMATS.md, "Status lines"), and
    the waiting line ``batchd status`` shows for a file still in the inbox.
    Built here and in ``listing.WaitingFile.record`` only; a key not listed is
    a bug, refused at once (extra="forbid"). Written with the keys that were
    given (``line()``), in this order."""

    model_config = ConfigDict(extra="forbid")

    ts: str
    job: str
    state: str  # layout.JobState
    phase: str | None = None  # layout.Phase
    profile: str | None = None
    model: str | None = None
    request_counts: dict[str, int] | None = None  # total, completed, failed
    tokens: dict[str, int] | None = None  # prompt, completion, cached
    order: str | None = None  # prefix | input
    throughput: dict[str, float] | None = None  # requests_per_s, output_tokens_per_s
    eta_s: float | None = None
    cache: dict[str, int] | None = None  # hits, misses (the result cache, when on)
    errors: list[dict[str, Any]] | None = None  # the job's own errors (a rejected file)
    merged_file: str | None = None  # a retry's merged answers (jobs/retry.py) ...
    merged_error: str | None = None  # ... or why they are not
    message: str = ""
    # a file still in the inbox (listing.WaitingFile): its name, size and mtime
    file: str | None = None
    bytes: int | None = None
    modified: str | None = None
    daemon: str | None = None  # HOST:PID of the daemon that wrote it

    def line(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class StatusFile:
    """A job's append-only status file; one JSON object a line."""

    def __init__(self, path: Path, job: str):
        self.path = path
        self.job = job
        self.state: JobState | None = None
        self.last: dict[str, Any] = {}
        self.written_at = 0.0

    def write(self, state: JobState, phase: Phase | None = None, **fields: Any
              ) -> dict[str, Any]:
        """Append a status line: STATE, PHASE (layout.Phase, the only values a
        status file holds) and the line's other FIELDS."""
        if self.state is not None and state != self.state and state not in TRANSITIONS.get(
                self.state, set()):
            raise ValueError(f"job {self.job}: no transition {self.state.value} -> {state.value}")
        record = StatusLine(ts=utc_now(), job=self.job, state=state.value,
                            **({"phase": Phase(phase).value} if phase is not None else {}),
                            message=fields.pop("message", ""), **fields, daemon=OWNER).line()
        with open(self.path, "ab") as stream:
            stream.write(json.dumps(record).encode() + b"\n")
            if state.final:
                stream.flush()
                os.fsync(stream.fileno())
        if state != self.state:  # one log event per transition, not per progress line
            log.info("job_state", job=self.job, state=state.value, phase=record.get("phase"),
                     profile=fields.get("profile"), counts=fields.get("request_counts"))
        self.state, self.last, self.written_at = state, record, time.monotonic()
        return record


def read_status(path: Path) -> list[dict[str, Any]]:
    """Every complete status line of a file (a torn last line is skipped)."""
    records = []
    try:
        with open(path, "rb") as stream:
            for raw in stream:
                if raw.endswith(b"\n"):
                    try:
                        records.append(json.loads(raw))
                    except ValueError:
                        pass
    except FileNotFoundError:
        pass
    return records


def result_line(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    rid = body.get("id", f"batch_req_{request.line}")
    return {"id": f"batch_req_{rid}", "custom_id": request.custom_id,
            "response": {"status_code": 200, "request_id": rid, "body": body},
            "error": None}


def error_line(error: LineError) -> dict[str, Any]:
    rid = f"batch_req_line_{error.line}"
    return {"id": rid, "custom_id": error.custom_id,
            "response": {"status_code": error.status_code, "request_id": rid,
                         "body": {"error": {"message": error.message, "type": error.type,
                                            "code": error.code, "param": error.param}}},
            "error": None, "line": error.line}


# An Anthropic line's outcome by batchd's error code (the rest are "errored").
ANTHROPIC_ENDED = {"cancelled": "canceled", "batch_cancelled": "canceled",
                   "batch_expired": "expired"}


def anthropic_line(kind: str, out: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An output line in Anthropic's Message Batches result shape: ("result",
    succeeded) or ("errored", errored | canceled | expired). Every outcome of an
    Anthropic line goes to the results file, as Anthropic's results hold all."""
    response = out.get("response") or {}
    body = response.get("body") or {}
    if kind == "result":
        return "result", {"custom_id": out["custom_id"],
                          "result": {"type": "succeeded", "message": body}}
    error = body.get("error") or {}
    code = error.get("code")
    status = response.get("status_code") or 400
    line: dict[str, Any] = {"custom_id": out["custom_id"]}
    if code in ANTHROPIC_ENDED:
        line["result"] = {"type": ANTHROPIC_ENDED[code]}
    else:
        kind_of = "api_error" if status >= 500 else \
            "not_found_error" if status == 404 else "invalid_request_error"
        line["result"] = {"type": "errored", "error": {
            "type": "error", "error": {"type": kind_of, "message": error.get("message", "")}}}
    line.update(line=out.get("line"), code=code)  # batchd's own, as on its error lines
    return "errored", line


def write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """Write PATH so that readers see the old file or the whole new one (see
    ``atomic_files``). Every file batchd publishes goes through here."""
    with atomic_files(path) as (stream,):
        for chunk in chunks:
            stream.write(chunk)


@contextmanager
def atomic_files(*paths: Path) -> Iterator[list[BinaryIO]]:
    """Streams for PATHS that readers see all at once or not at all: each writes a
    hidden temp name in its own folder (ours alone: it carries the pid); on a
    clean exit each is fsynced and renamed into place, then the folders are
    fsynced. On an error the temp files are removed and nothing is renamed."""
    tmps = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in paths]
    streams: list[BinaryIO] = []
    try:
        for tmp in tmps:
            streams.append(open(tmp, "wb"))
        yield streams
        for stream in streams:
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        for stream, tmp in zip(streams, tmps):
            stream.close()
            tmp.unlink(missing_ok=True)
        raise
    for stream in streams:
        stream.close()
    for tmp, path in zip(tmps, paths):
        os.replace(tmp, path)
    for folder in {path.parent for path in paths}:
        sync_dir(folder)


def sync_dir(folder: Path) -> None:
    """Make renames in FOLDER durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def dumps_line(obj: dict[str, Any]) -> bytes:
    # ASCII-escaped: model text may hold U+2028 or U+0085, which line splitters
    # other than "\n" (Python's str.splitlines among them) treat as line ends.
    return json.dumps(obj).encode() + b"\n"
