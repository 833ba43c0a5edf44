"""The daemons of a spool, as they see each other: ``daemons/HOST~PID.json`` beside
``work/``.

Each daemon keeps one small record of itself there (host, pid, the profile it
has loaded, its free job slots, what it runs), replaced atomically when it
changes and at least every ``lease_seconds / 4`` (the file's mtime is its
heartbeat), and removed when it stops. A record is live while its pid lives
(same host) or its heartbeat is younger than ``lease_seconds`` (another host).
Admission reads them so that a file for a profile goes to an idle daemon that
holds that model before a cold one pays a load; ``batchd status`` lists them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..clock import Wall
from ..clock import wall as clock_wall
from ..layout import Layout
from .lease import daemon_id, hostname, pid_alive
from .outbox import write_atomic

RECORD_SECONDS = 1.0  # a changed record is written at most this often


class Registry:
    def __init__(self, layout: Layout, lease_seconds: float, wall: Wall = clock_wall):
        self.folder = layout.daemons()
        self.wall = wall  # records' mtimes (heartbeats) are compared with it (clock.py)
        self.lease_seconds = lease_seconds
        self.me = daemon_id()
        self.path = self.folder / f"{self.me.replace(':', '~')}.json"
        self.written: dict[str, Any] = {}
        self.written_at = self.looked_at = float("-inf")
        self.started = self.wall()

    def due(self, now: float) -> bool:
        """Whether ``beat`` has anything to do: at most every RECORD_SECONDS."""
        return now - self.looked_at >= RECORD_SECONDS

    def beat(self, now: float, profile: str | None, running: list[str], free: int,
             replicas: list[dict[str, Any]] | None = None) -> None:
        """Keep this daemon's record: at once when what it says changed (at most
        every RECORD_SECONDS), else as a heartbeat every lease_seconds / 4.
        REPLICAS: its engine replicas (engine/replicas.py), when it has several."""
        self.looked_at = now
        record = {"daemon": self.me, "host": hostname(), "pid": os.getpid(),
                  "profile": profile, "running": sorted(running), "free": free,
                  "replicas": replicas or []}
        since = now - self.written_at
        if since < RECORD_SECONDS or (record == self.written and
                                      since < self.lease_seconds / 4):
            return
        try:
            self.folder.mkdir(exist_ok=True)
            write_atomic(self.path, [json.dumps({**record, "started": self.started,
                                                 "ts": self.wall()}).encode() + b"\n"])
        except OSError:
            return  # the spool is failing; the loop says so where it matters
        self.written, self.written_at = record, now

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def others(self) -> list[dict[str, Any]]:
        """The live records of the other daemons of the spool."""
        return [r for r in self.all() if r.get("daemon") != self.me and r["live"]]

    def all(self) -> list[dict[str, Any]]:
        """Every record, each with ``live`` and ``age_s``."""
        found = []
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            try:
                record = json.loads(Path(entry.path).read_text())
                age = self.wall() - entry.stat().st_mtime
            except (OSError, ValueError):
                continue
            if record.get("host") == hostname() and isinstance(record.get("pid"), int):
                live = pid_alive(record["pid"])
            else:
                live = age <= self.lease_seconds
            found.append({**record, "live": live, "age_s": round(age, 1)})
        return sorted(found, key=lambda r: str(r.get("daemon")))

    def warm_elsewhere(self, profile: str | None) -> str | None:
        """A live daemon other than this one that has PROFILE loaded and a free
        slot; None when there is none."""
        if profile is None:
            return None
        for record in self.others():
            if record.get("profile") == profile and record.get("free", 0) > 0:
                return str(record["daemon"])
        return None
