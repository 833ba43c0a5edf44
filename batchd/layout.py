"""The spool's vocabulary: where every file of the spool and of a job lives,
and the states a job passes through. Every other module asks here; a name
typed in two modules drifts apart the first time one changes.

    ROOT/inbox/NAME.jsonl      dropped by users (NAME.toml sidecar, NAME.jsonl.ready,
                               NAME.media/ its images)
    ROOT/inbox/JOB.cancel      a request to cancel JOB
    ROOT/work/JOB.jsonl        a claimed job's input (JOB.toml its sidecar)
    ROOT/work/JOB.ckpt.jsonl   its checkpoint; JOB.lease its owner
    ROOT/work/media/JOB/       its media folder while it runs (vLLM reads images only here)
    ROOT/outbox/JOB.KIND       status.jsonl, results.jsonl, errors.jsonl, bench.json,
                               input.jsonl, job.toml; JOB.media/ its images, kept
    ROOT/failed/NAME           rejected inputs, untouched
    ROOT/api/files/, ROOT/api/batches/   what `batchd api` keeps
    ROOT/cache/                the result cache, when [cache] is enabled
    ROOT/events/JOB.json       a job's end, until its hook ran and its webhook was delivered
    ROOT/logs/engine-HOST.log  the engines' own output, when the daemon runs in a terminal
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator


class JobState(str, Enum):
    """A job's state, in OpenAI batch words. Persisted by value."""

    QUEUED = "queued"  # claimed, waiting for the engine
    VALIDATING = "validating"  # reading lines, routing
    IN_PROGRESS = "in_progress"  # generating
    FINALIZING = "finalizing"  # writing results, errors and bench
    COMPLETED = "completed"  # final: every line answered
    FAILED = "failed"  # final: rejected as a whole, or the engine gave up
    CANCELLED = "cancelled"  # final: stopped on request; the rest are `cancelled` errors
    EXPIRED = "expired"  # final: its completion window passed; the rest are `batch_expired`
    # Never in a status file: what the views (`batchd status`, metrics, the API)
    # call a file still in the inbox (phase settling or in_inbox).
    WAITING = "waiting"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


class Phase(str, Enum):
    """What a job is doing within its state: a status line's ``phase``. Persisted
    by value; docs/FORMATS.md lists them. No other value appears in a status file."""

    SETTLING = "settling"  #: waiting: in the inbox, still being written (never persisted)
    IN_INBOX = "in_inbox"  #: waiting: settled in the inbox, not claimed yet (never persisted)
    VALIDATING = "validating"  #: validating: reading its lines, routing
    WAITING_FOR_MODEL = "waiting_for_model"  #: in_progress: its profile is not the loaded one
    LOADING_MODEL = "loading_model"  #: in_progress: its profile's model is loading
    GENERATING = "generating"  #: in_progress: its requests are in the engine
    ENGINE_DIED = "engine_died"  #: in_progress: the engine died; it waits for the next load
    WAITING_TO_RUN_ALONE = "waiting_to_run_alone"  #: in_progress: after a death it shared
    YIELDED = "yielded"  #: in_progress: made way for an overdue file of another profile
    INTERRUPTED = "interrupted"  #: queued: the daemon stopped; it resumes at the next start
    STALLED = "stalled"  #: queued: a write failed (disk full); retried later
    PUBLISHING = "publishing"  #: finalizing: writing results, errors and bench
    DONE = "done"  #: a final state


@dataclass(frozen=True)
class Ending:
    """How a job ends: a final state, and for a failure the code every unanswered
    line gets and the message that says why."""

    state: JobState
    code: str | None = None
    message: str = ""

    @classmethod
    def failed(cls, code: str, message: str) -> Ending:
        return cls(JobState.FAILED, code, message)


FINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED,
                          JobState.EXPIRED})
# Allowed moves; anything else is a bug.
TRANSITIONS = {
    JobState.QUEUED: {JobState.VALIDATING, JobState.FAILED, JobState.CANCELLED},
    JobState.VALIDATING: {JobState.IN_PROGRESS, JobState.FINALIZING, JobState.FAILED,
                          JobState.CANCELLED, JobState.QUEUED},
    JobState.IN_PROGRESS: {JobState.FINALIZING, JobState.QUEUED, JobState.FAILED,
                           JobState.CANCELLED},
    JobState.FINALIZING: FINAL_STATES | {JobState.QUEUED},
}


def is_final(state: str | None) -> bool:
    """Whether a persisted state value is a final one."""
    return state in {s.value for s in FINAL_STATES}


INPUT = ".jsonl"  # what makes an inbox entry a job, and a job's input in work/
STATUS = "status.jsonl"
RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
BENCH = "bench.json"
PUBLISHED_INPUT = "input.jsonl"
JOB_TOML = "job.toml"
MERGED = "merged.jsonl"  # a retry's answers merged into its original's (jobs/retry.py)
CHECKPOINT = ".ckpt.jsonl"
MEDIA = ".media"  # inbox/NAME.media/: the images of inbox/NAME.jsonl (spool/media.py)
CLAIM = ".claim~"  # work/.claim~PID~N~HOST~NAME: hidden, never a job
ENGINE_PIDS = ".engine~"  # work/.engine~HOST~PID


class Layout:
    """The paths of one spool under ROOT."""

    def __init__(self, root: Path):
        self.root = root
        self.inbox = root / "inbox"
        self.work = root / "work"
        self.outbox = root / "outbox"
        self.failed = root / "failed"
        self.api_files = root / "api" / "files"
        self.api_batches = root / "api" / "batches"
        self.cache = root / "cache"
        self.events = root / "events"

    @property
    def folders(self) -> tuple[Path, Path, Path, Path]:
        """The four folders a daemon needs."""
        return self.inbox, self.work, self.outbox, self.failed

    # -- inbox -------------------------------------------------------------------

    def cancel(self, job: str) -> Path:
        return self.inbox / f"{job}.cancel"

    def ready_marker(self, name: str) -> Path:
        return self.inbox / f"{name}.ready"

    def inbox_media(self, name: str) -> Path:
        """inbox/NAME.media/ for inbox/NAME.jsonl."""
        return self.inbox / (name.removesuffix(INPUT) + MEDIA)

    def inbox_sidecar(self, name: str) -> Path:
        """inbox/NAME.toml for inbox/NAME.jsonl."""
        return self.inbox / (name.removesuffix(INPUT) + ".toml")

    # -- work --------------------------------------------------------------------

    def input(self, job: str) -> Path:
        return self.work / f"{job}{INPUT}"

    def checkpoint(self, job: str) -> Path:
        return self.work / f"{job}{CHECKPOINT}"

    def sidecar(self, job: str) -> Path:
        return self.work / f"{job}.toml"

    @property
    def media_root(self) -> Path:
        """work/media/: the running jobs' media folders, the one place vLLM may read
        local images from (its allowed_local_media_path)."""
        return self.work / "media"

    def media(self, job: str) -> Path:
        """work/media/JOB/: a running job's media folder."""
        return self.media_root / job

    def media_pointer(self, job: str) -> Path:
        """work/.JOB.media: the inbox name of JOB's media folder, from its claim
        until the folder is in work/media/ (spool/media.py)."""
        return self.work / f".{job}{MEDIA}"

    def lease(self, job: str) -> Path:
        return self.work / f"{job}.lease"

    def stale_lease(self, job: str, host: str, pid: int) -> Path:
        """Where a daemon taking over JOB moves its dead owner's lease (one wins)."""
        return self.work / f".{job}.lease.stale~{host}~{pid}"

    def daemons(self) -> Path:
        """daemons/: one record per running daemon of the spool (spool/daemons.py)."""
        return self.root / "daemons"

    def engine_log(self, host: str) -> Path:
        """logs/engine-HOST.log: the engine processes' own output (vLLM's, torch's)
        while `batchd run` runs in a terminal (batchd/logs.py)."""
        return self.root / "logs" / f"engine-{host}.log"

    def claim(self, pid: int, n: int, host: str, name: str) -> Path:
        """A claim in flight: unique to the process, keeping the inbox NAME."""
        return self.work / f"{CLAIM}{pid}~{n}~{host}~{name}"

    def claims(self) -> Iterator[tuple[Path, int, str, str]]:
        """(path, pid, host, inbox name) of every claim in flight."""
        for path in self.work.glob(f"{CLAIM}*"):
            parts = path.name[len(CLAIM):].split("~", 3)
            if len(parts) == 4 and parts[0].isdigit():
                yield path, int(parts[0]), parts[2], parts[3]

    def engine_pidfile(self, host: str, pid: int, replica: int = 0) -> Path:
        """The engine processes the daemon HOST:PID started (its REPLICA), for a
        reaper after kill -9."""
        return self.work / (f"{ENGINE_PIDS}{host}~{pid}" if not replica
                            else f"{ENGINE_PIDS}{host}~r{replica}~{pid}")

    def engine_pidfiles(self, host: str) -> Iterator[tuple[Path, str]]:
        """(pidfile, the owning daemon's pid as written) for the daemons of HOST."""
        for path in self.work.glob(f"{ENGINE_PIDS}{host}~*"):
            yield path, path.name.rsplit("~", 1)[-1]

    @staticmethod
    def job_of_input(name: str) -> str | None:
        """The job whose input work/NAME is; None for any other file there."""
        if name.endswith(INPUT) and not name.startswith(".") and not name.endswith(CHECKPOINT):
            return name[: -len(INPUT)]
        return None

    # -- outbox ------------------------------------------------------------------

    def status(self, job: str) -> Path:
        return self.out(job, STATUS)

    def out_media(self, job: str) -> Path:
        """outbox/JOB.media/: the job's media folder, kept when it ended."""
        return self.outbox / f"{job}{MEDIA}"

    def event(self, job: str) -> Path:
        return self.events / f"{job}.json"

    def out(self, job: str, kind: str) -> Path:
        """outbox/JOB.KIND, KIND one of the module's file kinds (e.g. RESULTS)."""
        return self.outbox / f"{job}.{kind}"

    # -- api -------------------------------------------------------------------

    def upload(self, file_id: str) -> Path:
        return self.api_files / f"{file_id}{INPUT}"

    def upload_meta(self, file_id: str) -> Path:
        return self.api_files / f"{file_id}.json"

    def upload_temp(self, file_id: str) -> Path:
        return self.api_files / f".{file_id}.upload"

    def batch_request(self, job: str) -> Path:
        return self.api_batches / f"{job}.json"

    # -- outbox (listing) --------------------------------------------------------

    def statuses(self) -> Iterator[tuple[str, Path]]:
        """(job, status file) for every job the outbox knows."""
        suffix = f".{STATUS}"
        try:
            entries = list(os.scandir(self.outbox))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.endswith(suffix) and not entry.name.startswith("."):
                yield entry.name[: -len(suffix)], Path(entry.path)



COMPLETED = Ending(JobState.COMPLETED)
CANCELLED = Ending(JobState.CANCELLED)
EXPIRED = Ending(JobState.EXPIRED)
