"""The daemon's signals, as a context manager that restores the previous
handlers on exit (the engine process ignores SIGTERM and SIGINT on its own,
engine/host.py). Handlers only set flags; the daemon's loop acts on them."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def handle_signals(stop: threading.Event, reload: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT: stop after the current step (the second one exits at once,
    which is safe: the checkpoint is durable and resume skips answered lines).
    SIGHUP: reload profiles between jobs. Previous handlers are restored on exit."""

    def on_stop(signum: int, _frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    def on_hup(_signum: int, _frame: object) -> None:
        reload.set()

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
