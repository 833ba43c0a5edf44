"""Which waiting file runs next.

Loading a model costs tens of seconds to minutes, so among the files ready to
claim a daemon prefers those for the profile its engine already holds. A file
that has waited longer than ``scheduling.max_wait_seconds`` goes first
regardless, so no profile starves; sidecar ``priority`` orders within each
group, then age.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        return (w.waited <= max_wait, not (loaded and w.profile == loaded), -w.priority,
                -w.waited)

    def reason(w: Waiting) -> str:
        if w.waited > max_wait:
            return f"waited {w.waited:.0f}s, over max_wait_seconds ({max_wait:.0f}s)"
        if loaded and w.profile == loaded:
            return f"profile {loaded} is already loaded"
        if w.priority:
            return f"priority {w.priority}"
        return "oldest waiting file"

    return [(w, reason(w)) for w in sorted(files, key=key)]
