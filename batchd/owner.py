"""The jobs a daemon answers for outside its session: those held here (they
made way for another profile, or wait for their model or to run alone) and the
jobs in parts it owns (jobs/parts.py), whose parts run on any daemon of the
spool. The loop asks each turn (``Owned.look``): a cancel or expiry ends such a
job at once, not when its turn comes; a job in parts whose every part is done is
published; the others get a status line from their parts' progress. Leases this
daemon lost to another one (``Owned.lost``) take their jobs away here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .admission import Admission
from .config import Settings
from .jobs import parts, publish
from .jobs.job import Job
from .jobs.prepare import requested_ending
from .jobs.publish import Outcome
from .jobs.session import Session
from .layout import COMPLETED, Ending, JobState, Phase
from .spool.lease import Leases

CHECK_SECONDS = 0.1  # how often held jobs' cancel markers and expiries are looked at
PARTS_SECONDS = 0.5  # how often an owner of jobs in parts reads their parts' progress


@dataclass
class Looked:
    """What one look found: jobs that ENDED, status lines written (PROGRESS), and
    whether it did any WORK."""

    ended: list[tuple[str, Outcome]] = field(default_factory=list)
    progress: list[dict] = field(default_factory=list)
    worked: bool = False


class Owned:
    def __init__(self, settings: Settings, admission: Admission, leases: Leases):
        self.settings = settings
        self.admission = admission
        self.leases = leases
        self.checked_held = self.looked_parts = float("-inf")

    def look(self, now: float, paced: bool = True) -> Looked:
        """Held jobs' cancels and expiries every CHECK_SECONDS, jobs in parts every
        PARTS_SECONDS (on every call when not PACED: turns driven by hand, tests)."""
        found = Looked()
        if not paced or now >= self.checked_held + CHECK_SECONDS:
            self.checked_held = now
            self._end_held(now, found)
        if self.admission.split and (not paced or now >= self.looked_parts + PARTS_SECONDS):
            self.looked_parts = now
            self._coordinate(now, found)
        return found

    def look_soon(self) -> None:
        """A part ended here: its job's owner, if it is this daemon, looks now."""
        self.looked_parts = float("-inf")

    def lost(self, session: Session | None) -> None:
        """Jobs and parts whose lease another daemon took over (this one was
        stopped or cut off from the spool for over lease_seconds) go, with
        nothing more written for them. After a late heartbeat every lease is
        checked before the turn writes anything."""
        if self.leases.overdue():
            for name in list(self.leases.held):
                self.leases.check(name)
        if not self.leases.lost:
            return
        for name in self.leases.take_lost():
            if session is not None and name in session.running:
                session.drop(name)
                continue
            held = self.admission.held.pop(name, None)
            job = held.job if held is not None else self.admission.split.pop(name, None)
            if job is not None:
                try:
                    job.ckpt.close()
                except OSError:
                    pass

    def _end_held(self, now: float, found: Looked) -> None:
        for name, held in list(self.admission.held.items()):
            ending = requested_ending(held.job)
            if ending is None:
                continue
            del self.admission.held[name]
            self._publish(name, held.job, ending, now, found)

    def _coordinate(self, now: float, found: Looked) -> None:
        split = self.admission.split
        for name, job in list(split.items()):
            try:
                ending = requested_ending(job)
                if ending is None:
                    seen = parts.look(job, self.leases)
                    if not seen.done:
                        self._split_progress(job, seen, found)
                        continue
                    ending = COMPLETED
            except OSError as exc:
                split.pop(name, None)
                self.admission.job_stalled(name, now, exc)
                continue
            del split[name]
            self._publish(name, job, ending, now, found)

    def _publish(self, name: str, job: Job, ending: Ending, now: float,
                 found: Looked) -> None:
        try:
            outcome = publish.end(job, ending)
            job.ckpt.close()
        except OSError as exc:
            self.admission.job_stalled(name, now, exc)
            return
        found.ended.append((name, outcome))
        found.worked = True

    def _split_progress(self, job: Job, seen: parts.Look, found: Looked) -> None:
        assert job.plan is not None
        if time.monotonic() - job.status.written_at < self.settings.status.interval:
            return
        elapsed = max(time.time() - job.plan.created, 1e-9)
        answered = seen.counts["completed"] + seen.counts["failed"]
        done = sum(bool(r.get("done")) for r in seen.by_part.values())
        found.progress.append(job.status.write(
            JobState.IN_PROGRESS, phase=Phase.GENERATING if seen.running else
            Phase.WAITING_FOR_MODEL, message=f"{job.plan.parts} parts: {done} done, "
            f"{seen.running} running", **{
                **job.progress(), "request_counts": seen.counts, "tokens": seen.tokens,
                "throughput": {"requests_per_s": round(answered / elapsed, 3),
                               "output_tokens_per_s": round(
                                   seen.tokens["completion"] / elapsed, 3)},
                "eta_s": None, "parts": {"total": job.plan.parts, "done": done,
                                         "running": seen.running}}))
