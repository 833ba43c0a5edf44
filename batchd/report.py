"""What a daemon tells the world while it works: systemd (notify.py: READY,
STATUS lines, the watchdog's ping from the loop itself, EXTEND_TIMEOUT while a
model loads), the metrics textfile (metrics.py) and the spool's record of live
daemons (spool/daemons.py). The loop calls it; nothing here decides anything.
"""

from __future__ import annotations

from typing import Any, Callable

from .clock import Wall
from .clock import wall as clock_wall
from .config import Settings
from .engine import Engine
from .jobs.publish import Outcome
from .metrics import Metrics
from .notify import Notifier, keep_alive_while, watchdog_interval
from .profiles import Profile
from .spool.daemons import Registry


class Report:
    def __init__(self, settings: Settings, wall: Wall = clock_wall):
        self.settings = settings
        self.notifier = Notifier()
        self.beat = watchdog_interval()  # systemd's WatchdogSec in seconds, or 0
        self.metrics = Metrics(settings.metrics.textfile)
        self.registry = Registry(settings.layout, settings.scheduling.lease_seconds, wall)
        self.pinged = float("-inf")
        self.replicas_up = ""  # ", replicas 2/2 up" in the STATUS line, with several

    def ping(self, now: float) -> None:
        """The watchdog: at most every second, from the loop itself."""
        if self.beat and now - self.pinged >= min(1.0, self.beat / 4):
            self.notifier.send(WATCHDOG=1)
            self.pinged = now

    def next_ping(self) -> float:
        return self.pinged + min(1.0, self.beat / 4) if self.beat else float("inf")

    def loading(self, factory: Callable[[Profile], Engine]) -> Callable[[Profile], Engine]:
        """FACTORY with model loading told to systemd (notify.keep_alive_while);
        the metrics say which model is loaded."""

        def load(profile: Profile) -> Engine:
            engine = keep_alive_while(self.notifier, self.beat,
                                      f"loading {profile.name} ({profile.model})",
                                      lambda: factory(profile))
            self.metrics.model(profile.name, profile.model)
            return engine

        return load

    def progress(self, record: dict, running: int = 1) -> None:
        """A progress line was written (RUNNING jobs in the session)."""
        self.metrics.progress(record)
        counts = record.get("request_counts") or {}
        rate = (record.get("throughput") or {}).get("requests_per_s") or 0
        done = counts.get("completed", 0) + counts.get("failed", 0)
        others = f" (+{running - 1} more running)" if running > 1 else ""
        self.notifier.status(f"{record['job']}: {done}/{counts.get('total', 0)}, "
                             f"{rate:.1f} req/s, {record.get('profile')}{others}"
                             f"{self.replicas_up}")

    def finished(self, name: str, outcome: Outcome) -> None:
        self.notifier.status(f"finished {name}: {outcome.state.value}")
        self.metrics.finished(outcome.bench, outcome.state.value)

    def alive(self, now: float, profile: str | None, running: list[str],
              replicas: list[dict[str, Any]] | None = None) -> None:
        """This daemon's record in the spool (the loop calls it when the registry
        is due: once a second), with its engine replicas when it has several."""
        self.registry.beat(now, profile, running,
                           self.settings.scheduling.max_running_jobs - len(running),
                           replicas or [])
        self.metrics.replicas(replicas or [])
        up = sum(1 for line in replicas or [] if line.get("state") == "ready")
        self.replicas_up = f", replicas {up}/{len(replicas)} up" if replicas else ""
