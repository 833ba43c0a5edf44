"""The watcher only wakes the loop: any inbox event means "look again".

inotify (watchdog's native observer) on local filesystems; polling on network
and FUSE filesystems, where inotify misses writes made by other hosts. A file
seen arriving by rename is remembered so the loop claims it without the
settle wait (a rename delivers a complete file).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

log = structlog.get_logger()

NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse", "fuseblk", "sshfs",
              "fuse.sshfs", "9p", "ceph", "glusterfs", "lustre", "afs", "davfs", "virtiofs"}


def filesystem_type(path: Path) -> str:
    """The type of the mount that holds PATH, from /proc/self/mounts."""
    target = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts") as stream:
            for line in stream:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def choose_mode(mode: str, inbox: Path) -> tuple[str, str]:
    """("inotify" | "poll", why)."""
    if mode != "auto":
        return mode, "set in config"
    fstype = filesystem_type(inbox)
    if fstype in NETWORK_FS or fstype.startswith("fuse."):
        return "poll", f"inbox is on {fstype}, where inotify misses remote writes"
    return "inotify", f"inbox is on {fstype}"


class Wakeup:
    """"Look again": set by the watcher's thread, waited on by the loop, and
    selectable (``fileno``), so the loop can also wake from inside an engine
    stream that waits on its engine process's socket (engine/hosted.py)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        # set and clear each keep the event and the pipe in step: a byte left
        # in the pipe with the event clear would wake a stream over and over
        self._lock = threading.Lock()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def set(self) -> None:
        with self._lock:
            if not self._event.is_set():
                self._event.set()
                try:
                    os.write(self._write, b"x")
                except BlockingIOError:
                    pass  # already readable

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        with self._lock:
            self._event.clear()
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def fileno(self) -> int:
        return self._read

    def close(self) -> None:
        """Its pipe's two ends (an engine replica's own wake, engine/hosted.py)."""
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "Watcher"):
        self.watcher = watcher
        self.inbox = os.fsdecode(os.path.abspath(watcher.inbox))

    def on_any_event(self, event: FileSystemEvent) -> None:
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        if event.event_type == "moved" and os.path.dirname(dest) == self.inbox:
            self.watcher.renamed_in(os.path.basename(dest))
        elif os.path.dirname(os.fsdecode(event.src_path)) != self.inbox:
            return  # work/, outbox/, failed/: watched only to pair moves (below)
        self.watcher.wake.set()


class Watcher:
    def __init__(self, inbox: Path, mode: str, poll_interval: float,
                 wake: Wakeup | None = None):
        self.inbox = inbox
        self.mode, self.why = choose_mode(mode, inbox)
        self.poll_interval = poll_interval
        self.wake = wake or Wakeup()
        self._renamed: set[str] = set()
        self._lock = threading.Lock()
        self._observer: Any = None  # a watchdog observer while watching

    def renamed_in(self, name: str) -> None:
        with self._lock:
            self._renamed.add(name)

    def take_renamed(self) -> set[str]:
        with self._lock:
            names, self._renamed = self._renamed, set()
        return names

    def start(self) -> None:
        if self.mode == "inotify":
            # The whole spool, not only the inbox: watchdog holds a move *out* of
            # a watched folder for 0.5 s hoping to pair it, and its queue is FIFO,
            # so each claim (inbox -> work) would delay the next file's event.
            # With work/ watched too, the pair completes at once. Only moves,
            # creations and closes are asked for, so checkpoint and status
            # writes cost nothing.
            observer = Observer()
            observer.schedule(_Handler(self), str(self.inbox.parent), recursive=True,
                              event_filter=[FileCreatedEvent, FileMovedEvent, FileClosedEvent,
                                            DirCreatedEvent, DirMovedEvent])
        else:
            observer = PollingObserver(timeout=self.poll_interval)
            observer.schedule(_Handler(self), str(self.inbox), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        log.info("watching", inbox=str(self.inbox), mode=self.mode, why=self.why)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
