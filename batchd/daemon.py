"""The daemon's one loop: every turn it claims what has settled, steps the
session of the loaded profile (batchd/jobs/session.py), ends cancelled and
expired jobs, reloads profiles on SIGHUP and pings systemd's watchdog, each in
one place; its signal handlers and what it tells systemd (the sd_notify wire
protocol itself is notify.py; the engine process ignores SIGTERM and SIGINT on
its own, engine/host.py).

``run_once(now)`` is one turn and says whether it did work; ``run()`` repeats
it until stopped; ``--once`` drains the spool and returns. Signal handlers
only set flags; the loop acts on them. docs/ARCHITECTURE.md, "The loop", has
a picture of one turn.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Callable

import structlog

from .admission import Admission
from .clock import Clock, Wall, monotonic
from .clock import wall as clock_wall
from .config import Settings
from .engine import Engine, EnginePool
from .engine.cluster import require_ray
from .engine.hosted import engine_factory, reap_engines
from .hooks import Hooks
from .jobs.job import Job
from .jobs.prepare import requested_ending
from .jobs.publish import Outcome
from .jobs.session import Drain, Left, Session
from .owner import CHECK_SECONDS, Owned
from .profiles import Profile, ProfileSet
from .report import Report
from .signals import handle_signals
from .spool import inbox
from .spool.cache import ResultCache
from .spool.lease import Leases
from .spool.watcher import Wakeup, Watcher

log = structlog.get_logger()

REAP_SECONDS = 60.0  # how often an idle daemon ends engines left by daemons killed since


class Daemon:
    def __init__(self, settings: Settings, profiles: ProfileSet | None = None,
                 factory: Callable[[Profile], Engine] | None = None, clock: Clock = monotonic,
                 wall: Wall = clock_wall):
        self.settings = settings
        self.profiles = profiles or ProfileSet.load(settings.routing.profiles_dir)
        self.clock = clock  # the loop's clock; run_once(now) takes a test's
        self.wall = wall  # the other: file mtimes and deadlines (clock.py)
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.wake = Wakeup()  # the watcher's "look again", also heard inside a stream
        self.report = Report(settings, wall)
        self.pool = EnginePool(self.report.loading(factory or engine_factory(settings,
                                                                             self.wake)),
                               clock)
        self.leases = Leases(settings.layout, settings.scheduling.lease_seconds, wall)
        cache = settings.cache
        results = ResultCache(cache.folder or settings.layout.cache, int(cache.size_limit)) \
            if cache.enabled else None
        self.admission = Admission(settings, self.leases, self.report.metrics, self.profiles,
                                   results, self.wake, self.report.registry, wall)
        self.owned = Owned(settings, self.admission, self.leases)
        self.hooks = Hooks(settings, self.report.metrics.webhook)
        self.watcher: Watcher | None = None
        self.unloaded: str | None = None  # the idle status after an idle unload
        self.session: Session | None = None  # the jobs running now
        self.reaped = self.checked = float("-inf")

    def setup(self) -> None:
        os.umask(self.settings.spool.umask)
        inbox.ensure_dirs(self.settings)
        inbox.check_writable(self.settings)
        for error in self.profiles.errors:
            log.error("profile_invalid", error=error)
        for key, instead in self.settings.retired().items():
            log.warning("config_key_retired", key=key, instead=instead)
        if self.settings.cluster.ray_address:
            require_ray()  # a clear refusal now, not a failed load at the first job
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

    # -- one turn --------------------------------------------------------------

    def run_once(self, now: float | None = None) -> bool:
        """One turn of the loop: reload profiles on SIGHUP, tell systemd the loop
        lives, let admission claim what has settled (a session starts with the
        first job, later ones join it), end cancelled and expired jobs, then one
        step of the session. True when something was done."""
        now = self.clock() if now is None else now
        if self.stop.is_set():
            return False
        if self.reload.is_set():
            self._reload()
        self.report.ping(now)
        self.owned.lost(self.session)
        try:
            worked = self._admit(now)
        except OSError as exc:  # the spool itself failed (a scan, a lease): look later
            log.error("spool_error", error=f"{exc.strerror or exc} ({exc.filename or ''})")
            self.admission.look_later(now)
            worked = False
        if self.session is not None:
            try:
                worked = self._step(now) or worked
            except OSError as exc:  # a checkpoint failed (disk full): all wait, retried later
                self._abandon(now, exc)
                worked = True
        looked = self.owned.look(now, paced=self.watcher is not None)
        self._ended(looked.ended)
        if self.report.registry.due(now):  # once a second, not built every turn
            session, engine = self.session, self.pool.engine
            replicas = getattr(engine, "replica_lines", None)  # engine replicas
            self.report.alive(now, session.profile.name if session is not None else
                              engine.profile.name if engine is not None else None,
                              list(session.running) if session is not None else [],
                              replicas() if replicas is not None else [])
        return looked.worked or worked

    def _abandon(self, now: float, exc: OSError) -> None:
        """The session cannot go on (a disk full or gone read-only): what left it
        before the error still counts; every job still in it stalls (it keeps its
        checkpoint in work/ and is tried again later)."""
        session = self.session
        if session is None:
            return
        self._left(session.take_left(), now)
        for name in session.abandon():
            self.admission.job_stalled(name, now, exc)
        self._end_session()

    def _admit(self, now: float) -> bool:
        session = self.session
        if session is None:
            engine = self.pool.engine
            found = self.admission.first(now, engine.profile.name if engine else None)
            self._ended(found.ended)
            if found.jobs:
                job = found.jobs[0]
                if engine is not None:
                    job.prefer(engine.profile)  # a part for the loaded model goes first
                assert job.profile is not None
                self.session = Session(self.settings, self.pool, job.profile)
                self._add(self.session, job, now)
                if not self.session.running:
                    self.session = None
            return found.worked
        found = self.admission.admit(session, now)
        self._ended(found.ended)
        if found.overdue:
            try:
                session.drain(Drain.YIELD)
            except OSError as exc:
                self._abandon(now, exc)
                return True
            self._left(session.take_left(), now)
            self._end_session()
            return True
        for job in found.jobs:
            self._add(session, job, now)
        return found.worked

    def _add(self, session: Session, job: Job, now: float) -> None:
        try:
            session.add(job)
        except OSError as exc:  # its checkpoint or input could not be read: later
            session.remove(job.name)
            try:
                job.ckpt.close()
            except OSError:
                pass
            self.admission.job_stalled(job.name, now, exc)

    def _step(self, now: float) -> bool:
        session = self.session
        assert session is not None
        # a stat a job every CHECK_SECONDS, not on every engine step (every turn
        # when turns are driven by hand, without a watcher: tests)
        if self.watcher is None or now >= self.checked + CHECK_SECONDS:
            self.checked = now
            for name, r in list(session.running.items()):
                ending = requested_ending(r.job)
                if ending is not None:
                    session.leave(name, ending)
                    self._left(session.take_left(), now)
        turn = session.step(now)
        self._left(session.take_left(), now)
        for record in turn.progress:
            self.report.progress(record, len(session.running))
        if not session.running:
            self._admit(now)  # what waits for this profile joins before the stream ends
            self._left(session.take_left(), now)  # one the cache answered whole, at once
        self.report.metrics.running_jobs(len(session.running))
        if not session.running and self.session is session:
            self._end_session()
        return turn.worked

    def _left(self, left: list[Left], now: float) -> None:
        """Jobs out of the session: ended, stalled, or waiting their turn here."""
        for item in left:
            if item.outcome is not None:
                self._ended([(item.job.name, item.outcome)])
            elif item.error is not None:
                self.admission.job_stalled(item.job.name, now, item.error)
            else:
                self.admission.hold(item.job, now)

    def _ended(self, ended: list[tuple[str, Outcome]]) -> None:
        for name, outcome in ended:
            self.admission.ended(name)
            self.leases.release(name)  # finished: nothing left in work/ to own
            self.report.finished(name, outcome)
            self.hooks.wake()

    def _end_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        self.report.metrics.running_jobs(0)

    # -- the loop --------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        self.setup()
        self.watcher = Watcher(self.settings.inbox, self.settings.watch.mode,
                               self.settings.watch.poll_interval, self.wake)
        self.watcher.start()
        self.admission.watcher = self.watcher
        self.leases.start()
        self.hooks.start()
        idle = f"idle, watching {self.settings.inbox}"
        self.report.notifier.send(READY=1, STATUS=idle)
        log.info("daemon_ready", inbox=str(self.settings.inbox), once=once)
        last_work = self.clock()
        # The handlers stay in place through the shutdown below, so a second
        # SIGTERM while the engine closes still exits at once (status 143).
        with handle_signals(self.stop, self.reload):
            try:
                while not self.stop.is_set():
                    if self.run_once():
                        last_work = self.clock()
                        continue
                    if self.session is not None and self.session.stream is not None:
                        continue  # the stream itself waits for the engine's next answers
                    if once and self.drained():
                        break
                    now = self.clock()
                    if self.session is None:
                        self.report.notifier.status(self._unload_if_idle(last_work) or idle)
                        self._reap(now)
                    self.wake.wait(self._wait(now))
            finally:
                # Releasing the engine can take a while on a large model: ask systemd
                # for time beyond TimeoutStopSec rather than be killed mid-shutdown.
                self.report.notifier.send(STOPPING=1, STATUS="stopping",
                                          EXTEND_TIMEOUT_USEC=60_000_000)
                log.info("daemon_stopping")
                if self.session is not None:
                    try:
                        self.session.drain(Drain.STOP)
                    except OSError as exc:  # the checkpoints stay; the next start resumes
                        log.error("job_stalled", jobs=sorted(self.session.running),
                                  error=str(exc))
                    self._end_session()
                self.admission.release_held()
                self.report.registry.remove()
                self.watcher.stop()
                self.leases.stop()
                self.pool.close()
                self.hooks.stop()
        return 0

    def drained(self) -> bool:
        """Nothing running and nothing waiting to be claimed: where `run --once`
        ends (after a turn that did no work)."""
        return self.session is None and not self.admission.waiting()

    def _wait(self, now: float) -> float:
        """How long the loop may sleep: until the spool is due a look, a reload
        after an engine death is due, or the watchdog wants a ping."""
        until = self.admission.next_look
        if self.session is not None:
            until = min(until, self.session.load_at)
        until = min(until, self.report.next_ping())
        return min(max(until - now, 0.0), self.settings.watch.poll_interval)

    def _reap(self, now: float) -> None:
        """Idle: end engines left by daemons of this host killed since we started."""
        if now - self.reaped >= REAP_SECONDS:
            self.reaped = now
            reap_engines(self.settings, starting=False)

    def _unload_if_idle(self, last_work: float) -> str | None:
        """After engine.idle_unload_seconds without work, free the model (its
        process exits). Returns the idle status line that says so."""
        after = self.settings.engine.idle_unload_seconds
        engine = self.pool.engine
        if engine is not None and after and self.clock() - last_work >= after:
            log.info("engine_idle_unloaded", profile=engine.profile.name, idle_s=after)
            self.pool.close()
            self.report.metrics.model(None, None)
            self.unloaded = f"idle, {engine.profile.name} unloaded after {after:g}s " \
                            f"without work, watching {self.settings.inbox}"
        if self.pool.engine is not None:
            self.unloaded = None
        return self.unloaded

    def _reload(self) -> None:
        self.reload.clear()
        self.profiles = ProfileSet.load(self.settings.routing.profiles_dir)
        self.admission.reloaded(self.profiles)
        for error in self.profiles.errors:
            log.error("profile_invalid", error=error)
        log.info("profiles_reloaded", profiles=sorted(self.profiles.profiles))
