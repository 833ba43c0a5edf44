"""What waits to run, as the scheduler sees it (scheduler.Waiting): the inbox's
files that have settled (their media folders too), and the free parts of jobs
in parts on the spool. Admission (admission.py) looks here every time it looks
at the spool, and decides with ``scheduler.order``.
"""

from __future__ import annotations

import os
import time
from typing import Iterable

from .config import Settings
from .jobs import parts, publish
from .layout import PART_SEP
from .metrics import Metrics
from .profiles import ProfileSet
from .scheduler import Backlog, Waiting
from .spool import inbox, media
from .spool import parts as spool_parts
from .spool.daemons import Registry
from .spool.lease import Leases
from .spool.parts import split_name

RENAME_GRACE_SECONDS = 0.02  # how soon a file first seen unsettled is looked at again
DEFER_SECONDS = 2.0  # how long a cold daemon leaves a file to a warm one of the spool
PARTS_AT_ONCE = 2  # parts of one job a daemon runs at once


class Candidates:
    def __init__(self, settings: Settings, leases: Leases, metrics: Metrics,
                 profiles: ProfileSet, registry: Registry | None = None):
        self.settings = settings
        self.leases = leases
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
                wall = time.time()
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
        DEFER_SECONDS (after that, whoever looks first takes it). Never a part:
        the warm daemon takes only PARTS_AT_ONCE of a job; the rest are for all."""
        if self.registry is None or candidate.profile in (loaded, None) or \
                split_name(candidate.name) is not None or \
                candidate.waited >= max(DEFER_SECONDS, 3 * self.settings.watch.poll_interval):
            return False
        return self.registry.warm_elsewhere(candidate.profile) is not None

    def parts(self, now: float, retry_at: dict[str, float], held: Iterable[str],
              profile: str | None = None, running: Iterable[str] = ()) -> list[Waiting]:
        """Free parts of jobs in parts (nobody runs them, or their daemon is gone)
        whose profiles this daemon has (of PROFILE only, when given), as
        candidates beside the inbox's files: they wait from when they were cut.
        A daemon runs at most PARTS_AT_ONCE parts of one job (RUNNING and HELD
        here): one keeps its engine full while the other's last requests finish,
        and the other parts are left to the spool's other daemons."""
        found = []
        layout = self.settings.layout
        mine: dict[str, int] = {}
        held_here = set(held)
        for name in [*running, *held_here]:
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
                if k in ended or name in held_here or name in self.leases.held or \
                        retry_at.get(name, 0.0) > now or not self.leases.free(name):
                    continue
                found.append(Waiting(name, waited, plan.priority, profile or plan.profile))
        return found

    @staticmethod
    def parts_enough(name: str, running: Iterable[str]) -> bool:
        """Whether NAME is a part of a job this daemon already runs PARTS_AT_ONCE of."""
        split = split_name(name)
        if split is None:
            return False
        prefix = split[0] + PART_SEP
        return sum(other.startswith(prefix) for other in running) >= PARTS_AT_ONCE

    def waiting(self) -> bool:
        """Whether eligible files are still settling in the inbox."""
        return any(inbox.is_regular(st) and name not in self.reported
                   for name, st in inbox.scan(self.settings.inbox))
