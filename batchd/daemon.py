"""The daemon loop: watch, claim, run, repeat; its signal handlers and what it
tells systemd (the sd_notify wire protocol itself is notify.py; the engine
process ignores SIGTERM and SIGINT on its own, engine/host.py).

``run_once()`` does one pass and says whether it did work; ``run()`` repeats
it until stopped; ``--once`` drains the spool and returns. Signal handlers
only set flags; the loop acts on them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import structlog

from .config import Settings
from .engine import Engine, EnginePool
from .engine.hosted import engine_factory, reap_engines
from .jobs import publish
from .jobs.job import Job
from .jobs.runner import Outcome, Runner
from .jobs.session import YIELD, Session
from .layout import JobState
from .metrics import Metrics
from .notify import Notifier, watchdog_interval
from .profiles import Profile, ProfileSet
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


class Daemon:
    def __init__(self, settings: Settings, profiles: ProfileSet | None = None,
                 factory: Callable[[Profile], Engine] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.profiles = profiles or ProfileSet.load(settings.routing.profiles_dir)
        self.clock = clock
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.notifier = Notifier()
        self.beat = watchdog_interval()
        self.pool = EnginePool(self._keepalive(factory or engine_factory(settings)))
        self.runner = Runner(settings, self.pool, self.stop, self._progress)
        self.settler = inbox.Settler(settings.watch.settle_seconds)
        self.leases = Leases(settings.layout, settings.scheduling.lease_seconds)
        self.metrics = Metrics(settings.metrics.textfile)
        self.reported: set[str] = set()  # non-regular entries that could not be moved
        self.backlog = Backlog(settings.layout, settings.routing.default_profile)
        self.retry_at: dict[str, float] = {}  # job or file -> when to try again after OSError
        self.retry_seconds = 10.0
        self.watcher: Watcher | None = None
        self.unloaded: str | None = None  # the idle status after an idle unload
        self.held: dict[str, Held] = {}  # job -> a prepared job waiting for its profile
        self.session: Session | None = None  # the jobs running now
        self._base = (clock(), time.monotonic())  # see _now()

    def setup(self) -> None:
        os.umask(self.settings.spool.umask)
        inbox.ensure_dirs(self.settings)
        inbox.check_writable(self.settings)
        for error in self.profiles.errors:
            log.error("profile_invalid", error=error)
        mode = os.stat(self.settings.inbox).st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            # Anyone may then delete or rename other users' files, claims included.
            log.warning("inbox_world_writable", inbox=str(self.settings.inbox),
                        fix=f"chmod +t {self.settings.inbox}")
        reap_engines(self.settings)
        for path, name in inbox.orphan_claims(self.settings):
            # A crash between the claim's two renames: give the file back.
            os.rename(path, self.settings.inbox / name)
            log.warning("claim_returned", file=name)

    # -- one pass --------------------------------------------------------------

    def run_once(self, now: float | None = None) -> bool:
        """Resume or claim a job and run it, with every job that joins it on the
        way (batchd/jobs/session.py); True when something was done."""
        now = self.clock() if now is None else now
        self._base = (now, time.monotonic())
        if self.stop.is_set():
            return False
        for name in inbox.unfinished(self.settings):
            if name in self.held or self.retry_at.get(name, 0.0) > now \
                    or not self.leases.acquire(name):
                continue  # yielded, stalled, or another live daemon's job
            job = self._prepare(name, now)
            if job is not None:
                self._session(job)
            return True
        ready = self._ready(now)
        if ready is None:
            return True  # an entry that is not a regular file was put aside
        loaded = self.pool.engine.profile.name if self.pool.engine is not None else None
        for candidate, reason in order(ready + self._held(now), loaded,
                                       self.settings.scheduling.max_wait_seconds):
            if candidate.name in self.held:
                job = self.held.pop(candidate.name).job
                job.log.info("job_resuming", reason=reason)
            else:
                claimed, job = self._claim(candidate, reason, now)
                if not claimed:
                    continue
            if job is not None:
                self._session(job)
            return True
        return False

    def _now(self) -> float:
        """The pass's clock (tests give run_once theirs) moved on by the time since."""
        base, at = self._base
        return base + time.monotonic() - at

    def _ready(self, now: float) -> list[Waiting] | None:
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
        return [self.backlog.waiting(name, st, now, self.profiles) for name, st in ready]

    def _held(self, now: float) -> list[Waiting]:
        """Yielded jobs (and claimed ones whose profile was not loaded), as
        candidates beside the inbox's files: their wait starts when they stopped."""
        return [Waiting(name, now - held.since, held.job.priority, held.job.profile.name)
                for name, held in self.held.items() if held.job.profile is not None]

    def _claim(self, candidate: Waiting, reason: str, now: float
               ) -> tuple[bool, Job | None]:
        """Claim a waiting file and prepare its job: (claimed, the job ready to
        run, or None when it already ended or stalled)."""
        name = candidate.name
        self.settler.forget(name)
        try:
            claimed = inbox.claim(self.settings, name, self.leases)
        except OSError as exc:
            self._stalled(name, now, exc, "claim_failed")
            return False, None
        if claimed is None:
            return False, None  # another daemon won the race
        log.info("job_claimed", job=claimed.job, file=name, reason=reason,
                 waited_s=round(candidate.waited, 3))
        self.metrics.claimed()
        return True, self._prepare(claimed.job, now, f"claimed: {reason}", candidate.waited)

    def _prepare(self, name: str, now: float, note: str = "", waited: float = 0.0
                 ) -> Job | None:
        """The job validated and routed, or None when it ended (rejected, ...) or stalled."""
        self.notifier.status(f"preparing {name}")
        try:
            prepared = self.runner.prepare(name, self.profiles, note, waited)
        except OSError as exc:  # other jobs go on; this one is retried later
            self._job_stalled(name, exc)
            return None
        if isinstance(prepared, Outcome):
            self._ended(name, prepared)
            return None
        return prepared

    def _session(self, job: Job) -> None:
        """Run JOB's profile's session: JOB and those that join it on the way."""
        assert job.profile is not None
        if self.pool.engine is not None:
            job.prefer(self.pool.engine.profile)  # a part for the loaded model goes first
        session = self.session = Session(self.runner, job.profile, self._admit,
                                         lambda job, outcome: self._ended(job.name, outcome),
                                         self._job_stalled, self._hold)
        self.metrics.running_jobs(1)
        try:
            session.run([job])
        except OSError as exc:  # a checkpoint failed (disk full): all wait, retried later
            for name in session.abandon():
                self._job_stalled(name, exc)
        finally:
            self.session = None
            self.metrics.running_jobs(0)

    def _hold(self, job: Job) -> None:
        """A job left its session unfinished (it made way, or its next part needs
        another profile): it waits beside the inbox's files, from now."""
        self.held[job.name] = Held(job, self._now())

    def _admit(self, session: Session) -> list[Job] | str:
        """Asked by a running session between engine steps: jobs to join it (files
        and unfinished jobs for its profile, up to max_running_jobs), or YIELD when
        a file for another profile has waited over max_wait_seconds."""
        self.metrics.running_jobs(len(session.running))
        if self.stop.is_set():
            return []
        now = self._now()
        if self.reload.is_set():
            self._reload()
        max_wait = self.settings.scheduling.max_wait_seconds
        loaded = session.profile.name
        candidates = (self._ready(now) or []) + self._held(now)
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
            job = self._prepare(name, now)
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
                _, job = self._claim(candidate, reason, now)
            if job is not None:
                self._join_or_hold(session, job, joining, now)
        if joining:
            self.metrics.running_jobs(len(session.running) + len(joining))
        return joining

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

    def _job_stalled(self, name: str, exc: OSError) -> None:
        self._stalled(name, self._now(), exc, "job_stalled")
        publish.stalled(self.settings, name, exc)

    def _ended(self, name: str, outcome: Outcome | None) -> None:
        self.retry_at.pop(name, None)
        self.leases.release(name)  # finished: nothing left in work/ to own
        if outcome is not None:
            self.notifier.status(f"finished {name}: {outcome.state.value}")
            self.metrics.finished(outcome.bench, outcome.state.value)

    def _keepalive(self, factory: Callable[[Profile], Engine]) -> Callable[[Profile], Engine]:
        """Wrap model loading: it blocks the loop for a minute or more, so a helper
        thread tells systemd the daemon is alive and extends the start timeout."""

        def load(profile: Profile) -> Engine:
            done = threading.Event()
            period = self.beat or 10.0

            def ping() -> None:
                while not done.wait(period):
                    self.notifier.send(WATCHDOG=1 if self.beat else None,
                                       EXTEND_TIMEOUT_USEC=int(period * 3_000_000),
                                       STATUS=f"loading {profile.name} ({profile.model})")

            self.notifier.send(STATUS=f"loading {profile.name} ({profile.model})",
                               EXTEND_TIMEOUT_USEC=int(period * 3_000_000))
            threading.Thread(target=ping, daemon=True, name="batchd-load-keepalive").start()
            try:
                engine = factory(profile)
            finally:
                done.set()
            self.metrics.model(profile.name, profile.model)
            return engine

        return load

    def _progress(self, record: dict) -> None:
        """After an engine step: the loop is healthy; say what it does."""
        self.metrics.progress(record)
        if self.beat:
            self.notifier.send(WATCHDOG=1)
        counts = record.get("request_counts") or {}
        rate = (record.get("throughput") or {}).get("requests_per_s") or 0
        done = counts.get("completed", 0) + counts.get("failed", 0)
        running = len(self.session.running) if self.session is not None else 1
        others = f" (+{running - 1} more running)" if running > 1 else ""
        self.notifier.status(f"{record['job']}: {done}/{counts.get('total', 0)}, "
                             f"{rate:.1f} req/s, {record.get('profile')}{others}")

    def _stalled(self, what: str, now: float, exc: OSError, event: str) -> None:
        self.retry_at[what] = now + self.retry_seconds
        message = f"{exc.strerror or exc} ({exc.filename or ''}); retrying in " \
                  f"{self.retry_seconds:.0f}s"
        log.error(event, job=what, error=message)
        self.notifier.status(f"{what}: stalled: {message}")

    def waiting(self) -> bool:
        """Whether eligible files are still settling in the inbox."""
        return any(inbox.is_regular(st) and name not in self.reported
                   for name, st in inbox.scan(self.settings.inbox))

    # -- the loop --------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        self.setup()
        self.watcher = Watcher(self.settings.inbox, self.settings.watch.mode,
                               self.settings.watch.poll_interval)
        self.watcher.start()
        self.leases.start()
        idle = f"idle, watching {self.settings.inbox}"
        self.notifier.send(READY=1, STATUS=idle)
        log.info("daemon_ready", inbox=str(self.settings.inbox), once=once)
        beat = self.beat
        timeout = min(self.settings.watch.poll_interval, self.settings.watch.settle_seconds
                      or self.settings.watch.poll_interval, beat or 3600)
        last_work = self.clock()
        # The handlers stay in place through the shutdown below, so a second
        # SIGTERM while the engine closes still exits at once (status 143).
        with handle_signals(self.stop, self.reload):
            try:
                while not self.stop.is_set():
                    if beat:
                        self.notifier.send(WATCHDOG=1)
                    if self.reload.is_set():
                        self._reload()
                    if self.run_once():
                        last_work = self.clock()
                        continue
                    if once and not self.waiting():
                        break
                    self.notifier.status(self._unload_if_idle(last_work) or idle)
                    self.watcher.wake.wait(timeout)
                    self.watcher.wake.clear()
            finally:
                # Releasing the engine can take a while on a large model: ask systemd
                # for time beyond TimeoutStopSec rather than be killed mid-shutdown.
                self.notifier.send(STOPPING=1, STATUS="stopping",
                                   EXTEND_TIMEOUT_USEC=60_000_000)
                log.info("daemon_stopping")
                self._release_held()
                self.watcher.stop()
                self.leases.stop()
                self.pool.close()
        return 0

    def _release_held(self) -> None:
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

    def _unload_if_idle(self, last_work: float) -> str | None:
        """After engine.idle_unload_seconds without work, free the model (its
        process exits). Returns the idle status line that says so."""
        after = self.settings.engine.idle_unload_seconds
        engine = self.pool.engine
        if engine is not None and after and self.clock() - last_work >= after:
            log.info("engine_idle_unloaded", profile=engine.profile.name, idle_s=after)
            self.pool.close()
            self.metrics.model(None, None)
            self.unloaded = f"idle, {engine.profile.name} unloaded after {after:g}s " \
                            f"without work, watching {self.settings.inbox}"
        if self.pool.engine is not None:
            self.unloaded = None
        return self.unloaded

    def _reload(self) -> None:
        self.reload.clear()
        self.backlog.reloaded()
        self.profiles = ProfileSet.load(self.settings.routing.profiles_dir)
        for error in self.profiles.errors:
            log.error("profile_invalid", error=error)
        log.info("profiles_reloaded", profiles=sorted(self.profiles.profiles))


@contextlib.contextmanager
def handle_signals(stop: threading.Event, reload: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT: stop after the current step (the second one exits at once,
    which is safe: the checkpoint is durable and resume skips answered lines).
    SIGHUP: reload profiles between jobs. Previous handlers are restored on exit."""

    def on_stop(signum: int, _frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    def on_hup(_signum: int, _frame: object) -> None:
        reload.set()

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
