"""What runs next in this daemon, and what joins the jobs already running.

With no session, the daemon's loop asks ``first()`` for the job to start one
with; while a session runs it asks ``admit()`` every turn for jobs to join it.
Both draw on the same candidates: unfinished jobs in ``work/`` (resumed
first), settled files in the inbox, and prepared jobs held here while their
profile is not loaded (they made way, or a part of them routes elsewhere).
``scheduler.order`` decides among them. The spool is looked at again when the
watcher wakes the loop, when a file seen changing should have settled, and
every ``poll_interval`` otherwise (``due``), not on every engine step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterable

import structlog

from .config import Settings
from .jobs import parts, publish
from .jobs.job import Job
from .jobs.prepare import prepare
from .jobs.publish import Outcome
from .jobs.session import Session
from .layout import PART_SEP, JobState, Phase
from .metrics import Metrics
from .profiles import ProfileSet
from .scheduler import Backlog, Waiting, order
from .spool import inbox, media
from .spool import parts as spool_parts
from .spool.parts import split_name
from .spool.cache import ResultCache
from .spool.daemons import Registry
from .spool.lease import Leases
from .spool.watcher import Wakeup, Watcher

log = structlog.get_logger()

RENAME_GRACE_SECONDS = 0.02  # how soon a file first seen unsettled is looked at again
DEFER_SECONDS = 2.0  # how long a cold daemon leaves a file to a warm one of the spool
PARTS_AT_ONCE = 2  # parts of one job a daemon runs at once


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
                 registry: Registry | None = None):
        self.settings = settings
        self.leases = leases
        self.metrics = metrics
        self.profiles = profiles  # the daemon's set; reloaded() on SIGHUP
        self.results = results  # the result cache, None when off
        self.wake = wake  # the watcher's: a change in the inbox
        self.registry = registry  # the spool's other daemons (spool/daemons.py)
        self.settler = inbox.Settler(settings.watch.settle_seconds)
        self.media_settled: set[str] = set()  # inbox files whose media folder has settled
        self.backlog = Backlog(settings.layout, settings.routing.default_profile)
        self.reported: set[str] = set()  # non-regular entries that could not be moved
        self.retry_at: dict[str, float] = {}  # job or file -> when to try again after OSError
        self.retry_seconds = 10.0
        self.held: dict[str, Held] = {}  # job -> a prepared job waiting for its profile
        self.split: dict[str, Job] = {}  # jobs in parts this daemon owns (jobs/parts.py)
        self.watcher: Watcher | None = None  # set once it runs: names renamed in settle at once
        self.next_look = 0.0  # the loop's clock when the spool is to be looked at again

    def reloaded(self, profiles: ProfileSet) -> None:
        self.profiles = profiles
        self.backlog.reloaded()

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
            if name in self.held or name in self.split or self.retry_at.get(name, 0.0) > now \
                    or not self.leases.acquire(name):
                continue  # yielded, in parts, stalled, or another live daemon's job
            found.worked = True
            self._prepare(found, name, now)
            if found.jobs:
                return found
        ready = self.ready(now)
        if ready is None:
            found.worked = True  # an entry that is not a regular file was put aside
            return found
        for candidate, reason in order(ready + self.held_candidates(now) +
                                       self.part_candidates(now), loaded,
                                       self.settings.scheduling.max_wait_seconds):
            if candidate.name in self.held:
                held = self.held.pop(candidate.name).job
                held.log.info("job_resuming", reason=reason)
                found.jobs.append(held)
                found.worked = True
                return found
            if self._warm_elsewhere(candidate, loaded):
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
        candidates = (self.ready(now) or []) + self.held_candidates(now) + \
            self.part_candidates(now, loaded, session.running)
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
            if name in session.running or name in self.held or name in self.split or \
                    self.retry_at.get(name, 0.0) > now or not self.leases.acquire(name):
                continue  # running, yielded, in parts, stalled, or another live daemon's
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
            elif not self._parts_enough(candidate.name, [*session.running,
                                                         *(j.name for j in found.jobs)]):
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

    def _looked(self, now: float) -> None:
        self.next_look = now + self.settings.watch.poll_interval
        if self.watcher is not None:
            for name in self.watcher.take_renamed():
                self.settler.mark_renamed(name)

    def ready(self, now: float) -> list[Waiting] | None:
        """The inbox's files ready to claim, as the scheduler sees them; None when
        an entry that is not a regular file was put aside instead (work done)."""
        ready: list[tuple[str, os.stat_result]] = []
        settling = 0
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
            if self.retry_at.get(name, 0.0) > now:
                continue
            if not self.settler.settled(name, st, now):
                # look again the moment it would have settled, not a poll later;
                # one seen just now may have come by a rename whose event is a
                # moment behind this scan: look again at once for that too
                due = self.settler.due(name)
                if due - now >= self.settler.settle_seconds:
                    due = min(due, now + RENAME_GRACE_SECONDS)
                self.next_look = min(self.next_look, due)
                settling += 1
                continue
            # its media folder, dropped first, still being written (rsync, a share);
            # walked until seen settled once, not at every look while the file waits
            if name not in self.media_settled:
                wall = time.time()
                unsettled = media.pending(self.settings.layout.inbox_media(name), wall,
                                          self.settler.settle_seconds)
                if unsettled is not None:
                    self.next_look = min(self.next_look, now + unsettled - wall)
                    settling += 1
                    continue
                self.media_settled.add(name)
            ready.append((name, st))
        self.media_settled.intersection_update(name for name, _ in present)
        self.metrics.waiting(settling + len(ready), settling=settling)
        return [self.backlog.waiting(name, st, now, self.profiles) for name, st in ready]

    def held_candidates(self, now: float) -> list[Waiting]:
        """Yielded jobs (and claimed ones whose profile was not loaded), as
        candidates beside the inbox's files: their wait starts when they stopped."""
        return [Waiting(name, now - held.since, held.job.priority, held.job.profile.name)
                for name, held in self.held.items() if held.job.profile is not None]

    def _warm_elsewhere(self, candidate: Waiting, loaded: str | None) -> bool:
        """Whether to leave CANDIDATE to another daemon of the spool that has its
        profile loaded and a free slot, while it has waited less than
        DEFER_SECONDS (after that, whoever looks first takes it). Never a part:
        the warm daemon takes only PARTS_AT_ONCE of a job; the rest are for all."""
        if self.registry is None or candidate.profile in (loaded, None) or \
                split_name(candidate.name) is not None or \
                candidate.waited >= max(DEFER_SECONDS, 3 * self.settings.watch.poll_interval):
            return False
        return self.registry.warm_elsewhere(candidate.profile) is not None

    def part_candidates(self, now: float, profile: str | None = None,
                        running: Iterable[str] = ()) -> list[Waiting]:
        """Free parts of jobs in parts (nobody runs them, or their daemon is gone)
        whose profiles this daemon has (of PROFILE only, when given), as
        candidates beside the inbox's files: they wait from when they were cut.
        A daemon runs at most PARTS_AT_ONCE parts of one job (RUNNING and held
        here): one keeps its engine full while the other's last requests finish,
        and the other parts are left to the spool's other daemons."""
        found = []
        layout = self.settings.layout
        mine: dict[str, int] = {}
        for name in [*running, *self.held]:
            split = split_name(name)
            if split is not None:
                mine[split[0]] = mine.get(split[0], 0) + 1
        for job in spool_parts.split_jobs(layout):
            if mine.get(job, 0) >= PARTS_AT_ONCE:
                continue
            plan = spool_parts.read_plan(layout, job)
            if plan is None or (profile is not None and profile not in plan.profiles) or \
                    parts.profiles_of(plan, self.profiles) is None or \
                    layout.cancel(job).exists() or parts.expired(plan):
                continue  # gone, another profile, one this daemon lacks, cancelled, expired
            ended = {k for k, records in spool_parts.progress(layout, job).items()
                     if any(r.get("done") for r in records)}
            waited = max(0.0, time.time() - plan.created)  # one wait for all: part 0 first
            for k in range(plan.parts):
                name = spool_parts.part_name(job, k)
                if k in ended or name in self.held or name in self.leases.held or \
                        self.retry_at.get(name, 0.0) > now or not self.leases.free(name):
                    continue
                found.append(Waiting(name, waited, plan.priority, profile or plan.profile))
        return found

    def _parts_enough(self, name: str, running: Iterable[str]) -> bool:
        """Whether NAME is a part of a job this daemon already runs PARTS_AT_ONCE of."""
        split = split_name(name)
        if split is None:
            return False
        prefix = split[0] + PART_SEP
        return sum(other.startswith(prefix) for other in running) >= PARTS_AT_ONCE

    def _take_part(self, found: Admitted, name: str, now: float) -> bool:
        """Take a free part's lease and open it; whether it was taken."""
        job, k = split_name(name)  # type: ignore[misc]
        try:
            if not self.leases.acquire(name):
                return False  # another daemon took it first
        except FileNotFoundError:
            return False  # its job was published meanwhile
        try:
            part = parts.open_part(self.settings, job, k, self.profiles, self.results)
        except OSError as exc:
            self.leases.release(name)
            self._stalled(name, now, exc, "part_stalled")
            return False
        if part is None:  # published meanwhile, or a profile this daemon lacks
            self.leases.release(name)
            return False
        found.jobs.append(part)
        found.worked = True
        return True

    def _claim(self, found: Admitted, candidate: Waiting, reason: str, now: float) -> bool:
        """Claim a waiting file (or take a free part) and prepare its job; whether
        it was claimed."""
        name = candidate.name
        if split_name(name) is not None:
            return self._take_part(found, name, now)
        self.settler.forget(name)
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
            prepared = prepare(self.settings, name, self.profiles, self.results, note, waited)
        except OSError as exc:  # other jobs go on; this one is retried later
            self.job_stalled(name, now, exc)
            return
        if isinstance(prepared, Outcome):
            found.ended.append((name, prepared))
        elif prepared.plan is not None:  # in parts: this daemon owns it, every daemon runs it
            self.split[name] = prepared
            found.worked = True
        else:
            found.jobs.append(prepared)

    def job_stalled(self, name: str, now: float, exc: OSError) -> None:
        self._stalled(name, now, exc, "job_stalled")
        if split_name(name) is not None:  # a part: back to the spool, for any daemon
            self.leases.release(name)
            return
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
        for name, job in list(self.split.items()):
            try:
                publish.interrupted(job)
                job.ckpt.close()
            except OSError as exc:
                log.error("job_stalled", job=name, error=str(exc))
            self.leases.release(name)
        self.split.clear()

    def waiting(self) -> bool:
        """Whether eligible files are still settling in the inbox."""
        return any(inbox.is_regular(st) and name not in self.reported
                   for name, st in inbox.scan(self.settings.inbox))
