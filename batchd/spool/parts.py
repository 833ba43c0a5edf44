"""The files of a job in parts, under ``work/JOB.parts/`` (batchd/jobs/parts.py
runs them). Every file has one writer, so no file is appended to by two hosts:

- ``plan.json``: what every part runs with, written once (atomically) by the
  daemon that owns the job, after its ``K.lines`` files;
- ``K.lines``: part K's requests, 8 bytes each (the line number in the top 24
  bits, its byte offset in the input below), in the order they run;
- ``K.lease``: which daemon runs part K (spool/lease.py, as a job's lease);
- ``K.HOST~PID.ckpt.jsonl``: part K's answers given by that daemon; one that
  takes the part over reads the others' and writes its own;
- ``K.HOST~PID.progress.json``: that daemon's account of part K (replaced
  atomically): its state, counts and time, for the owner's status lines and
  the bench record's ``workers``.
"""

from __future__ import annotations

import json
import os
import shutil
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..layout import PART_SEP, PARTS, Layout
from .lease import hostname
from .outbox import write_atomic

PLAN = "plan.json"
OFFSET_BITS = 40  # byte offsets up to 1 TiB; line numbers in the 24 bits above


@dataclass(frozen=True)
class Plan:
    """What the parts of JOB run with: the job's routing and sidecar, decided once."""

    job: str
    parts: int
    profile: str  # the job's profile (for a file whose lines name several, the first)
    profiles: list[str]  # the profiles with lines, first named first
    routes: dict[str, str | None] | None  # a line's model -> its profile (per-line routing)
    sampling: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    deadline: str | None = None  # ISO time the job expires, if it has a window
    cache: bool = False
    created: float = 0.0  # wall-clock seconds (time.time) the parts were cut
    order: str = "input"  # the order its requests run in: "prefix" or "input"


def pack(line: int, offset: int) -> int:
    return (line << OFFSET_BITS) | offset


def unpack(entry: int) -> tuple[int, int]:
    return entry >> OFFSET_BITS, entry & ((1 << OFFSET_BITS) - 1)


def part_name(job: str, k: int) -> str:
    return f"{job}{PART_SEP}{k}"


def split_name(name: str) -> tuple[str, int] | None:
    """(job, part) for a part's name JOB#K; None for a job's."""
    job, sep, k = name.partition(PART_SEP)
    return (job, int(k)) if sep and k.isdigit() else None


def write_plan(layout: Layout, plan: Plan, pieces: list[array]) -> None:
    folder = layout.parts(plan.job)
    folder.mkdir(exist_ok=True)
    for k, piece in enumerate(pieces):
        write_atomic(folder / f"{k}.lines", [piece.tobytes()])
    write_atomic(folder / PLAN, [json.dumps(asdict(plan)).encode() + b"\n"])


def read_plan(layout: Layout, job: str) -> Plan | None:
    try:
        return Plan(**json.loads((layout.parts(job) / PLAN).read_text()))
    except FileNotFoundError:
        return None


def read_lines(layout: Layout, job: str, k: int) -> array:
    entries = array("Q")
    entries.frombytes((layout.parts(job) / f"{k}.lines").read_bytes())
    return entries


def _holder(daemon: str | None = None) -> str:
    return (daemon or f"{hostname()}:{os.getpid()}").replace(":", "~")


def own_checkpoint(layout: Layout, job: str, k: int) -> Path:
    """This daemon's checkpoint of part K."""
    return layout.parts(job) / f"{k}.{_holder()}.ckpt.jsonl"


def checkpoints(layout: Layout, job: str, k: int | None = None) -> list[Path]:
    """Every daemon's checkpoint of part K (of every part when K is None)."""
    pattern = "*.ckpt.jsonl" if k is None else f"{k}.*.ckpt.jsonl"
    return sorted(layout.parts(job).glob(pattern))


def write_progress(layout: Layout, job: str, k: int, record: dict[str, Any]) -> bool:
    """This daemon's account of part K; False when the job's parts are gone
    (another daemon published it meanwhile)."""
    try:
        write_atomic(layout.parts(job) / f"{k}.{_holder()}.progress.json",
                     [json.dumps(record).encode() + b"\n"])
    except FileNotFoundError:
        return False
    return True


def progress(layout: Layout, job: str) -> dict[int, list[dict[str, Any]]]:
    """Every daemon's account of each part, by part number."""
    found: dict[int, list[dict[str, Any]]] = {}
    try:
        entries = list(os.scandir(layout.parts(job)))
    except FileNotFoundError:
        return found
    for entry in entries:
        head, _, rest = entry.name.partition(".")
        if not head.isdigit() or not rest.endswith(".progress.json"):
            continue
        try:
            record = json.loads(Path(entry.path).read_text())
        except (OSError, ValueError):
            continue  # replaced as we read it: the next look sees it
        found.setdefault(int(head), []).append(record)
    return found


def split_jobs(layout: Layout) -> list[str]:
    """Jobs in work/ that run in parts (their plan written), oldest first."""
    jobs = []
    try:
        entries = list(os.scandir(layout.work))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.endswith(PARTS) and not entry.name.startswith("."):
            try:
                jobs.append((os.stat(Path(entry.path) / PLAN).st_mtime_ns,
                             entry.name[: -len(PARTS)]))
            except FileNotFoundError:
                continue  # still being cut, or published
    return [job for _, job in sorted(jobs)]


def remove(layout: Layout, job: str) -> None:
    shutil.rmtree(layout.parts(job), ignore_errors=True)
