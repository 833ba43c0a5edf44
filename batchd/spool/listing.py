"""What the spool holds, read for people: the job table (`batchd status`, the
dashboard), the files still waiting in the inbox under the job names their
claim will give them, and the bench records summed by profile (`batchd bench
report`)."""

from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..clock import iso, utc_now
from ..config import Settings
from ..layout import BENCH, JobState, Phase
from .inbox import has_marker, is_regular, safe_stem, scan
from .outbox import StatusLine, read_status

COUNT_LINES_UP_TO = 8 << 20  # bytes: a waiting file's lines are counted when it is smaller


@dataclass(frozen=True)
class WaitingFile:
    """A file still in the inbox, seen as the job it will be: state ``waiting``
    (JobState.WAITING, a view's state, never in a status file), phase ``settling``
    (still being written: changed less than ``[watch] settle_seconds`` ago, or its
    ``NAME.jsonl.ready`` marker is missing while ``require_ready_marker`` is on) or
    ``in_inbox`` (settled, not claimed yet)."""

    job: str  # the name its claim will give it (spool/inbox.py: claim, reserve_name)
    name: str  # its name in the inbox
    path: Path
    phase: Phase
    size: int
    mtime: float
    profile: str | None  # its sidecar's, when it has one
    why: str  # what it waits for, for people

    state = JobState.WAITING

    def lines(self) -> int | None:
        """Its non-blank lines (its requests), when it is small enough to count."""
        if self.size > COUNT_LINES_UP_TO:
            return None
        try:
            with open(self.path, "rb") as stream:
                return sum(1 for raw in stream if raw.strip())
        except OSError:
            return None

    def record(self, count: bool = True) -> dict[str, Any]:
        """A status line's keys for it (what `batchd status JOB --json` prints), with
        state ``waiting`` and its phase; COUNT: its lines as ``request_counts.total``."""
        total = (self.lines() if count else None) or 0
        return StatusLine(
            ts=utc_now(), job=self.job, state=self.state.value, phase=self.phase.value,
            profile=self.profile, model=None,
            request_counts={"total": total, "completed": 0, "failed": 0},
            tokens={"prompt": 0, "completion": 0},
            throughput={"requests_per_s": 0.0, "output_tokens_per_s": 0.0},
            eta_s=None, message=self.why, file=self.name, bytes=self.size,
            modified=iso(self.mtime)).line()

    def row(self) -> dict[str, Any]:
        """Its row of the job table (job_rows)."""
        return {"job": self.job, "state": self.state.value, "phase": self.phase.value,
                "profile": self.profile, "completed": 0, "failed": 0, "total": 0,
                "output_tokens_per_s": None, "eta_s": None, "started": None, "updated": None,
                "message": self.why, "file": self.name, "bytes": self.size}


def waiting_files(settings: Settings, now: float | None = None) -> list[WaitingFile]:
    """Every job file still in the inbox, oldest first (the order claims take them),
    each under the job name its claim will give it: its stem made safe, then
    ``-2``, ``-3``, ... past names that have a status file or an input in work/
    already or that an older file of the inbox will take first. Entries that are
    not regular files are left out: they are never claimed, only rejected."""
    layout = settings.layout
    now = time.time() if now is None else now
    taken: set[str] = set()
    found = []
    for name, st in scan(layout.inbox):
        if not is_regular(st):
            continue
        job = _claim_name(settings, safe_stem(name), taken)
        taken.add(job)
        found.append(_waiting(settings, job, name, st, now))
    return found


def waiting_file(settings: Settings, job: str, now: float | None = None) -> WaitingFile | None:
    """The file still in the inbox that will be job JOB when claimed; None when
    there is none (it was claimed, or no such file was dropped)."""
    # Only a file whose stem is JOB, or JOB less a "-N", can become JOB: a quick
    # look at the names first, the full naming only when one may.
    stems = {safe_stem(name) for name, _st in scan(settings.layout.inbox)}
    if not any(_may_become(job, stem) for stem in stems):
        return None
    return next((w for w in waiting_files(settings, now) if w.job == job), None)


def claim_in_flight(settings: Settings, job: str) -> bool:
    """Whether a daemon is claiming, right now, a file that may become job JOB (it
    has left the inbox; its status file comes next). Asked after the inbox and
    before the status file, one of the three always answers for a dropped file."""
    return any(_may_become(job, safe_stem(name)) for *_, name in settings.layout.claims())


def _may_become(job: str, stem: str) -> bool:
    return job == stem or job.startswith(stem + "-") and job[len(stem) + 1:].isdigit()


def _claim_name(settings: Settings, stem: str, taken: set[str]) -> str:
    """The name inbox.reserve_name will give a file of STEM, as far as the spool
    tells now (a file claimed meanwhile may take it first)."""
    layout = settings.layout
    for n in range(1, 1_000_000):
        job = stem if n == 1 else f"{stem}-{n}"
        if job not in taken and not layout.status(job).exists() \
                and not layout.input(job).exists():
            return job
    return stem


def _waiting(settings: Settings, job: str, name: str, st: os.stat_result,
             now: float) -> WaitingFile:
    watch = settings.watch
    changed = max(st.st_mtime, st.st_ctime)
    if watch.require_ready_marker and not has_marker(settings.layout, name):
        phase, why = Phase.SETTLING, f"in inbox, waiting for its marker {name}.ready"
    elif now - changed < watch.settle_seconds:
        phase, why = Phase.SETTLING, "in inbox, still being written (settling)"
    else:
        phase, why = Phase.IN_INBOX, "in inbox, not claimed yet"
    return WaitingFile(job=job, name=name, path=settings.layout.inbox / name, phase=phase,
                       size=st.st_size, mtime=st.st_mtime,
                       profile=_sidecar_profile(settings.layout.inbox_sidecar(name)), why=why)


def _sidecar_profile(path: Path) -> str | None:
    """The profile an inbox sidecar names; None without one (or unreadable: the
    claim reports that)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 65536:
            return None
        profile = tomllib.loads(path.read_text(encoding="utf-8")).get("profile")
    except (OSError, ValueError):
        return None
    return profile if isinstance(profile, str) else None


def job_rows(settings: Settings) -> list[dict[str, Any]]:
    """The last status of every job, newest first, then the files still in the
    inbox (state ``waiting``), oldest first."""
    rows = []
    layout = settings.layout
    for _job, path in layout.statuses():
        history = read_status(path)
        if not history:
            continue
        last = history[-1]
        counts = last.get("request_counts") or {}
        rows.append({
            "job": last["job"], "state": last["state"], "phase": last.get("phase"),
            "profile": last.get("profile"),
            "completed": counts.get("completed", 0), "failed": counts.get("failed", 0),
            "total": counts.get("total", 0),
            "output_tokens_per_s": (last.get("throughput") or {}).get("output_tokens_per_s"),
            "eta_s": last.get("eta_s"), "started": history[0]["ts"], "updated": last["ts"],
            "message": last.get("message", ""),
        })
    rows.sort(key=lambda r: r["started"], reverse=True)
    rows += [waiting.row() for waiting in waiting_files(settings)]
    return rows


def bench_groups(outbox: Path) -> dict[str, dict[str, Any]]:
    """All bench records in OUTBOX summed by profile: jobs, requests, tokens, seconds."""
    groups: dict[str, dict[str, Any]] = {}
    for path in sorted(outbox.glob(f"*.{BENCH}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        g = groups.setdefault(record.get("profile") or "-", {
            "jobs": 0, "requests": 0, "completion": 0, "total_tokens": 0, "gen": 0.0,
            "load": 0.0, "hardware": record.get("hardware", {})})
        g["jobs"] += 1
        g["requests"] += record["requests"]["succeeded"]
        g["completion"] += record["tokens"]["completion"]
        g["total_tokens"] += record["tokens"]["total"]
        g["gen"] += record["timing_s"]["generation"]
        g["load"] = max(g["load"], record["timing_s"]["model_load"])
    return groups
