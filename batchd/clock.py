"""Time, written once: the daemon's one injected clock and the ISO-8601 UTC
timestamps of status lines, records and the API ("2026-12-02T20:33:57.123Z")."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable

Clock = Callable[[], float]  # seconds, monotonic; the daemon's, injected by tests
monotonic: Clock = time.monotonic
# The other clock: seconds since the epoch, for what is compared with file
# mtimes and calendar deadlines (a media folder settling, a completion window);
# injected beside the loop's, so a test moves it instead of sleeping.
Wall = Callable[[], float]
wall: Wall = time.time


def wall_datetime(now: Wall) -> datetime:
    """NOW as an aware datetime in UTC."""
    return datetime.fromtimestamp(now(), timezone.utc)


def utc_now() -> str:
    """Now, as a status line's ``ts``."""
    return iso(time.time())


def iso(epoch: float) -> str:
    """EPOCH seconds as an ISO timestamp in UTC, to the millisecond."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(ts: Any) -> datetime | None:
    """A timestamp as written by ``iso`` (or any ISO-8601 one); None when it is not one."""
    try:
        when = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
