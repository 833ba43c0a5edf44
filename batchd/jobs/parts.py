"""One job on every daemon of the spool: a job of more requests than
``[scheduling] part_lines`` runs in parts (CONTRACT 18).

- **Cutting** (``plan``): when the job is validated, its unanswered requests
  are cut, in the order they run (prefix order: along its prefix groups, so
  the lines that share a prefix stay on one engine and keep its prefix cache;
  a group larger than a part is cut in part-sized pieces), into parts of about
  ``part_lines`` (see ``cut``); the plan goes to ``work/JOB.parts/`` (spool/parts.py).
- **Running a part** (``open_part``): any daemon that can run the job's
  profiles takes a free part (unleased, or its daemon gone) like a file, and
  runs it in its session beside its other jobs; the part's name is ``JOB#K``.
  It writes its answers to a checkpoint of its own, reads those another daemon
  wrote before it, and its progress to a file of its own. When its last line
  is answered it says so (``publish.end_part``); a cancel stops it.
- **The owner** (the daemon holding the job's lease; another takes it over
  when it dies) validated and cut the job, writes its status lines from the
  parts' progress files (``look``), and when every part is done publishes the
  job once (``merge``): every part's answers, in input order, exactly as one
  daemon running the whole file would have (publish.py). It alone appends to
  the job's status file.
"""

from __future__ import annotations

import time
from array import array
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..clock import parse_iso, utc_now
from ..config import Settings
from ..layout import JobState, Phase
from ..profiles import Profile, ProfileSet
from ..spool import parts
from ..spool.cache import ResultCache
from ..spool.lease import Leases, daemon_id
from ..spool.parts import Plan, pack, part_name, read_plan
from .job import Job
from .order import family
from .router import Routes

MAX_PARTS = 256  # parts of one job at most: part_lines grows for a larger job


def cut(grouped: Iterable[tuple[int, int, int]], part_lines: int) -> list[array]:
    """(group, line, offset) of every request, in the order they run, into
    parts of about PART_LINES: a group's lines go to the part its first line
    went to, PART_LINES at most (a larger group goes on in the next part); a
    new group starts a new part once the current one is full; group 0 is a
    line of its own. A part can hold up to twice PART_LINES (the followers of
    the groups whose first lines it holds). Each part keeps the run order."""
    entries, owner = array("Q"), array("I")
    fill: list[int] = [0]
    where: dict[int, list[int]] = {}  # group -> [its part, its lines there]
    for group, line, offset in grouped:
        at = where.get(group) if group else None
        if at is None or at[1] >= part_lines:
            if fill[-1] >= part_lines:
                fill.append(0)
            at = [len(fill) - 1, 0]
            if group:
                where[group] = at
        at[1] += 1
        fill[at[0]] += 1
        entries.append(pack(line, offset))
        owner.append(at[0])
    pieces = [array("Q") for _ in fill]
    for entry, k in zip(entries, owner):
        pieces[k].append(entry)
    return [piece for piece in pieces if piece]


def plan(job: Job) -> bool:
    """Cut JOB into parts when it is large enough (or find the plan a daemon
    wrote before a crash); whether it runs in parts."""
    layout = job.layout
    job.plan = read_plan(layout, job.name)
    if job.plan is not None:
        return True
    part_lines = job.settings.scheduling.part_lines
    collected = job.collected
    if not part_lines or collected is None or len(collected.offsets) <= part_lines:
        return False
    assert job.profile is not None
    # at most MAX_PARTS parts: a publication opens every part's checkpoint at once
    part_lines = max(part_lines, -(-len(collected.offsets) // MAX_PARTS))
    pieces = cut(((family(group), *collected._at(index))
                  for group, index in collected.grouped()), part_lines)
    job.plan = Plan(job=job.name, parts=len(pieces), profile=job.profile.name,
                    profiles=[p.name for p in job.parts],
                    routes=dict(job.routes.models) if job.routes else None,
                    sampling=job.sidecar_sampling, priority=job.priority,
                    deadline=job.deadline.isoformat() if job.deadline else None,
                    cache=job.cache is not None, created=time.time(),
                    order=job.order_name)
    parts.write_plan(layout, job.plan, pieces)
    job.log.info("job_split", parts=len(pieces), part_lines=part_lines,
                 sizes=[len(p) for p in pieces][:64])
    return True


def expired(plan: Plan) -> bool:
    """Whether the job's completion window has passed (its owner then ends it)."""
    deadline = parse_iso(plan.deadline) if plan.deadline else None
    return deadline is not None and datetime.now(timezone.utc) >= deadline


def profiles_of(plan: Plan, profiles: ProfileSet) -> list[Profile] | None:
    """The plan's profiles as this daemon knows them; None when it lacks one (it
    then takes none of the job's parts)."""
    found = [profiles.profiles.get(name) for name in plan.profiles]
    return None if any(p is None for p in found) else found  # type: ignore[return-value]


def open_part(settings: Settings, job: str, k: int, profiles: ProfileSet,
              results: ResultCache | None) -> Job | None:
    """Part K of JOB, its lease already taken, ready for a session; None when
    the job is gone (published meanwhile) or this daemon lacks its profiles."""
    plan_ = read_plan(settings.layout, job)
    if plan_ is None:
        return None
    found = profiles_of(plan_, profiles)
    if found is None:
        return None
    part = Job(part_name(job, k), settings, origin=job, part=k)
    part.status = PartStatus(part)  # type: ignore[assignment]
    part.parts = found
    part.profile = found[0]
    part.routes = Routes(tuple(found), plan_.routes) if plan_.routes is not None else None
    part.sidecar_sampling, part.priority = plan_.sampling, plan_.priority
    part.deadline = parse_iso(plan_.deadline) if plan_.deadline else None
    part.cache = results if plan_.cache else None
    part.lines = parts.read_lines(settings.layout, job, k)
    part.total = len(part.lines)
    own = part.checkpoint
    part.open_checkpoint(tuple(p for p in parts.checkpoints(settings.layout, job, k)
                               if p != own))
    part.before = (part.answered, part.ckpt.tally.completion_tokens)
    part.log = part.log.bind(profile=part.profile.name)
    part.log.info("part_taken", part=k, of=plan_.parts, lines=part.total,
                  answered_before=part.answered)
    return part


class PartStatus:
    """A part's progress in its own file, in a status file's place: the owner
    reads it; no daemon appends to another's file."""

    def __init__(self, job: Job):
        assert job.part is not None
        self.job = job
        self.path = job.layout.parts(job.origin)
        self.state: JobState | None = None
        self.last: dict[str, Any] = {}
        self.written_at = 0.0

    def write(self, state: JobState, phase: Phase | None = None, done: bool = False,
              **fields: Any) -> dict[str, Any]:
        job = self.job
        assert job.part is not None
        tally = job.ckpt.tally if hasattr(job, "ckpt") else None
        record = {"ts": utc_now(), "job": job.name, "of": job.origin, "part": job.part,
                  "daemon": daemon_id(), "state": state.value,
                  "phase": None if phase is None else Phase(phase).value, "done": done,
                  "total": job.total,
                  "answered": job.answered if tally else 0,
                  "requests": job.answered - job.before[0] if tally else 0,
                  "output_tokens": tally.completion_tokens - job.before[1] if tally else 0,
                  "generation_s": round(job.gen_s, 3), **fields}
        record.setdefault("message", "")
        parts.write_progress(job.layout, job.origin, job.part, record)
        self.state, self.last, self.written_at = state, record, time.monotonic()
        return record


@dataclass
class Look:
    """What the parts' progress files say about a job in parts."""

    done: bool = False  # every part's last line answered
    running: int = 0  # parts a live daemon runs now
    counts: dict[str, int] = field(default_factory=dict)  # request_counts of the job
    tokens: dict[str, int] = field(default_factory=dict)
    by_part: dict[int, dict[str, Any]] = field(default_factory=dict)  # the furthest record


def look(job: Job, leases: Leases) -> Look:
    """The job's counts over its own checkpoint (the lines validation refused)
    and every part's furthest progress."""
    assert job.plan is not None
    found = Look()
    tally = job.ckpt.tally
    completed, failed = tally.completed, tally.failed
    prompt, completion = tally.prompt_tokens, tally.completion_tokens
    records = parts.progress(job.layout, job.name)
    done = 0
    for k in range(job.plan.parts):
        mine = records.get(k, [])
        if not mine:
            continue
        best = max(mine, key=lambda r: (r.get("done", False), r.get("answered", 0)))
        found.by_part[k] = best
        counts = best.get("request_counts") or {}
        completed += counts.get("completed", 0)  # a part counts its own lines only
        failed += counts.get("failed", 0)
        tokens = best.get("tokens") or {}
        prompt += tokens.get("prompt", 0)
        completion += tokens.get("completion", 0)
        done += bool(best.get("done"))
        found.running += not best.get("done") and not leases.free(part_name(job.name, k))
    found.done = done == job.plan.parts
    found.counts = {"total": job.total, "completed": completed, "failed": failed}
    found.tokens = {"prompt": prompt, "completion": completion}
    return found


def workers(job: Job) -> list[dict[str, Any]]:
    """The bench record's ``workers``: per daemon that ran a part, its answers,
    output tokens and seconds generating, summed over its parts."""
    by: dict[str, dict[str, Any]] = {}
    for records in parts.progress(job.layout, job.name).values():
        for record in records:
            entry = by.setdefault(record["daemon"], {"daemon": record["daemon"], "parts": 0,
                                                     "requests": 0, "output_tokens": 0,
                                                     "generation_s": 0.0})
            entry["parts"] += 1
            entry["requests"] += record.get("requests", 0)
            entry["output_tokens"] += record.get("output_tokens", 0)
            entry["generation_s"] = round(entry["generation_s"] + record.get(
                "generation_s", 0.0), 3)
    return sorted(by.values(), key=lambda e: e["daemon"])


def merge(job: Job) -> None:
    """Before the owner publishes: its checkpoint reopened with every part's
    beside it, so the job's counts and its published files hold every answer."""
    assert job.plan is not None
    if job.resumed is None:
        job.resumed = job.ckpt.resumed_lines > 0  # before the parts' answers count as read
    job.ckpt.close()
    job.open_checkpoint(tuple(parts.checkpoints(job.layout, job.name)))
    # the job generated from its cut to now, on however many daemons
    job.gen_s = max(job.gen_s, time.time() - job.plan.created)
