"""Retry in place: a job made of another job's failed lines, and the merged file.

``drop_retry`` writes a new job into the inbox from JOB's error lines whose
codes are retryable (by default the ones a second run can fix: the engine
died, the job was cancelled or its window expired), with JOB's profile and
sampling, and ``retry_of``/``retry_codes`` in its sidecar. When that job ends,
``merged`` gives ``NEW.merged.jsonl``: one line per line of JOB's input, in
its order, JOB's answers with the retried ones in place of the failures.
JOB's own files are never changed.

The retried lines are found again at merge time by the same rule (JOB's error
lines with those codes, in line order), so the k-th line of the retry is the
k-th retried line of JOB; error lines from the retry carry JOB's line number
in the merged file.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any, Iterator

import tomli_w

from ..config import Settings
from ..layout import ERRORS, INPUT, JOB_TOML, MERGED, PUBLISHED_INPUT, RESULTS, Layout, is_final
from ..jsonl import open_regular, read_lines
from ..spool.outbox import dumps_line, read_status, write_atomic

RETRYABLE = ("engine_error", "cancelled", "batch_cancelled", "batch_expired")
NO_LIMIT = 1 << 62  # a line is copied whole, whatever the daemon's limit


class RetryError(Exception):
    """Nothing can be retried; the message says why."""


def _errors(layout: Layout, job: str) -> Iterator[dict[str, Any]]:
    with open_regular(layout.out(job, ERRORS)) as stream:
        for raw in stream:
            if raw.strip():
                yield json.loads(raw)


def code_of(error: dict[str, Any]) -> str | None:
    return ((error.get("response") or {}).get("body") or {}).get("error", {}).get("code")


def retried_lines(layout: Layout, job: str, codes: tuple[str, ...] | list[str]) -> list[int]:
    """JOB's input line numbers whose error codes are in CODES, in order."""
    return sorted(e["line"] for e in _errors(layout, job)
                  if isinstance(e.get("line"), int) and code_of(e) in codes)


def _input(layout: Layout, job: str) -> Path:
    published = layout.out(job, PUBLISHED_INPUT)
    return published if published.exists() else layout.failed / f"{job}{INPUT}"


def drop_retry(settings: Settings, job: str, codes: tuple[str, ...] | list[str] = RETRYABLE,
               name: str | None = None, extra: dict[str, Any] | None = None
               ) -> tuple[str, int]:
    """Drop the retry of JOB into the inbox: (its name, its line count). NAME
    defaults to JOB-retry (JOB-retry2, ... when taken); EXTRA goes into its sidecar."""
    layout = settings.layout
    history = read_status(layout.status(job))
    if not history:
        raise RetryError(f"no job {job!r} in {layout.outbox}")
    if not is_final(history[-1].get("state")):
        raise RetryError(f"job {job!r} has not ended (it is {history[-1].get('state')})")
    if not layout.out(job, ERRORS).exists():
        raise RetryError(f"job {job!r} has no errors file")
    lines = set(retried_lines(layout, job, codes))
    if not lines:
        raise RetryError(f"job {job!r} has no failed lines with codes {', '.join(codes)}")
    name = name or _free_name(layout, f"{job}-retry")
    sidecar = _sidecar(layout, job)
    sidecar.update({"retry_of": job, "retry_codes": list(codes), **(extra or {})})
    data = []
    with open_regular(_input(layout, job)) as stream:
        for raw in read_lines(stream, NO_LIMIT):
            if raw.number in lines:
                assert raw.data is not None
                data.append(raw.data if raw.data.endswith(b"\n") else raw.data + b"\n")
    # The media folder and the sidecar first, then the file by rename: the
    # daemon claims them together.
    kept = layout.out_media(job)
    if kept.is_dir():  # its images, as hard links where the filesystem has them
        _link_tree(kept, layout.inbox_media(f"{name}{INPUT}"))
    write_atomic(layout.inbox_sidecar(f"{name}{INPUT}"), [tomli_w.dumps(sidecar).encode()])
    write_atomic(layout.inbox / f"{name}{INPUT}", data)
    return name, len(data)


def _link_tree(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)

    temp = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copytree(source, temp, symlinks=True, copy_function=link)
    os.rename(temp, target)


def _free_name(layout: Layout, stem: str) -> str:
    for n in range(1, 100_000):
        name = stem if n == 1 else f"{stem}{n}"
        if not any(p.exists() for p in (layout.status(name), layout.inbox / f"{name}{INPUT}",
                                         layout.input(name))):
            return name
    raise RetryError(f"no free name for {stem}")


def _sidecar(layout: Layout, job: str) -> dict[str, Any]:
    """JOB's settings as a sidecar: its profile (unless its lines chose theirs),
    sampling defaults, priority and order."""
    try:
        doc = tomllib.loads(layout.out(job, JOB_TOML).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}  # rejected before it was routed: the retry routes as any file
    sidecar: dict[str, Any] = {"priority": doc.get("priority", 0),
                               "sampling": doc.get("sampling", {}),
                               "order": doc.get("order", "prefix")}
    if "parts" not in doc and not str(doc.get("routed_by", "")).startswith("lines' model"):
        sidecar["profile"] = doc["profile"]
    return sidecar


def merged(layout: Layout, original: str, codes: list[str], retry: str,
           retry_input: Path) -> Iterator[bytes]:
    """NEW.merged.jsonl's lines (see the module text); RETRY_INPUT is the
    retry's own input (still in work/ when it publishes)."""
    errors = {e["line"]: e for e in _errors(layout, original) if isinstance(e.get("line"), int)}
    retry_errors = {e["line"]: e for e in _errors(layout, retry)
                    if isinstance(e.get("line"), int)}
    with open_regular(layout.out(original, RESULTS)) as results, \
            open_regular(layout.out(retry, RESULTS)) as retry_results, \
            open_regular(_input(layout, original)) as source, \
            open_regular(retry_input) as again:
        numbers = (raw.number for raw in read_lines(again, NO_LIMIT))
        for raw in read_lines(source, NO_LIMIT):
            error = errors.get(raw.number)
            if error is None:
                yield _next(results, original)
            elif code_of(error) not in codes:
                yield dumps_line(error)
            else:
                number = next(numbers, None)
                if number is None:
                    raise ValueError(f"{retry} has fewer lines than {original} has to retry")
                again_error = retry_errors.get(number)
                if again_error is None:
                    yield _next(retry_results, retry)
                else:
                    yield dumps_line({**again_error, "line": raw.number})


def _next(results: Any, job: str) -> bytes:
    line = results.readline()
    if not line.strip():
        raise ValueError(f"{job}'s results end before its lines do")
    return line if line.endswith(b"\n") else line + b"\n"


def publish_merged(settings: Settings, job: str, retry_of: str, codes: list[str],
                   retry_input: Path) -> str | None:
    """Write outbox/JOB.merged.jsonl; the reason when it cannot be (None: written)."""
    layout = settings.layout
    try:  # nothing is renamed into place unless every line was written
        write_atomic(layout.out(job, MERGED), merged(layout, retry_of, codes, job, retry_input))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no merged file: the outputs of {retry_of} cannot be read ({exc})"
    return None
