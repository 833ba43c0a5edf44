"""The spool seen as OpenAI's Files and Batches: what ``batchd api`` serves.

A batch is a job: its id is the job name, its state and counts come from
its status file in the outbox, its output and error files are the job's
``results`` and ``errors`` files. Creating a batch drops the uploaded file into
the inbox like any user (sidecar first, then the file by rename), so the daemon
stays the only thing that runs jobs and a dropped file is a batch too.

The API keeps only what the spool has no place for, under ``SPOOL/api/``:
uploaded files (``files/file-ID.jsonl`` + ``file-ID.json``) and each created
batch's request (``batches/JOB.json``: endpoint, window, metadata). Ids come
from those names, so they survive restarts of either process. Every id from a
request is checked against a strict pattern before it names a path.
"""

from __future__ import annotations

import json
import shutil
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import tomli_w

from ..clock import parse_iso
from ..config import Settings
from ..jobs.retry import RETRYABLE, RetryError, drop_retry
from ..jobs.router import parse_window
from ..layout import (BENCH, ERRORS, INPUT, JOB_TOML, MERGED, PUBLISHED_INPUT, RESULTS, JobState,
                      is_final)
from ..layout import STATUS as STATUS_FILE
from ..lines import URLS
from ..spool import inbox
from ..spool.listing import WaitingFile, claim_in_flight, waiting_file, waiting_files
from ..spool.outbox import read_status, write_atomic
from .files import JOB_FILE_KINDS, JOB_ID, UPLOAD_ID, ApiError, Files, _read_json

FINAL_CACHE = 10_000  # finished batches kept built in memory (about 1 KB each)

# Spool state -> OpenAI batch status (a file waiting in the inbox and a queued job
# are not validated yet).
STATUS = {"waiting": "validating", "queued": "validating", "validating": "validating",
          "in_progress": "in_progress", "finalizing": "finalizing", "completed": "completed",
          "failed": "failed", "cancelled": "cancelled", "expired": "expired"}


def _epoch(ts: str | None) -> int | None:
    when = parse_iso(ts) if ts else None
    return int(when.timestamp()) if when else None


class Store:
    """Files and batches over one spool. Stateless apart from a cache of
    finished batches (their status files never change again)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.layout = settings.layout
        self.batches_dir = self.layout.api_batches
        self._final: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.files = Files(settings, self._final_state, self._forget)

    def ensure_dirs(self) -> None:
        inbox.ensure_dirs(self.settings)
        self.files.dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)

    # -- batches ---------------------------------------------------------------

    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None) -> dict[str, Any]:
        if endpoint not in URLS:
            raise ApiError(400, f"endpoint {endpoint!r} is not one of {', '.join(URLS)}",
                           "invalid_value", "endpoint")
        window = parse_window(completion_window)
        if window is None:
            raise ApiError(400, "completion_window must be a duration such as '24h' "
                           "(s, m, h or d)", "invalid_value", "completion_window")
        if not UPLOAD_ID.fullmatch(input_file_id) or self.files.path(input_file_id) is None:
            raise ApiError(404, f"No such File object: {input_file_id}", "file_not_found",
                           "input_file_id")
        if self.files.get(input_file_id)["purpose"] != "batch":
            raise ApiError(400, f"{input_file_id} was not uploaded with purpose 'batch'",
                           "invalid_value", "input_file_id")
        job = f"batch_{secrets.token_hex(12)}"
        now = datetime.now(timezone.utc)
        expires = now + window
        record = {"endpoint": endpoint, "completion_window": completion_window,
                  "metadata": metadata, "input_file_id": input_file_id,
                  "created_at": int(now.timestamp()), "expires_at": int(expires.timestamp())}
        write_atomic(self.layout.batch_request(job), [json.dumps(record).encode()])
        # The sidecar first, then the file by rename: the daemon claims them together.
        name = f"{job}{INPUT}"
        write_atomic(self.layout.inbox_sidecar(name),
                     [tomli_w.dumps({"expires_at": expires}).encode()])
        source = self.files.path(input_file_id)
        assert source is not None
        with open(source, "rb") as stream:
            write_atomic(self.layout.inbox / name, iter(lambda: stream.read(1 << 20), b""))
        return self.batch(job)

    def retry(self, batch_id: str, codes: list[str] | None,
              metadata: dict[str, str] | None) -> dict[str, Any]:
        """A new batch of BATCH_ID's retryable failed lines (``batchd retry``):
        its metadata names the original; its merged file comes when it ends."""
        original = self.batch(batch_id)
        job = f"batch_{secrets.token_hex(12)}"
        now = datetime.now(timezone.utc)
        window = original["completion_window"]
        if parse_window(window) is None:
            window = "24h"  # a dropped file without a window: OpenAI's only one
        expires = now + (parse_window(window) or timedelta(hours=24))
        record = {"endpoint": original["endpoint"], "completion_window": window,
                  "metadata": {**(metadata or {}), "retry_of": batch_id},
                  "input_file_id": f"file-{job}.input",
                  "created_at": int(now.timestamp()), "expires_at": int(expires.timestamp())}
        write_atomic(self.layout.batch_request(job), [json.dumps(record).encode()])
        try:
            drop_retry(self.settings, batch_id, tuple(codes) if codes else RETRYABLE, name=job,
                       extra={"expires_at": expires})
        except RetryError as exc:
            self.layout.batch_request(job).unlink(missing_ok=True)
            raise ApiError(400, str(exc), "nothing_to_retry", "batch_id") from None
        return self.batch(job)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.batch(batch_id)
        if is_final(batch["status"]):
            raise ApiError(409, f"Cannot cancel a batch with status {batch['status']}",
                           "batch_not_cancellable", "batch_id")
        record = self._record(batch_id) or {}
        record.setdefault("cancelling_at", int(time.time()))
        write_atomic(self.layout.batch_request(batch_id), [json.dumps(record).encode()])
        write_atomic(self.layout.cancel(batch_id), [b""])
        return self.batch(batch_id)

    def delete_job(self, job: str) -> None:
        """An ended job's files gone from the outbox (its status file last) and
        the API's record of it: it is no batch any more."""
        shutil.rmtree(self.layout.out_media(job), ignore_errors=True)  # its pictures
        for kind in (RESULTS, ERRORS, BENCH, PUBLISHED_INPUT, JOB_TOML, MERGED, STATUS_FILE):
            self.layout.out(job, kind).unlink(missing_ok=True)
        self.layout.batch_request(job).unlink(missing_ok=True)
        self._forget(job)

    def _forget(self, job: str) -> None:
        with self._lock:
            self._final.pop(job, None)

    def _record(self, job: str) -> dict[str, Any] | None:
        return _read_json(self.layout.batch_request(job))

    def _final_state(self, job: str) -> str | None:
        if job in self._final:
            return self._final[job]["status"]
        history = read_status(self.layout.status(job))
        if history and is_final(history[-1]["state"]):
            return str(history[-1]["state"])
        return None

    def batch(self, batch_id: str,
              waiting: dict[str, WaitingFile] | None = None) -> dict[str, Any]:
        """Batch BATCH_ID; WAITING: the inbox's files by job name, when the caller
        has looked already (the list)."""
        if not JOB_ID.fullmatch(batch_id):
            raise ApiError(404, f"No such Batch object: {batch_id}", "batch_not_found",
                           "batch_id")
        if batch_id in self._final:
            return self._final[batch_id]
        record = self._record(batch_id)
        status = self.layout.status(batch_id)
        history = read_status(status)
        # A dropped file is in the inbox (a job waiting to be claimed), then a claim
        # in work/, then has a status file (spool/inbox.py, claim): looked for in
        # that order, one of the three is always found, also while the daemon
        # claims it.
        pending = None
        if not history and not status.exists():
            pending = waiting.get(batch_id) if waiting is not None \
                else waiting_file(self.settings, batch_id)
        if not history and record is None and pending is None and not (
                claim_in_flight(self.settings, batch_id) or status.exists()):
            raise ApiError(404, f"No such Batch object: {batch_id}", "batch_not_found",
                           "batch_id")
        batch = self._build(batch_id, record or {}, history, pending)
        if is_final(batch["status"]):
            with self._lock:  # routes run in a thread pool
                if len(self._final) >= FINAL_CACHE:
                    del self._final[next(iter(self._final))]  # the oldest entry
                self._final[batch_id] = batch
        return batch

    def _build(self, job: str, record: dict[str, Any], history: list[dict[str, Any]],
               waiting: WaitingFile | None) -> dict[str, Any]:
        last = history[-1] if history else {}
        # Still in the inbox: waiting (settling or in_inbox), OpenAI's validating.
        state = last.get("state", (JobState.WAITING if waiting else JobState.QUEUED).value)
        final = is_final(state)
        status = STATUS.get(state, "validating")
        firsts: dict[str, int | None] = {}
        for line in history:
            firsts.setdefault(line.get("state", ""), _epoch(line.get("ts")))
        if status == "validating" and "in_progress" in firsts:
            status = "in_progress"  # queued again after a restart: it had begun
        cancel_asked = self.layout.cancel(job).exists()
        if not final and (cancel_asked or "cancelling_at" in record):
            status = "cancelling"
        counts = last.get("request_counts") or {}
        tokens = last.get("tokens") or {}
        created = record.get("created_at") or (_epoch(history[0].get("ts")) if history else None)
        if created is None:
            created = int(waiting.mtime) if waiting else int(time.time())
        errors = None
        if last.get("errors"):
            errors = {"object": "list", "data": [
                {"code": e.get("code"), "message": e.get("message"), "line": e.get("line"),
                 "param": None} for e in last["errors"]]}
        outputs = {kind: f"file-{job}.{kind}" if final and
                   self.layout.out(job, JOB_FILE_KINDS[kind][0]).is_file() else None
                   for kind in ("results", "errors", "merged")}
        if outputs["errors"] and self.layout.out(job, ERRORS).stat().st_size == 0:
            outputs["errors"] = None
        return {
            "id": job, "object": "batch",
            "endpoint": record.get("endpoint") or self._endpoint(job, waiting),
            "errors": errors,
            "input_file_id": record.get("input_file_id") or f"file-{job}.input",
            "completion_window": record.get("completion_window") or "none",
            "status": status,
            "output_file_id": outputs["results"], "error_file_id": outputs["errors"],
            "created_at": created,
            "in_progress_at": firsts.get("in_progress"),
            "expires_at": record.get("expires_at") or self._expires(job),
            "finalizing_at": firsts.get("finalizing"),
            "completed_at": firsts.get("completed"), "failed_at": firsts.get("failed"),
            "expired_at": firsts.get("expired"),
            "cancelling_at": record.get("cancelling_at"),
            "cancelled_at": firsts.get("cancelled"),
            "request_counts": {"total": counts.get("total", 0),
                               "completed": counts.get("completed", 0),
                               "failed": counts.get("failed", 0)},
            "usage": {"input_tokens": tokens.get("prompt", 0),
                      "input_tokens_details": {"cached_tokens": tokens.get("cached", 0)},
                      "output_tokens": tokens.get("completion", 0),
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": tokens.get("prompt", 0) + tokens.get("completion", 0)},
            "metadata": record.get("metadata"),
            "model": last.get("model"),
            # batchd's own: a retry's merged file (POST /v1/batches/{id}/retry)
            **({"merged_file_id": outputs["merged"]} if outputs["merged"] else {}),
        }

    def _endpoint(self, job: str, waiting: WaitingFile | None = None) -> str:
        """A dropped file's endpoint: its first line's url (short forms allowed)."""
        paths = [self.layout.input(job), self.layout.out(job, PUBLISHED_INPUT)]
        for path in [waiting.path] if waiting else paths:
            try:
                with open(path, "rb") as stream:
                    first = json.loads(stream.readline(65536) or b"{}")
                url = first.get("url") if isinstance(first, dict) else None
                if isinstance(url, str):
                    return url if url.startswith("/v1/") else f"/v1/{url.lstrip('/')}"
                return "/v1/chat/completions"
            except (OSError, ValueError):
                continue
        return "/v1/chat/completions"

    def _expires(self, job: str) -> int | None:
        """A dropped file's window end, as the daemon recorded it in job.toml."""
        import tomllib

        try:
            data = tomllib.loads(self.layout.out(job, JOB_TOML).read_text())
        except (OSError, ValueError):
            return None
        at = data.get("expires_at")
        return int(at.timestamp()) if isinstance(at, datetime) else None

    def batches(self) -> list[dict[str, Any]]:
        """Every batch, newest first: jobs in the outbox, files waiting in the
        inbox, and created batches whose file is between inbox and claim."""
        names = {job for job, _status in self.layout.statuses()}
        waiting = {w.job: w for w in waiting_files(self.settings)}  # one look at the inbox
        names |= set(waiting)
        names |= {p.stem for p in self.batches_dir.glob("*.json")}
        found = []
        for name in names:
            try:
                found.append(self.batch(name, waiting))
            except ApiError:
                continue
        return sorted(found, key=lambda b: (b["created_at"], b["id"]), reverse=True)
