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
from typing import Callable, Iterator

import structlog

from .admission import Admission
from .config import Settings
from .engine import Engine, EnginePool
from .engine.hosted import engine_factory, reap_engines
from .jobs.job import Job
from .jobs.runner import Outcome, Runner
from .jobs.session import YIELD, Session
from .hooks import Hooks
from .metrics import Metrics
from .notify import Notifier, watchdog_interval
from .profiles import Profile, ProfileSet
from .spool import inbox
from .spool.lease import Leases
from .spool.watcher import Watcher

log = structlog.get_logger()


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
        self.leases = Leases(settings.layout, settings.scheduling.lease_seconds)
        self.metrics = Metrics(settings.metrics.textfile)
        self.admission = Admission(settings, self.runner, self.leases, self.metrics,
                                   self.notifier, lambda: self.profiles, self._ended)
        self.hooks = Hooks(settings, self.metrics.webhook)
        self.watcher: Watcher | None = None
        self.unloaded: str | None = None  # the idle status after an idle unload
        self.session: Session | None = None  # the jobs running now

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
        if self.stop.is_set():
            return False
        loaded = self.pool.engine.profile.name if self.pool.engine is not None else None
        worked, job = self.admission.first(now, loaded)
        if job is not None:
            self._session(job)
        return worked

    def _session(self, job: Job) -> None:
        """Run JOB's profile's session: JOB and those that join it on the way."""
        assert job.profile is not None
        if self.pool.engine is not None:
            job.prefer(self.pool.engine.profile)  # a part for the loaded model goes first
        session = self.session = Session(self.runner, job.profile, self._admit,
                                         lambda job, outcome: self._ended(job.name, outcome),
                                         self.admission.job_stalled, self.admission.hold)
        self.metrics.running_jobs(1)
        try:
            session.run([job])
        except OSError as exc:  # a checkpoint failed (disk full): all wait, retried later
            for name in session.abandon():
                self.admission.job_stalled(name, exc)
        finally:
            self.session = None
            self.metrics.running_jobs(0)

    def _admit(self, session: Session) -> list[Job] | str:
        """Between engine steps: reload profiles on SIGHUP, then ask admission."""
        self.metrics.running_jobs(len(session.running))
        if self.stop.is_set():
            return []
        if self.reload.is_set():
            self._reload()
        joining = self.admission.admit(session)
        if joining and joining != YIELD:
            self.metrics.running_jobs(len(session.running) + len(joining))
        return joining

    def _ended(self, name: str, outcome: Outcome | None) -> None:
        self.admission.retry_at.pop(name, None)
        self.leases.release(name)  # finished: nothing left in work/ to own
        if outcome is not None:
            self.notifier.status(f"finished {name}: {outcome.state.value}")
            self.metrics.finished(outcome.bench, outcome.state.value)
        self.hooks.wake()

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

    # -- the loop --------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        self.setup()
        self.watcher = Watcher(self.settings.inbox, self.settings.watch.mode,
                               self.settings.watch.poll_interval)
        self.watcher.start()
        self.admission.watcher = self.watcher
        self.leases.start()
        self.hooks.start()
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
                    if once and not self.admission.waiting():
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
                self.admission.release_held()
                self.watcher.stop()
                self.leases.stop()
                self.pool.close()
                self.hooks.stop()
        return 0

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
        self.admission.backlog.reloaded()
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
