"""What runs next in this daemon, and what joins the jobs already running.

With no session, the daemon's loop asks ``first()`` for the job to start one
with; while a session runs it asks ``admit()`` every turn for jobs to join it.
Both draw on the same candidates: unfinished jobs in ``work/`` (resumed
first), settled files in the inbox (candidates.py), and prepared jobs held here
while their profile is not loaded (they made way, or a part of them routes
elsewhere). ``scheduler.order`` decides among them. The spool is looked at
again when the watcher wakes the loop, when a file seen changing should have
settled, and every ``poll_interval`` otherwise (``due``), not on every engine
step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from .candidates import Candidates
from .clock import Wall
from .clock import wall as clock_wall
from .config import Settings
from .jobs import publish
from .jobs.job import Job
from .jobs.prepare import prepare
from .jobs.publish import Outcome
from .jobs.session import Session
from .layout import JobState, Phase
from .metrics import Metrics
from .profiles import ProfileSet
from .scheduler import Waiting, order
from .spool import inbox
from .spool.cache import ResultCache
from .spool.daemons import Registry
from .spool.lease import Leases
from .spool.watcher import Wakeup, Watcher

log = structlog.get_logger()


@dataclass
class Held:
    """A prepared job that waits its turn in this daemon: it made way for another
    profile (yielded), or it routed to a profile other than the loaded one."""

    job: Job
    since: float  # the daemon's clock when it began to wait


@dataclass
class Admitted:
    """What a look at the spool found: JOBS to run (for ``first``, the one to
    start a session with), jobs that ENDED on the way (rejected, cancelled
    before they ran, published before a crash), whether it did any WORK, and
    whether the session must make way (OVERDUE: a file of another profile has
    waited over max_wait_seconds and the session has had its turn)."""

    jobs: list[Job] = field(default_factory=list)
    ended: list[tuple[str, Outcome]] = field(default_factory=list)
    worked: bool = False
    overdue: bool = False


class Admission:
    def __init__(self, settings: Settings, leases: Leases, metrics: Metrics,
                 profiles: ProfileSet, results: ResultCache | None, wake: Wakeup,
                 registry: Registry | None = None, wall: Wall = clock_wall):
        self.settings = settings
        self.wall = wall  # for mtimes and deadlines; the loop's clock comes as `now`
        self.leases = leases
        self.metrics = metrics
        self.profiles = profiles  # the daemon's set; reloaded() on SIGHUP
        self.results = results  # the result cache, None when off
        self.wake = wake  # the watcher's: a change in the inbox
        self.candidates = Candidates(settings, metrics, profiles, registry, wall)
        self.retry_at: dict[str, float] = {}  # job or file -> when to try again after OSError
        self.retry_seconds = 10.0
        self.held: dict[str, Held] = {}  # job -> a prepared job waiting for its profile
        self.watcher: Watcher | None = None  # set once it runs: names renamed in settle at once
        self.next_look = 0.0  # the loop's clock when the spool is to be looked at again

    def reloaded(self, profiles: ProfileSet) -> None:
        self.profiles = profiles
        self.candidates.reloaded(profiles)

    def due(self, now: float) -> bool:
        """Whether to look at the spool this turn: the watcher woke the loop, a
        file should have settled, or poll_interval has passed."""
        if self.watcher is None:
            return True  # turns driven by hand (tests): every one looks
        if self.wake.is_set():
            self.wake.clear()
            return True
        return now >= self.next_look

    def first(self, now: float, loaded: str | None) -> Admitted:
        """The job to start a session with: an unfinished job in work/ first, then
        the scheduler's pick of files and held jobs."""
        found = Admitted()
        self.wake.clear()  # what woke the loop is seen by this look
        self._looked(now)
        for name in inbox.unfinished(self.settings):
            if name in self.held or self.retry_at.get(name, 0.0) > now \
                    or not self.leases.acquire(name):
                continue  # yielded, stalled, or another live daemon's job
            found.worked = True
            self._prepare(found, name, now)
            if found.jobs:
                return found
        ready = self.ready(now)
        if ready is None:
            found.worked = True  # an entry that is not a regular file was put aside
            return found
        for candidate, reason in order(ready + self.held_candidates(now), loaded,
                                       self.settings.scheduling.max_wait_seconds):
            if candidate.name in self.held:
                held = self.held.pop(candidate.name).job
                held.log.info("job_resuming", reason=reason)
                found.jobs.append(held)
                found.worked = True
                return found
            if self.candidates.warm_elsewhere(candidate, loaded):
                continue
            if self._claim(found, candidate, reason, now):
                return found
        return found

    def admit(self, session: Session, now: float) -> Admitted:
        """Jobs to join SESSION (files and unfinished jobs for its profile, up to
        max_running_jobs), or OVERDUE when a file for another profile has waited
        over max_wait_seconds and the session has run at least as long."""
        found = Admitted()
        if not self.due(now):
            return found
        self._looked(now)
        max_wait = self.settings.scheduling.max_wait_seconds
        loaded = session.profile.name
        candidates = (self.ready(now) or []) + self.held_candidates(now)
        if session.running_for(now) >= max_wait and \
                any(c.waited > max_wait and c.profile not in (loaded, None) for c in candidates):
            found.overdue = True  # its turn was at least max_wait long: the overdue file's now
            return found
        if any(r.job.deaths for r in session.running.values()):
            return found  # a job that was running when the engine died runs alone
        room = self.settings.scheduling.max_running_jobs - len(session.running)
        for name in inbox.unfinished(self.settings):
            if room <= len(found.jobs):
                break
            if name in session.running or name in self.held or \
                    self.retry_at.get(name, 0.0) > now or not self.leases.acquire(name):
                continue  # running, yielded, stalled, or another live daemon's
            self._prepare(found, name, now)
        for candidate, reason in order(candidates, loaded, max_wait):
            if room <= len(found.jobs):
                break
            if candidate.profile not in (loaded, None):
                continue
            if candidate.name in self.held:
                if self.held[candidate.name].job.deaths:
                    continue  # it runs alone, in a session of its own
                job = self.held.pop(candidate.name).job
                job.log.info("job_resuming", reason=reason)
                found.jobs.append(job)
            else:
                self._claim(found, candidate, reason, now)
        # a prepared job joins when it routed to the loaded profile, else waits its turn
        joining = []
        for job in found.jobs:
            assert job.profile is not None
            if job.prefer(session.profile):
                joining.append(job)
                continue
            job.status.write(JobState.IN_PROGRESS, phase=Phase.WAITING_FOR_MODEL,
                             message=f"waiting for profile {job.profile.name}: "
                             f"{session.profile.name} is loaded", **job.progress())
            self.hold(job, now)
        found.jobs = joining
        found.worked = found.worked or bool(joining)
        return found

    def hold(self, job: Job, now: float) -> None:
        """A job left its session unfinished (it made way, or its next part needs
        another profile): it waits beside the inbox's files, from NOW."""
        self.held[job.name] = Held(job, now)

    def unhold(self, name: str) -> Held | None:
        """NAME no longer waits here (it ended, or another daemon has it now)."""
        return self.held.pop(name, None)

    def ended(self, name: str) -> None:
        """NAME ended: no retry of it is pending."""
        self.retry_at.pop(name, None)

    def look_later(self, now: float) -> None:
        """The spool itself failed: look at it again after retry_seconds."""
        self.next_look = now + self.retry_seconds

    def _looked(self, now: float) -> None:
        self.next_look = now + self.settings.watch.poll_interval
        if self.watcher is not None:
            for name in self.watcher.take_renamed():
                self.candidates.settler.mark_renamed(name)

    def ready(self, now: float) -> list[Waiting] | None:
        """The inbox's files ready to claim (candidates.py); the spool is looked at
        again the moment the first one still settling would have settled."""
        ready = self.candidates.ready(now, self.retry_at)
        self.next_look = min(self.next_look, self.candidates.look_at)
        return ready

    def held_candidates(self, now: float) -> list[Waiting]:
        """Yielded jobs (and claimed ones whose profile was not loaded), as
        candidates beside the inbox's files: their wait starts when they stopped."""
        return [Waiting(name, now - held.since, held.job.priority, held.job.profile.name)
                for name, held in self.held.items() if held.job.profile is not None]

    def _claim(self, found: Admitted, candidate: Waiting, reason: str, now: float) -> bool:
        """Claim a waiting file and prepare its job; whether it was claimed."""
        name = candidate.name
        self.candidates.settler.forget(name)
        try:
            claimed = inbox.claim(self.settings, name, self.leases)
        except OSError as exc:
            self._stalled(name, now, exc, "claim_failed")
            return False
        if claimed is None:
            return False  # another daemon won the race
        log.info("job_claimed", job=claimed.job, file=name, reason=reason,
                 waited_s=round(candidate.waited, 3))
        self.metrics.claimed()
        found.worked = True
        self._prepare(found, claimed.job, now, f"claimed: {reason}", candidate.waited)
        return True

    def _prepare(self, found: Admitted, name: str, now: float, note: str = "",
                 waited: float = 0.0) -> None:
        """The job validated and routed into FOUND: to run, or ended (rejected, ...);
        one that stalls is tried again later."""
        try:
            prepared = prepare(self.settings, name, self.profiles, self.results, note, waited,
                               self.wall)
        except OSError as exc:  # other jobs go on; this one is retried later
            self.job_stalled(name, now, exc)
            return
        if isinstance(prepared, Outcome):
            found.ended.append((name, prepared))
        else:
            found.jobs.append(prepared)

    def job_stalled(self, name: str, now: float, exc: OSError) -> None:
        self._stalled(name, now, exc, "job_stalled")
        publish.stalled(self.settings, name, exc)

    def _stalled(self, what: str, now: float, exc: OSError, event: str) -> None:
        self.retry_at[what] = now + self.retry_seconds
        message = f"{exc.strerror or exc} ({exc.filename or ''}); retrying in " \
                  f"{self.retry_seconds:.0f}s"
        log.error(event, job=what, error=message)

    def release_held(self) -> None:
        """Stopping: waiting jobs keep their checkpoints and go back to work/ for
        whichever daemon starts next."""
        for name, held in list(self.held.items()):
            try:
                publish.interrupted(held.job)
                held.job.ckpt.close()
            except OSError as exc:
                log.error("job_stalled", job=name, error=str(exc))
            self.leases.release(name)
        self.held.clear()

    def waiting(self) -> bool:
        """Whether eligible files are still settling in the inbox."""
        return self.candidates.waiting()
