"""structlog set-up, done once by the command line: JSON lines when stderr is not
a terminal (journald, files), readable console lines when it is. And where the
engine processes' own output goes (vLLM's and torch's log lines, relayed by
batchd/engine/processes.py): our stdout, for systemd's journal, or a log file while
a person watches the terminal."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def configure(format: str = "auto", level: str = "info") -> None:
    as_json = format == "json" or (format == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if as_json \
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


_engine_output: IO[bytes] | None = None


def engine_output_to(path: Path | None) -> None:
    """Send the engine processes' output to PATH (appended; its folder made), or
    with None to our stdout (the default: systemd's journal takes it there)."""
    global _engine_output
    if _engine_output is not None:
        _engine_output.close()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    _engine_output = open(path, "ab") if path is not None else None


def engine_output() -> IO[bytes]:
    """Where the engine processes' output goes now (one stream, shared by every
    engine's relay: a buffered file writes each line whole under its lock)."""
    return _engine_output if _engine_output is not None else sys.stdout.buffer
