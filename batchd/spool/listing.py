"""What the spool holds, read for people: the job table (`batchd status`, the
dashboard) and the bench records summed by profile (`batchd bench report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Settings
from ..layout import BENCH
from .inbox import safe_stem, scan
from .outbox import read_status


def job_rows(settings: Settings) -> list[dict[str, Any]]:
    """The last status of every job, newest first, plus files still in the inbox."""
    rows = []
    layout = settings.layout
    for _job, path in layout.statuses():
        history = read_status(path)
        if not history:
            continue
        last = history[-1]
        counts = last.get("request_counts") or {}
        rows.append({
            "job": last["job"], "state": last["state"], "phase": last.get("phase"),
            "profile": last.get("profile"),
            "completed": counts.get("completed", 0), "failed": counts.get("failed", 0),
            "total": counts.get("total", 0),
            "output_tokens_per_s": (last.get("throughput") or {}).get("output_tokens_per_s"),
            "eta_s": last.get("eta_s"), "started": history[0]["ts"], "updated": last["ts"],
            "message": last.get("message", ""),
        })
    rows.sort(key=lambda r: r["started"], reverse=True)
    for name, _st in scan(layout.inbox):
        rows.append({"job": safe_stem(name), "state": "waiting", "phase": None,
                     "profile": None,
                     "completed": 0, "failed": 0, "total": 0, "output_tokens_per_s": None,
                     "eta_s": None, "started": None, "updated": None,
                     "message": "in inbox, not claimed yet"})
    return rows


def bench_groups(outbox: Path) -> dict[str, dict[str, Any]]:
    """All bench records in OUTBOX summed by profile: jobs, requests, tokens, seconds."""
    groups: dict[str, dict[str, Any]] = {}
    for path in sorted(outbox.glob(f"*.{BENCH}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        g = groups.setdefault(record.get("profile") or "-", {
            "jobs": 0, "requests": 0, "completion": 0, "total_tokens": 0, "gen": 0.0,
            "load": 0.0, "hardware": record.get("hardware", {})})
        g["jobs"] += 1
        g["requests"] += record["requests"]["succeeded"]
        g["completion"] += record["tokens"]["completion"]
        g["total_tokens"] += record["tokens"]["total"]
        g["gen"] += record["timing_s"]["generation"]
        g["load"] = max(g["load"], record["timing_s"]["model_load"])
    return groups
