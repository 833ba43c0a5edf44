"""Which waiting file runs next.

Loading a model costs tens of seconds to minutes, so among the files ready to
claim a daemon prefers those for the profile its engine already holds. A file
that has waited longer than ``scheduling.max_wait_seconds`` goes first
regardless (the longest wait first), so no profile starves; sidecar
``priority`` orders within each group, then age. Jobs that made way for
another profile (batchd/jobs/session.py) wait here too, from the moment they
stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .jobs.router import JobRejected, hint, read_sidecar
from .layout import Layout
from .profiles import ProfileSet


@dataclass(frozen=True)
class Waiting:
    name: str
    waited: float  # seconds since the daemon first saw the file
    priority: int
    profile: str | None  # where the file will probably route (sidecar, prefix, first line)


def order(files: list[Waiting], loaded: str | None, max_wait: float
          ) -> list[tuple[Waiting, str]]:
    """FILES in the order to claim them, each with the reason, for the status line."""

    def key(w: Waiting) -> tuple:
        if w.waited > max_wait:  # overdue: the longest wait first, whatever is loaded
            return (False, -w.waited)
        return (True, not (loaded and w.profile == loaded), -w.priority, -w.waited)

    def reason(w: Waiting) -> str:
        if w.waited > max_wait:
            return f"waited {w.waited:.0f}s, over max_wait_seconds ({max_wait:.0f}s)"
        if loaded and w.profile == loaded:
            return f"profile {loaded} is already loaded"
        if w.priority:
            return f"priority {w.priority}"
        return "oldest waiting file"

    return [(w, reason(w)) for w in sorted(files, key=key)]


class Backlog:
    """The inbox's waiting files as the scheduler sees them: when each was first
    seen, and its sidecar priority and probable profile, read once per version
    of the file, its sidecar and the profiles (not on every pass of the loop)."""

    def __init__(self, layout: Layout, default_profile: str):
        self.layout = layout
        self.default_profile = default_profile
        self.first_seen: dict[str, float] = {}
        self.peeks: dict[str, tuple[tuple, tuple[int, str | None]]] = {}
        self.reloads = 0  # profile reloads so far: part of a peek's version

    def present(self, names: list[str], now: float) -> None:
        """Forget files that left the inbox; note when new ones were first seen."""
        self.first_seen = {name: self.first_seen.get(name, now) for name in names}
        self.peeks = {name: self.peeks[name] for name in names if name in self.peeks}

    def reloaded(self) -> None:
        self.reloads += 1

    def waiting(self, name: str, st: os.stat_result, now: float, profiles: ProfileSet
                ) -> Waiting:
        sidecar = self.layout.inbox_sidecar(name)
        try:
            side = os.stat(sidecar, follow_symlinks=False).st_mtime_ns
        except OSError:
            side = None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, side, self.reloads)
        cached = self.peeks.get(name)
        if cached is None or cached[0] != key:
            try:
                priority = read_sidecar(sidecar).priority if side is not None else 0
            except JobRejected:
                priority = 0  # the job itself reports the bad sidecar
            cached = self.peeks[name] = (key, (priority, hint(
                self.layout.inbox / name, sidecar, profiles, self.default_profile)))
        return Waiting(name, now - self.first_seen.get(name, now), *cached[1])
