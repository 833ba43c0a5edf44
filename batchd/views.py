"""What an operator looks at for jobs: the job table, one job, a live follow
(the profiles, bench and daemons reports are in overview.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .clock import parse_iso, utc_now
from .config import Settings
from .layout import ERRORS, RESULTS, STATUS, JobState, is_final
from .spool.listing import WaitingFile
from .spool.outbox import read_status


def _age(ts: str | None) -> str:
    then = parse_iso(ts) if ts else None
    if then is None:
        return "-"
    seconds = time.time() - then.timestamp()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def done_text(completed: int, failed: int, total: int | None, markup: bool = False,
              unit: str = "") -> str:
    """DONE/TOTAL for people, failed lines counted apart: ``4/4``, ``2/2, 2 failed``
    (in red with MARKUP: rich's; UNIT after the count); ``?`` while the total is
    not known yet."""
    done = f"{completed + failed}/{total or '?'}{unit}"
    if not failed:
        return done
    return f"{done}, [red]{failed} failed[/red]" if markup else f"{done}, {failed} failed"


def state_text(state: str, completed: int, failed: int, markup: bool = False) -> str:
    """A job's state, never a plain ``completed`` when every line failed."""
    if state == JobState.COMPLETED.value and failed and not completed:
        return "[red]completed (all failed)[/red]" if markup else "completed (all failed)"
    return state


def _failures_file(outbox: Path, job: str) -> str:
    """Where a job's failed lines are: JOB.errors.jsonl, or its results for an
    Anthropic-format job (whose failures are result lines, as Anthropic's are)."""
    errors = outbox / f"{job}.{ERRORS}"
    try:
        if errors.stat().st_size > 0:
            return errors.name
    except OSError:
        pass
    return f"{job}.{RESULTS}" if (outbox / f"{job}.{RESULTS}").exists() else errors.name


def final_line(record: dict[str, Any], outbox: Path) -> str:
    """The line `status --follow` ends with: how the job ended, its answered and
    failed lines counted apart, where the failures are, and the job's message."""
    counts = record.get("request_counts") or {}
    ok, bad = counts.get("completed", 0), counts.get("failed", 0)
    job, message = record["job"], record.get("message") or ""
    text = f"{job}: {record['state']}"
    if ok or bad or not message:
        text += f": {ok} answered, {bad} failed"
        if bad:
            text += f" \N{EM DASH} see {_failures_file(outbox, job)}"
    return f"{text}: {message}" if message else text


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("JOB", "STATE", "PROFILE", "DONE/TOTAL", "TOK/S", "ETA", "AGE"):
        table.add_column(column)
    for r in rows:
        tps = r["output_tokens_per_s"]
        eta = r["eta_s"]
        state = state_text(r["state"], r["completed"], r["failed"], markup=True)
        if r.get("phase") and not is_final(r["state"]):
            state += f" ({r['phase']})"  # generating side by side, yielded, settling, ...
        table.add_row(r["job"], state, r["profile"] or "-",
                      done_text(r["completed"], r["failed"], r["total"], markup=True),
                      f"{tps:.1f}" if tps else "-", f"{eta:.0f}s" if eta else "-",
                      _age(r["started"]))
    Console().print(table)


def follow_spool(rows: Callable[[], list[dict[str, Any]]], as_json: bool = False,
                 poll: float = 0.5) -> int:
    """`batchd status --follow` without a job: every running and waiting job live,
    one bar each (many run at once on one engine), until none is left."""
    def active() -> list[dict[str, Any]]:
        return [r for r in rows() if not is_final(r["state"])]

    if as_json:
        while True:
            frame = active()
            print(json.dumps({"ts": utc_now(), "jobs": frame}), flush=True)
            if not frame:
                return 0
            time.sleep(poll)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.fields[done]}"),
               TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[state]}"))
    tasks: dict[str, Any] = {}
    with Progress(*columns, console=Console()) as progress:
        while True:
            now = {r["job"]: r for r in active()}
            for job, r in now.items():
                if job not in tasks:
                    tasks[job] = progress.add_task(job, total=None, tps="-", state="",
                                                   done=done_text(0, 0, None, unit=" req"))
                tps = r["output_tokens_per_s"]
                progress.update(tasks[job], total=r["total"] or None,
                                completed=r["completed"] + r["failed"],
                                done=done_text(r["completed"], r["failed"], r["total"],
                                               markup=True, unit=" req"),
                                tps=f"{tps:.1f}" if tps else "-",
                                state=f"{r['state']} {r.get('phase') or ''}".rstrip())
            for job in [j for j in tasks if j not in now]:
                progress.update(tasks.pop(job), state="ended", visible=False)
            if not now:
                break
            time.sleep(poll)
    print("no job running or waiting")
    return 0


def print_job(path: Path, as_json: bool = False) -> int:
    history = read_status(path)
    last: dict[str, Any] = history[-1] if history else {
        "job": path.name.removesuffix(f".{STATUS}"), "state": JobState.QUEUED.value,
        "message": "being claimed, no status line yet"}
    if as_json:
        print(json.dumps(last))
    else:
        counts = last.get("request_counts") or {}
        ok, bad = counts.get("completed", 0), counts.get("failed", 0)
        state = str(last.get("state"))
        phase = "" if is_final(state) else f" ({last.get('phase') or ''})"
        print(f"{last.get('job')}: {state_text(state, ok, bad)}{phase} "
              f"profile={last.get('profile') or '-'} "
              f"{ok + bad}/{counts.get('total') or '?'}: {ok} answered, {bad} failed "
              f"{last.get('message', '')}".rstrip())
    return 0


def _waiting_line(record: dict[str, Any]) -> str:
    total = record["request_counts"]["total"]
    size = f"{record['bytes']} bytes" + (f", {total} lines" if total else "")
    # a sidecar's profile when it names one; otherwise the claim routes it
    profile = f"profile={record['profile']} " if record["profile"] else ""
    return (f"{record['job']}: {record['state']} ({record['phase']}) "
            f"{profile}{record['file']} ({size}): {record['message']}")


def print_waiting(waiting: WaitingFile, as_json: bool = False) -> int:
    """`batchd status JOB` of a file still in the inbox: state waiting, its phase."""
    record = waiting.record()
    print(json.dumps(record) if as_json else _waiting_line(record))
    return 0


def follow_waiting(settings: Settings, waiting: WaitingFile, as_json: bool = False,
                   poll: float = 0.5) -> int:
    """`batchd status JOB --follow` of a file still in the inbox: its waiting line
    (again when its phase changes), then, once its claim has made the job's status
    file, the job as follow() shows it, to its final line. 1 when the file leaves
    the inbox without becoming JOB (removed, or claimed under another name)."""
    from .spool.listing import claim_in_flight, waiting_file

    path = settings.layout.status(waiting.job)
    current: WaitingFile | None = waiting
    shown = None
    while True:
        if current is not None and current.phase != shown:
            record = current.record()
            print(json.dumps(record) if as_json else _waiting_line(record), flush=True)
            shown = current.phase
        if path.exists():
            break
        if current is None:
            # The inbox, then a claim in flight, then the status file: a file on
            # its way through the claim is always found by one of them.
            if not claim_in_flight(settings, waiting.job) and not path.exists():
                print(f"{waiting.job}: {waiting.name} left the inbox and no job "
                      f"{waiting.job} was made (removed, or claimed under another name: "
                      "see `batchd status`)", file=sys.stderr)
                return 1
        time.sleep(poll)
        current = waiting_file(settings, waiting.job)
    return follow(path, as_json=as_json, poll=poll)


def follow(path: Path, as_json: bool = False, poll: float = 0.5) -> int:
    """Show a job live until its final status line; exit 0 if it completed."""
    if as_json:
        seen = 0
        while True:
            history = read_status(path)
            for record in history[seen:]:
                print(json.dumps(record), flush=True)
            seen = len(history)
            if history and is_final(history[-1]["state"]):
                return 0 if history[-1]["state"] == "completed" else 1
            time.sleep(poll)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.fields[done]}"),
               TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
               TextColumn("{task.fields[state]}"))
    with Progress(*columns, console=Console()) as progress:
        task = progress.add_task(path.name.removesuffix(f".{STATUS}"), total=None,
                                 tps="-", state="", done=done_text(0, 0, None, unit=" req"))
        while True:
            history = read_status(path)
            last = history[-1] if history else {}
            counts = last.get("request_counts") or {}
            tps = (last.get("throughput") or {}).get("output_tokens_per_s")
            ok, bad = counts.get("completed", 0), counts.get("failed", 0)
            progress.update(task, total=counts.get("total") or None, completed=ok + bad,
                            done=done_text(ok, bad, counts.get("total"), markup=True, unit=" req"),
                            tps=f"{tps:.1f}" if tps else "-",
                            state=f"{state_text(last.get('state', ''), ok, bad, markup=True)} "
                                  f"{last.get('phase') or ''}")
            if last and is_final(last["state"]):
                break
            time.sleep(poll)
    print(final_line(last, path.parent))
    return 0 if last["state"] == "completed" else 1
