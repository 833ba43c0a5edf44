"""sd_notify without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

A no-op when the variable is unset (not run by systemd). Abstract socket
names, written ``@name``, are supported.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


class Notifier:
    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the loop: a datagram socket whose reader lags blocks the
            # sender once its small queue is full; dropping a ping is better.
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: object) -> None:
        """Send ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="idle")``."""
        if self._sock is None or self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()
                             if value is not None)
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError:
            pass  # systemd gone or socket full: never let notification break the daemon

    def status(self, text: str) -> None:
        self.send(STATUS=text)


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for, in seconds, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def keep_alive_while(notifier: Notifier, beat: float | None, status: str,
                     work: Callable[[], T]) -> T:
    """Run WORK (a model load: it blocks the loop for a minute or more) while a
    helper thread tells systemd the daemon is alive (WATCHDOG, when BEAT) and
    extends the start timeout, with STATUS."""
    done = threading.Event()
    period = beat or 10.0

    def ping() -> None:
        while not done.wait(period):
            notifier.send(WATCHDOG=1 if beat else None,
                          EXTEND_TIMEOUT_USEC=int(period * 3_000_000), STATUS=status)

    notifier.send(STATUS=status, EXTEND_TIMEOUT_USEC=int(period * 3_000_000))
    threading.Thread(target=ping, daemon=True, name="batchd-load-keepalive").start()
    try:
        return work()
    finally:
        done.set()
