"""The jobs a daemon answers for outside its session: those held here (they
made way for another profile, or wait for their model or to run alone). The
loop asks each turn (``Owned.look``): a cancel or expiry ends such a job at
once, not when its turn comes. Leases this daemon lost to another one
(``Owned.lost``) take their jobs away here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .admission import Admission
from .config import Settings
from .jobs import publish
from .jobs.job import Job
from .jobs.prepare import requested_ending
from .jobs.publish import Outcome
from .jobs.session import Session
from .layout import Ending
from .spool.lease import Leases

CHECK_SECONDS = 0.1  # how often held jobs' cancel markers and expiries are looked at


@dataclass
class Looked:
    """What one look found: jobs that ENDED, and whether it did any WORK."""

    ended: list[tuple[str, Outcome]] = field(default_factory=list)
    worked: bool = False


class Owned:
    def __init__(self, settings: Settings, admission: Admission, leases: Leases):
        self.settings = settings
        self.admission = admission
        self.leases = leases
        self.checked_held = float("-inf")

    def look(self, now: float, paced: bool = True) -> Looked:
        """Held jobs' cancels and expiries every CHECK_SECONDS (on every call when
        not PACED: turns driven by hand, tests)."""
        found = Looked()
        if not paced or now >= self.checked_held + CHECK_SECONDS:
            self.checked_held = now
            self._end_held(now, found)
        return found

    def lost(self, session: Session | None) -> None:
        """Jobs whose lease another daemon took over (this one was stopped or cut
        off from the spool for over lease_seconds) go, with nothing more written
        for them. After a late heartbeat every lease is checked before the turn
        writes anything."""
        if self.leases.overdue():
            for name in list(self.leases.mine):
                self.leases.check(name)
        if not self.leases.lost:
            return
        for name in self.leases.take_lost():
            if session is not None and name in session.running:
                session.drop(name)
                continue
            held = self.admission.unhold(name)
            if held is not None:
                try:
                    held.job.ckpt.close()
                except OSError:
                    pass

    def _end_held(self, now: float, found: Looked) -> None:
        for name, held in list(self.admission.held.items()):
            ending = requested_ending(held.job)
            if ending is None:
                continue
            self.admission.unhold(name)
            self._publish(name, held.job, ending, now, found)

    def _publish(self, name: str, job: Job, ending: Ending, now: float,
                 found: Looked) -> None:
        try:
            outcome = publish.end(job, ending)
            job.ckpt.close()
        except OSError as exc:
            self.admission.job_stalled(name, now, exc)
            return
        found.ended.append((name, outcome))
        found.worked = True
