"""What runs next in this daemon, and what joins the jobs already running.

The daemon's loop asks ``first()`` for a job to start a session with; a
running session asks ``admit()`` between engine steps for jobs to join it
(batchd/jobs/session.py). Both draw on the same candidates: unfinished jobs
in ``work/`` (resumed first), settled files in the inbox, and prepared jobs
held here while their profile is not loaded (they made way, or a part of
them routes elsewhere). ``scheduler.order`` decides among them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import structlog

from .config import Settings
from .jobs import publish
from .jobs.job import Job
from .jobs.runner import Outcome, Runner
from .jobs.session import YIELD, Session
from .layout import JobState
from .metrics import Metrics
from .notify import Notifier
from .profiles import ProfileSet
from .scheduler import Backlog, Waiting, order
from .spool import inbox
from .spool.lease import Leases
from .spool.watcher import Watcher

log = structlog.get_logger()


@dataclass
class Held:
    """A prepared job that waits its turn in this daemon: it made way for another
    profile (yielded), or it routed to a profile other than the loaded one."""

    job: Job
    since: float  # the daemon's clock when it began to wait


class Admission:
    def __init__(self, settings: Settings, runner: Runner, leases: Leases, metrics: Metrics,
                 notifier: Notifier, profiles: Callable[[], ProfileSet],
                 ended: Callable[[str, Outcome | None], None]):
        self.settings = settings
        self.runner = runner
        self.leases = leases
        self.metrics = metrics
        self.notifier = notifier
        self.profiles = profiles  # the daemon's set, reloaded on SIGHUP
        self.ended = ended
        self.settler = inbox.Settler(settings.watch.settle_seconds)
        self.backlog = Backlog(settings.layout, settings.routing.default_profile)
        self.reported: set[str] = set()  # non-regular entries that could not be moved
        self.retry_at: dict[str, float] = {}  # job or file -> when to try again after OSError
        self.retry_seconds = 10.0
        self.held: dict[str, Held] = {}  # job -> a prepared job waiting for its profile
        self.watcher: Watcher | None = None
        self._base = (0.0, time.monotonic())

    def now(self) -> float:
        """The pass's clock (tests give run_once theirs) moved on by the time since."""
        base, at = self._base
        return base + time.monotonic() - at

    def first(self, now: float, loaded: str | None) -> tuple[bool, Job | None]:
        """(whether there was work, the job to run a session with): an unfinished
        job in work/ first, then the scheduler's pick of files and held jobs."""
        self._base = (now, time.monotonic())
        for name in inbox.unfinished(self.settings):
            if name in self.held or self.retry_at.get(name, 0.0) > now \
                    or not self.leases.acquire(name):
                continue  # yielded, stalled, or another live daemon's job
            return True, self.prepare(name, now)
        ready = self.ready(now)
        if ready is None:
            return True, None  # an entry that is not a regular file was put aside
        for candidate, reason in order(ready + self.held_candidates(now), loaded,
                                       self.settings.scheduling.max_wait_seconds):
            if candidate.name in self.held:
                held = self.held.pop(candidate.name).job
                held.log.info("job_resuming", reason=reason)
                return True, held
            claimed, job = self.claim(candidate, reason, now)
            if claimed:
                return True, job
        return False, None

    def admit(self, session: Session) -> list[Job] | str:
        """Asked by a running session between engine steps: jobs to join it (files
        and unfinished jobs for its profile, up to max_running_jobs), or YIELD when
        a file for another profile has waited over max_wait_seconds."""
        now = self.now()
        max_wait = self.settings.scheduling.max_wait_seconds
        loaded = session.profile.name
        candidates = (self.ready(now) or []) + self.held_candidates(now)
        if session.running_for() >= max_wait and \
                any(c.waited > max_wait and c.profile not in (loaded, None) for c in candidates):
            return YIELD  # its turn was at least max_wait long: the overdue file's now
        if any(r.job.deaths for r in session.running.values()):
            return []  # a job that was running when the engine died runs alone
        room = self.settings.scheduling.max_running_jobs - len(session.running)
        joining: list[Job] = []
        for name in inbox.unfinished(self.settings):
            if room <= len(joining):
                break
            if name in session.running or name in self.held or \
                    self.retry_at.get(name, 0.0) > now or not self.leases.acquire(name):
                continue  # running, yielded, stalled, or another live daemon's job
            job = self.prepare(name, now)
            if job is not None:
                self._join_or_hold(session, job, joining, now)
        for candidate, reason in order(candidates, loaded, max_wait):
            if room <= len(joining):
                break
            if candidate.profile not in (loaded, None):
                continue
            if candidate.name in self.held:
                if self.held[candidate.name].job.deaths:
                    continue  # it runs alone, in a session of its own
                job = self.held.pop(candidate.name).job
                job.log.info("job_resuming", reason=reason)
            else:
                _, job = self.claim(candidate, reason, now)
            if job is not None:
                self._join_or_hold(session, job, joining, now)
        return joining

    def hold(self, job: Job) -> None:
        """A job left its session unfinished (it made way, or its next part needs
        another profile): it waits beside the inbox's files, from now."""
        self.held[job.name] = Held(job, self.now())

    def ready(self, now: float) -> list[Waiting] | None:
        """The inbox's files ready to claim, as the scheduler sees them; None when
        an entry that is not a regular file was put aside instead (work done)."""
        if self.watcher is not None:
            for name in self.watcher.take_renamed():
                self.settler.mark_renamed(name)
        ready: list[tuple[str, os.stat_result]] = []
        present = inbox.scan(self.settings.inbox)
        self.backlog.present([name for name, _ in present], now)
        for name, st in present:
            why = inbox.refusal(st)
            if why:
                if name not in self.reported:
                    if not publish.reject_entry(self.settings, name, why):
                        self.reported.add(name)  # not movable: reported once
                    return None
                continue
            if self.settings.watch.require_ready_marker and \
                    not inbox.has_marker(self.settings.layout, name):
                continue
            if not self.settler.settled(name, st, now) or self.retry_at.get(name, 0.0) > now:
                continue
            ready.append((name, st))
        profiles = self.profiles()
        return [self.backlog.waiting(name, st, now, profiles) for name, st in ready]

    def held_candidates(self, now: float) -> list[Waiting]:
        """Yielded jobs (and claimed ones whose profile was not loaded), as
        candidates beside the inbox's files: their wait starts when they stopped."""
        return [Waiting(name, now - held.since, held.job.priority, held.job.profile.name)
                for name, held in self.held.items() if held.job.profile is not None]

    def claim(self, candidate: Waiting, reason: str, now: float) -> tuple[bool, Job | None]:
        """Claim a waiting file and prepare its job: (claimed, the job ready to
        run, or None when it already ended or stalled)."""
        name = candidate.name
        self.settler.forget(name)
        try:
            claimed = inbox.claim(self.settings, name, self.leases)
        except OSError as exc:
            self.stalled(name, now, exc, "claim_failed")
            return False, None
        if claimed is None:
            return False, None  # another daemon won the race
        log.info("job_claimed", job=claimed.job, file=name, reason=reason,
                 waited_s=round(candidate.waited, 3))
        self.metrics.claimed()
        return True, self.prepare(claimed.job, now, f"claimed: {reason}", candidate.waited)

    def prepare(self, name: str, now: float, note: str = "", waited: float = 0.0
                ) -> Job | None:
        """The job validated and routed, or None when it ended (rejected, ...) or stalled."""
        self.notifier.status(f"preparing {name}")
        try:
            prepared = self.runner.prepare(name, self.profiles(), note, waited)
        except OSError as exc:  # other jobs go on; this one is retried later
            self.job_stalled(name, exc)
            return None
        if isinstance(prepared, Outcome):
            self.ended(name, prepared)
            return None
        return prepared

    def _join_or_hold(self, session: Session, job: Job, joining: list[Job], now: float
                      ) -> None:
        """A prepared job joins SESSION when it routed to its profile, else waits
        its turn beside the inbox's files."""
        assert job.profile is not None
        if job.prefer(session.profile):
            joining.append(job)
            return
        job.status.write(JobState.IN_PROGRESS, phase="waiting_for_model",
                         message=f"waiting for profile {job.profile.name}: "
                         f"{session.profile.name} is loaded", **job.progress())
        self.held[job.name] = Held(job, now)

    def job_stalled(self, name: str, exc: OSError) -> None:
        self.stalled(name, self.now(), exc, "job_stalled")
        publish.stalled(self.settings, name, exc)

    def stalled(self, what: str, now: float, exc: OSError, event: str) -> None:
        self.retry_at[what] = now + self.retry_seconds
        message = f"{exc.strerror or exc} ({exc.filename or ''}); retrying in " \
                  f"{self.retry_seconds:.0f}s"
        log.error(event, job=what, error=message)
        self.notifier.status(f"{what}: stalled: {message}")

    def release_held(self) -> None:
        """Stopping: waiting jobs keep their checkpoints and go back to work/ for
        whichever daemon starts next."""
        for name, held in list(self.held.items()):
            try:
                self.runner.interrupted(held.job)
                held.job.ckpt.close()
            except OSError as exc:
                log.error("job_stalled", job=name, error=str(exc))
            self.leases.release(name)
        self.held.clear()

    def waiting(self) -> bool:
        """Whether eligible files are still settling in the inbox."""
        return any(inbox.is_regular(st) and name not in self.reported
                   for name, st in inbox.scan(self.settings.inbox))
