"""Reading a JSONL file as bytes, safely: only a regular file is opened (never a
symlink, FIFO or device; checked on the opened descriptor), and its lines are
read one at a time with a bound on each, so one huge line or a huge file never
fills memory. What a line means is ``lines.py``'s business.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator


@dataclass
class RawLine:
    number: int
    data: bytes | None  # None when the line was longer than the limit
    length: int = 0
    offset: int = 0  # where the line starts in the file


def read_lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[RawLine]:
    """Yield every non-blank line with its 1-based number, in bounded memory.

    A line longer than ``max_line_bytes`` is skipped over in pieces and yielded
    with ``data=None``, so one huge line cannot exhaust memory.
    """
    number = 0
    offset = stream.tell()
    while True:
        chunk = stream.readline(max_line_bytes + 1)
        if not chunk:
            return
        number += 1
        start, offset = offset, offset + len(chunk)
        if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
            length = len(chunk)
            while chunk and not chunk.endswith(b"\n"):
                chunk = stream.readline(1 << 20)
                length += len(chunk)
            offset = start + length
            yield RawLine(number, None, length, start)
            continue
        if number == 1 and start == 0 and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]  # a UTF-8 byte order mark, as Windows editors write
        if chunk.strip():
            yield RawLine(number, chunk, len(chunk), start)


class NotRegularFile(OSError):
    """The path is a symlink, FIFO, device or folder: it is never read."""


def open_regular(path: Path) -> BinaryIO:
    """Open PATH for reading only if it is a regular file, without following a
    symlink and without blocking on a FIFO; the check is made on the opened
    descriptor, so a file swapped after an earlier lstat is caught too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "is a symbolic link", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "is not a regular file", str(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
