"""What waits to run, as the scheduler sees it (scheduler.Waiting): the inbox's
files that have settled (their media folders too), and whether another daemon
of the spool is better placed to take one. Admission (admission.py) looks here
every time it looks at the spool, and decides with ``scheduler.order``.
"""

from __future__ import annotations

import os

from .clock import Wall
from .clock import wall as clock_wall
from .config import Settings
from .jobs import publish
from .metrics import Metrics
from .profiles import ProfileSet
from .scheduler import Backlog, Waiting
from .spool import inbox, media
from .spool.daemons import Registry

RENAME_GRACE_SECONDS = 0.02  # how soon a file first seen unsettled is looked at again
DEFER_SECONDS = 2.0  # how long a cold daemon leaves a file to a warm one of the spool


class Candidates:
    def __init__(self, settings: Settings, metrics: Metrics, profiles: ProfileSet,
                 registry: Registry | None = None, wall: Wall = clock_wall):
        self.settings = settings
        self.wall = wall  # a media folder's mtimes are compared with it
        self.metrics = metrics
        self.profiles = profiles
        self.registry = registry  # the spool's other daemons (spool/daemons.py)
        self.settler = inbox.Settler(settings.watch.settle_seconds)
        self.media_settled: set[str] = set()  # inbox files whose media folder has settled
        self.backlog = Backlog(settings.layout, settings.routing.default_profile)
        self.reported: set[str] = set()  # non-regular entries that could not be moved
        self.look_at = float("inf")  # set by ready(): when a settling file would settle

    def reloaded(self, profiles: ProfileSet) -> None:
        self.profiles = profiles
        self.backlog.reloaded()

    def ready(self, now: float, retry_at: dict[str, float]) -> list[Waiting] | None:
        """The inbox's files ready to claim; None when an entry that is not a
        regular file was put aside instead (work done). ``look_at`` is then when
        the first file still settling would settle."""
        ready: list[tuple[str, os.stat_result]] = []
        self.look_at = float("inf")
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
            if retry_at.get(name, 0.0) > now:
                continue
            if not self.settler.settled(name, st, now):
                # look again the moment it would have settled, not a poll later;
                # one seen just now may have come by a rename whose event is a
                # moment behind this scan: look again at once for that too
                due = self.settler.due(name)
                if due - now >= self.settler.settle_seconds:
                    due = min(due, now + RENAME_GRACE_SECONDS)
                self.look_at = min(self.look_at, due)
                settling += 1
                continue
            # its media folder, dropped first, still being written (rsync, a share);
            # walked until seen settled once, not at every look while the file waits
            if name not in self.media_settled:
                wall = self.wall()
                unsettled = media.pending(self.settings.layout.inbox_media(name), wall,
                                          self.settler.settle_seconds)
                if unsettled is not None:
                    self.look_at = min(self.look_at, now + unsettled - wall)
                    settling += 1
                    continue
                self.media_settled.add(name)
            ready.append((name, st))
        self.media_settled.intersection_update(name for name, _ in present)
        self.metrics.waiting(settling + len(ready), settling=settling)
        return [self.backlog.waiting(name, st, now, self.profiles) for name, st in ready]

    def warm_elsewhere(self, candidate: Waiting, loaded: str | None) -> bool:
        """Whether to leave CANDIDATE to another daemon of the spool that has its
        profile loaded and a free slot, while it has waited less than
        DEFER_SECONDS (after that, whoever looks first takes it)."""
        if self.registry is None or candidate.profile in (loaded, None) or \
                candidate.waited >= max(DEFER_SECONDS, 3 * self.settings.watch.poll_interval):
            return False
        return self.registry.warm_elsewhere(candidate.profile) is not None

    def waiting(self) -> bool:
        """Whether eligible files are still settling in the inbox."""
        return any(inbox.is_regular(st) and name not in self.reported
                   for name, st in inbox.scan(self.settings.inbox))
