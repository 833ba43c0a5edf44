"""The validation pass over a JSONL file, shared by the runner and ``batchd
validate``: every line classified once (duplicate custom_ids included), the
request limit enforced, the lines' models counted for routing."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from ..config import LimitsConfig
from ..lines import Dedup, LineError, Request, iter_file_at
from .router import JobRejected, ModelVote


def classified(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Request | LineError]]:
    """(byte offset, Request or LineError) of every non-blank line; a repeated
    custom_id is a LineError (the first line wins)."""
    dedup = Dedup()
    for offset, item in iter_file_at(path, max_line_bytes):
        yield offset, dedup.check(item)


def validate(path: Path, limits: LimitsConfig,
             on_error: Callable[[LineError], None],
             on_request: Callable[[Request, int], None] = lambda request, offset: None,
             every_8192: Callable[[int], None] = lambda lines: None) -> tuple[int, ModelVote]:
    """Classify every line of PATH: ON_ERROR gets each bad line, ON_REQUEST each
    good one with its offset. Returns (lines, model votes); raises JobRejected
    past ``limits.max_requests``."""
    votes = ModelVote()
    total = 0
    for offset, item in classified(path, limits.max_line_bytes):
        total += 1
        if total > limits.max_requests:
            raise JobRejected("too_many_requests", f"more than {limits.max_requests} requests",
                              item.line)
        if isinstance(item, LineError):
            on_error(item)
        else:
            votes.add(item.model, item.line)
            on_request(item, offset)
        if total % 8192 == 0:
            every_8192(total)
    return total, votes
