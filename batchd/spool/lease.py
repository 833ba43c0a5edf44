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

from ..clock import Wall
from ..clock import wall as clock_wall
from ..layout import Layout

log = structlog.get_logger()


def hostname() -> str:
    """This host's name in leases, daemon records and status lines; BATCHD_HOSTNAME
    overrides it (a second host simulated on one machine, a container whose
    hostname changes at every start)."""
    return os.environ.get("BATCHD_HOSTNAME") or socket.gethostname()


def daemon_id() -> str:
    """HOST:PID, how every file of the spool names a daemon."""
    return f"{hostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Leases:
    def __init__(self, layout: Layout, lease_seconds: float, wall: Wall = clock_wall):
        self.layout = layout
        self.wall = wall  # lease files' mtimes are compared with it (clock.py)
        self.lease_seconds = lease_seconds
        self.host = hostname()
        self.pid = os.getpid()
        self.mine: set[str] = set()  # the jobs whose leases this daemon holds
        self.lost: set[str] = set()  # leases another daemon took over while we held them
        self.beaten = time.monotonic()  # the last heartbeat
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
            json.dump({"host": self.host, "pid": self.pid, "since": self.wall()}, out)
        with self._lock:
            self.mine.add(job)
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
                self.mine.add(job)
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

    def free(self, job: str) -> bool:
        """Whether JOB could be taken now: nobody holds it, or its owner is gone
        (``acquire`` still decides who gets it)."""
        path = self.path(job)
        try:
            raw, mtime = path.read_text(), path.stat().st_mtime
        except FileNotFoundError:
            return True
        try:
            owner = json.loads(raw)
        except ValueError:
            owner = {}
        if owner.get("host") == self.host and owner.get("pid") == self.pid:
            return False
        return self._gone(owner, mtime)

    def _gone(self, owner: dict, mtime: float) -> bool:
        if owner.get("host") == self.host and isinstance(owner.get("pid"), int):
            return not pid_alive(owner["pid"])
        return self.wall() - mtime > self.lease_seconds

    def release(self, job: str) -> None:
        """Give JOB's lease up: removed, unless another daemon took it over
        meanwhile (then it is that daemon's, and stays)."""
        with self._lock:
            self.mine.discard(job)
        path = self.path(job)
        try:
            owner = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except ValueError:
            owner = {}  # torn by our own crash: ours to remove
        if owner and (owner.get("host"), owner.get("pid")) != (self.host, self.pid):
            return
        path.unlink(missing_ok=True)

    def refresh(self) -> None:
        """The heartbeat: touch every lease this daemon holds, after checking it is
        still ours (a daemon cut off from the spool for over lease_seconds finds
        its lease taken over: it is lost, never touched again)."""
        with self._lock:
            jobs = list(self.mine)
        for job in jobs:
            self.check(job)
            if job in self.mine:
                try:
                    os.utime(self.path(job))
                except OSError:
                    pass
        self.beaten = time.monotonic()

    def check(self, job: str) -> bool:
        """Whether JOB's lease is still this daemon's; a lease found to be
        another's (or gone) moves from held to lost."""
        try:
            owner = json.loads(self.path(job).read_text())
        except FileNotFoundError:
            owner = {}
        except (OSError, ValueError):
            return True  # unreadable for now (a torn write, NFS): not proof of a loss
        if owner.get("host") == self.host and owner.get("pid") == self.pid:
            return True
        with self._lock:
            if job in self.mine:
                self.mine.discard(job)
                self.lost.add(job)
                log.warning("lease_lost", job=job, now_held_by=owner or None)
        return False

    def overdue(self) -> bool:
        """Whether the heartbeat is late (the process was stopped, the spool hung):
        held leases may have been taken over meanwhile; check before writing."""
        return time.monotonic() - self.beaten > self.lease_seconds / 2

    def take_lost(self) -> set[str]:
        with self._lock:
            lost, self.lost = self.lost, set()
        return lost

    def start(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.lease_seconds / 4):
                self.refresh()

        threading.Thread(target=beat, daemon=True, name="batchd-lease").start()

    def stop(self) -> None:
        self._stop.set()
