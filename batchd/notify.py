"""sd_notify without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

A no-op when the variable is unset (not run by systemd). Abstract socket
names, written ``@name``, are supported.
"""

from __future__ import annotations

import os
import socket


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
