"""Leases: which daemon owns a job in ``work/`` when several share a spool.

``work/JOB.lease`` holds the owner's host and pid; its mtime is the owner's
heartbeat, refreshed by a thread every ``lease_seconds / 4``. A job is taken
over only when its owner is provably gone: on the same host, its pid is dead;
on another host (a spool shared over NFS), its heartbeat is older than
``lease_seconds``. Creation uses ``O_EXCL`` and a takeover first renames the
stale lease away, so of several daemons racing for an orphan exactly one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import structlog

from ..layout import Layout

log = structlog.get_logger()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Leases:
    def __init__(self, layout: Layout, lease_seconds: float):
        self.layout = layout
        self.lease_seconds = lease_seconds
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def path(self, job: str) -> Path:
        return self.layout.lease(job)

    def create(self, job: str) -> bool:
        """Take a job nobody holds; False if someone else got there first."""
        try:
            fd = os.open(self.path(job), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as out:
            json.dump({"host": self.host, "pid": self.pid, "since": time.time()}, out)
        with self._lock:
            self.held.add(job)
        return True

    def acquire(self, job: str) -> bool:
        """Own JOB: it is ours already, unleased, or its owner is gone."""
        path = self.path(job)
        try:
            raw = path.read_text()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return self.create(job)
        try:
            owner = json.loads(raw)
        except ValueError:
            owner = {}  # torn by a crash while it was written
        if owner.get("host") == self.host and owner.get("pid") == self.pid:
            with self._lock:
                self.held.add(job)
            return True
        if not self._gone(owner, mtime):
            return False
        stale = self.layout.stale_lease(job, self.host, self.pid)
        try:
            os.rename(path, stale)  # of several daemons taking over, one wins this
        except FileNotFoundError:
            return False
        if stale.read_text() != raw:  # a fresh lease appeared between read and rename
            os.rename(stale, path)
            return False
        stale.unlink()
        log.warning("job_taken_over", job=job, previous_owner=owner or "unknown")
        return self.create(job)

    def _gone(self, owner: dict, mtime: float) -> bool:
        if owner.get("host") == self.host and isinstance(owner.get("pid"), int):
            return not pid_alive(owner["pid"])
        return time.time() - mtime > self.lease_seconds

    def release(self, job: str) -> None:
        with self._lock:
            self.held.discard(job)
        try:
            self.path(job).unlink()
        except FileNotFoundError:
            pass

    def refresh(self) -> None:
        """The heartbeat: touch every lease this daemon holds."""
        with self._lock:
            jobs = list(self.held)
        for job in jobs:
            try:
                os.utime(self.path(job))
            except OSError:
                pass

    def start(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.lease_seconds / 4):
                self.refresh()

        threading.Thread(target=beat, daemon=True, name="batchd-lease").start()

    def stop(self) -> None:
        self._stop.set()
