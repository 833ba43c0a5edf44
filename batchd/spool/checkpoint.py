"""The checkpoint: every answered line of a running job, appended in `work/`.

One JSON object per line: ``{"line": N, "kind": "result"|"error", "out": {...}}``
where ``out`` is the output line as it will be published, byte for byte, so
publishing copies it out without parsing it. The file is fsynced
at least every ``sync_seconds`` or ``sync_every`` records, whichever comes
first. A torn last record (a crash mid-write) is cut off when the file is
reopened, so appends always start on a clean line.
"""

from __future__ import annotations

import json
import os
import re
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .outbox import dumps_line


class LineSet:
    """A set of line numbers as a bitmap: 1 bit a line, not 60 bytes."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, n: int) -> None:
        byte = n >> 3
        if byte >= len(self._bits):
            self._bits.extend(bytes(byte - len(self._bits) + 1024))
        self._bits[byte] |= 1 << (n & 7)

    def __contains__(self, n: int) -> bool:
        byte = n >> 3
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << (n & 7)))


@dataclass
class Tally:
    """Counts over the answered lines, rebuilt from the checkpoint on resume."""

    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens vLLM's prefix cache already held
    by_model: dict[str, int] = field(default_factory=dict)  # answers by body model (adapter)

    def count(self, kind: str, out: dict[str, Any]) -> None:
        if kind == "result":
            self.completed += 1
            body = (out["result"].get("message") if "result" in out
                    else (out.get("response") or {}).get("body")) or {}
            model = str(body.get("model"))
            self.by_model[model] = self.by_model.get(model, 0) + 1
            if "result" in out:  # an Anthropic line: its message's usage
                usage = (out["result"].get("message") or {}).get("usage") or {}
                self.prompt_tokens += usage.get("input_tokens") or 0
                self.completion_tokens += usage.get("output_tokens") or 0
                self.cached_tokens += usage.get("cache_read_input_tokens") or 0
                return
            usage = (out.get("response") or {}).get("body", {}).get("usage") or {}
            self.prompt_tokens += usage.get("prompt_tokens") or 0
            self.completion_tokens += usage.get("completion_tokens") or 0
            details = usage.get("prompt_tokens_details") or {}
            self.cached_tokens += details.get("cached_tokens") or 0
        else:  # "error", or "errored": an Anthropic line's failure, kept in results
            self.failed += 1


@dataclass
class Checkpoint:
    path: Path
    sync_every: int = 64
    sync_seconds: float = 1.0
    clock: Callable[[], float] = time.monotonic
    done: LineSet = field(default_factory=LineSet)
    tally: Tally = field(default_factory=Tally)
    resumed_lines: int = 0

    def __post_init__(self) -> None:
        good_end = 0
        if self.path.exists():
            for end, record in _records(self.path):
                good_end = end
                if record["line"] not in self.done:
                    self.done.add(record["line"])
                    self.tally.count(record["kind"], record["out"])
                    self.resumed_lines += 1
        self._file = open(self.path, "ab")
        if self._file.tell() != good_end:
            self._file.truncate(good_end)  # drop a torn last record
            self._file.seek(good_end)
        self._unsynced = 0
        self._last_sync = self.clock()

    def add(self, line: int, kind: str, out: dict[str, Any]) -> None:
        """Record one answer unless its line is answered already."""
        if line in self.done:
            return
        self._file.write(_record(line, kind, out))
        self.done.add(line)
        self.tally.count(kind, out)
        self._unsynced += 1
        if self._unsynced >= self.sync_every:
            self.sync()

    def tick(self) -> None:
        """Sync when the time budget is spent; call this often."""
        if self._unsynced and self.clock() - self._last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._unsynced = 0
        self._last_sync = self.clock()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def ordered(self) -> Iterator[tuple[int, str, bytes]]:
        """Every record once, in input line order, in bounded memory: (line,
        kind, the output line's bytes with their newline, as ``dumps_line``
        writes it).

        Keeps one 8-byte offset per line and reads records back by seeking.
        Every record is valid JSON here (opening cut off a torn tail; ``add``
        wrote the rest), so a record in ``add``'s layout is split, not parsed:
        the output line is the bytes between its head and the closing brace.
        """
        self.sync()
        offsets = array("q")
        with open(self.path, "rb") as stream:
            start = 0
            for raw in stream:
                head = _HEAD.match(raw)
                line = int(head[1]) if head else json.loads(raw)["line"]
                if line >= len(offsets):
                    offsets.extend([-1] * (line + 1 - len(offsets)))
                if offsets[line] < 0:
                    offsets[line] = start
                start += len(raw)
            for line, offset in enumerate(offsets):
                if offset >= 0:
                    stream.seek(offset)
                    raw = stream.readline()
                    head = _HEAD.match(raw)
                    if head and raw.endswith(b"}\n"):
                        yield line, head[2].decode(), raw[head.end():-2] + b"\n"
                    else:  # another layout: parse it
                        record = json.loads(raw)
                        yield line, record["kind"], dumps_line(record["out"])


def _record(line: int, kind: str, out: dict[str, Any]) -> bytes:
    """One checkpoint record, valid JSON whose "out" holds the output line's
    bytes exactly as ``dumps_line`` publishes them (``ordered`` cuts them out)."""
    return b'{"line": %d, "kind": "%s", "out": %s}\n' % (line, kind.encode(),
                                                        dumps_line(out)[:-1])


_HEAD = re.compile(rb'\{"line": (\d+), "kind": "(result|errored|error)", "out": ')


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(end offset, record) of every complete record."""
    with open(path, "rb") as stream:
        offset = 0
        for raw in stream:
            offset += len(raw)
            if not raw.endswith(b"\n"):
                return  # torn by a crash mid-write
            try:
                record = json.loads(raw)
            except ValueError:
                return
            yield offset, record
