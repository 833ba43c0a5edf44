"""The spool seen as Anthropic's Message Batches: what ``batchd api`` serves
under ``/v1/messages/batches``.

A message batch is a job like any other (batches.py): creating one drops its
requests into the inbox as Anthropic batch lines (``{"custom_id", "params"}``,
which the daemon answers in Anthropic's result shape) with a 24-hour window,
so the dashboard, ``batchd status`` and the OpenAI endpoints see it too. The
batch object is built from the job's status file; a finished batch's counts
by result type are read once from its results file and kept.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import tomli_w

from ..clock import iso
from ..layout import INPUT, RESULTS, is_final
from ..spool.outbox import write_atomic
from .batches import Store
from .files import ApiError, _read_json

CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # Anthropic's rule
MAX_REQUESTS = 100_000
WINDOW = timedelta(hours=24)  # Anthropic's batches end within 24 hours
KINDS = ("succeeded", "errored", "canceled", "expired")


def _iso(epoch: int | None) -> str | None:
    return None if epoch is None else iso(epoch)


class MessageBatches:
    def __init__(self, store: Store):
        self.store = store
        self.layout = store.layout
        self._counts: dict[str, dict[str, int]] = {}  # ended batches' result counts
        self._lock = threading.Lock()

    def create(self, requests: list[dict[str, Any]], base_url: str) -> dict[str, Any]:
        if not 1 <= len(requests) <= MAX_REQUESTS:
            raise ApiError(400, f"requests: between 1 and {MAX_REQUESTS} requests",
                           "invalid_value", "requests")
        seen: set[str] = set()
        lines = []
        for i, item in enumerate(requests):
            custom_id, params = item.get("custom_id"), item.get("params")
            if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
                raise ApiError(400, f"requests.{i}.custom_id: 1 to 64 letters, digits, "
                               "'_' or '-'", "invalid_value", f"requests.{i}.custom_id")
            if custom_id in seen:
                raise ApiError(400, f"requests.{i}.custom_id: {custom_id!r} is used twice",
                               "invalid_value", f"requests.{i}.custom_id")
            if not isinstance(params, dict) or set(item) - {"custom_id", "params"}:
                raise ApiError(400, f"requests.{i}: an object of custom_id and params",
                               "invalid_value", f"requests.{i}")
            seen.add(custom_id)
            lines.append(json.dumps({"custom_id": custom_id, "params": params}).encode()
                         + b"\n")
        job = f"msgbatch_{secrets.token_hex(12)}"
        now = datetime.now(timezone.utc)
        record = {"format": "anthropic", "endpoint": "/v1/messages",
                  "completion_window": "24h", "requests": len(lines), "metadata": None,
                  "created_at": int(now.timestamp()), "created": now.timestamp(),
                  "expires_at": int((now + WINDOW).timestamp())}
        write_atomic(self.layout.batch_request(job), [json.dumps(record).encode()])
        name = f"{job}{INPUT}"  # the sidecar first, then the file by rename
        write_atomic(self.layout.inbox_sidecar(name),
                     [tomli_w.dumps({"expires_at": now + WINDOW}).encode()])
        write_atomic(self.layout.inbox / name, lines)
        return self.get(job, base_url)

    def get(self, batch_id: str, base_url: str) -> dict[str, Any]:
        batch = self.store.batch(batch_id)  # 404 unless it is a job, waiting or run
        record = _read_json(self.layout.batch_request(batch_id)) or {}
        ended = is_final(batch["status"])
        # Anthropic has no word for a file not yet claimed (state waiting, OpenAI's
        # validating) or a queued job: both are in_progress, like a running one.
        status = "ended" if ended else "canceling" if batch["status"] == "cancelling" \
            else "in_progress"
        counts = self._ended_counts(batch_id) if ended else None
        if counts is None:
            done = batch["request_counts"]
            total = done["total"] or record.get("requests", 0)
            counts = {"processing": max(0, total - done["completed"] - done["failed"]),
                      "succeeded": done["completed"], "errored": done["failed"],
                      "canceled": 0, "expired": 0}
        ended_at = next((batch[k] for k in ("completed_at", "failed_at", "cancelled_at",
                                             "expired_at") if batch.get(k)), None)
        return {"id": batch_id, "type": "message_batch", "processing_status": status,
                "request_counts": counts, "ended_at": _iso(ended_at) if ended else None,
                "created_at": _iso(batch["created_at"]),
                "expires_at": _iso(batch["expires_at"] or record.get("expires_at")
                                   or batch["created_at"] + int(WINDOW.total_seconds())),
                "archived_at": None,
                "cancel_initiated_at": _iso(batch.get("cancelling_at")),
                "results_url": f"{base_url}v1/messages/batches/{batch_id}/results"
                if ended else None}

    def _ended_counts(self, job: str) -> dict[str, int] | None:
        """An ended batch's counts by result type, from its results file."""
        if job in self._counts:
            return self._counts[job]
        counts = {"processing": 0, **{kind: 0 for kind in KINDS}}
        try:
            with open(self.layout.out(job, RESULTS), "rb") as stream:
                for raw in stream:
                    line = json.loads(raw)
                    result = line.get("result")
                    if isinstance(result, dict) and result.get("type") in counts:
                        counts[result["type"]] += 1
                    else:  # an OpenAI-format line of a mixed file
                        counts["succeeded" if "response" in line and line["response"]
                               .get("status_code") == 200 else "errored"] += 1
        except (OSError, ValueError):
            return None
        with self._lock:
            self._counts[job] = counts
        return counts

    def list(self, base_url: str, before_id: str | None, after_id: str | None,
             limit: int) -> dict[str, Any]:
        """Batches made here, newest first; Anthropic's before_id/after_id pages."""
        made = []
        for path in self.layout.api_batches.glob("*.json"):
            record = _read_json(path)
            if record and record.get("format") == "anthropic":
                made.append((record.get("created") or record.get("created_at", 0), path.stem))
        ids = [job for _, job in sorted(made, reverse=True)]
        if after_id is not None:  # the page after it (older)
            ids = ids[ids.index(after_id) + 1:] if after_id in ids else []
        elif before_id is not None:  # the page before it (newer)
            ids = ids[:ids.index(before_id)][-limit:] if before_id in ids else []
        page = []
        for job in ids[:limit]:
            try:
                page.append(self.get(job, base_url))
            except ApiError:
                continue
        return {"data": page, "has_more": len(ids) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None}

    def cancel(self, batch_id: str, base_url: str) -> dict[str, Any]:
        batch = self.store.batch(batch_id)
        if not is_final(batch["status"]):
            self.store.cancel(batch_id)
        return self.get(batch_id, base_url)

    def results(self, batch_id: str) -> Path:
        batch = self.store.batch(batch_id)
        path = self.layout.out(batch_id, RESULTS)
        if not is_final(batch["status"]) or not path.is_file():
            raise ApiError(404, f"batch {batch_id} has no results yet: it has not ended",
                           "not_found", "batch_id")
        return path

    def delete(self, batch_id: str) -> dict[str, Any]:
        batch = self.store.batch(batch_id)
        if not is_final(batch["status"]):
            raise ApiError(400, f"batch {batch_id} is {batch['status']}: cancel it and wait "
                           "until it has ended to delete it", "invalid_value", "batch_id")
        self.store.delete_job(batch_id)
        with self._lock:
            self._counts.pop(batch_id, None)
        return {"id": batch_id, "type": "message_batch_deleted"}
