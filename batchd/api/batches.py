"""The spool seen as OpenAI's Files and Batches: what ``batchd api`` serves.

A batch is a job: its id is the job name, its state and counts come from
``outbox/JOB.status.jsonl``, its output and error files are the job's
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
import os
import re
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import tomli_w

from ..spool import inbox
from ..config import Settings
from ..lines import URLS
from ..spool.outbox import JobState, read_status, write_atomic

# A job name as spool.safe_stem makes it; a file id is one of those with a kind.
JOB_ID = re.compile(r"[A-Za-z0-9_+=@,][A-Za-z0-9._+=@,-]{0,199}")
UPLOAD_ID = re.compile(r"file-[0-9a-f]{24}")
JOB_FILE_KINDS = {"results": "batch_output", "errors": "batch_output", "input": "batch"}
WINDOW = re.compile(r"([0-9]{1,7})([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FINAL_CACHE = 10_000  # finished batches kept built in memory (about 1 KB each)

# Spool state -> OpenAI batch status (queued jobs are not validated yet).
STATUS = {"queued": "validating", "validating": "validating", "in_progress": "in_progress",
          "finalizing": "finalizing", "completed": "completed", "failed": "failed",
          "cancelled": "cancelled", "expired": "expired"}


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, code and the parameter at fault."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _epoch(ts: str | None) -> int | None:
    if not ts:
        return None
    try:
        return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as stream:
            data = json.load(stream)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


class Store:
    """Files and batches over one spool. Stateless apart from a cache of
    finished batches (their status files never change again)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.files_dir = settings.spool.root / "api" / "files"
        self.batches_dir = settings.spool.root / "api" / "batches"
        self._final: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def ensure_dirs(self) -> None:
        inbox.ensure_dirs(self.settings)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)

    # -- files -----------------------------------------------------------------

    def new_upload(self) -> tuple[str, Path]:
        """A fresh file id and the hidden temp path its upload streams into."""
        file_id = f"file-{secrets.token_hex(12)}"
        return file_id, self.files_dir / f".{file_id}.upload"

    def finish_upload(self, file_id: str, tmp: Path, filename: str, purpose: str) -> dict:
        size = tmp.stat().st_size
        os.replace(tmp, self.files_dir / f"{file_id}.jsonl")
        meta = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed",
                "expires_at": None, "status_details": None}
        write_atomic(self.files_dir / f"{file_id}.json", [json.dumps(meta).encode()])
        return meta

    def _job_file(self, file_id: str) -> tuple[str, str] | None:
        """(job, kind) for an id naming a job's file, e.g. file-reviews.results."""
        if not file_id.startswith("file-") or "." not in file_id:
            return None
        job, kind = file_id[len("file-"):].rsplit(".", 1)
        if kind not in JOB_FILE_KINDS or not JOB_ID.fullmatch(job):
            return None
        return job, kind

    def file_path(self, file_id: str) -> Path | None:
        if UPLOAD_ID.fullmatch(file_id):
            path = self.files_dir / f"{file_id}.jsonl"
            return path if path.is_file() else None
        found = self._job_file(file_id)
        if found is None:
            return None
        job, kind = found
        path = self.settings.outbox / f"{job}.{kind}.jsonl"
        if kind == "input" and not path.exists():
            path = self.settings.work / f"{job}.jsonl"  # still running
        if kind != "input" and not self._final_state(job):
            return None  # published at the end, never half-written
        return path if path.is_file() and not path.is_symlink() else None

    def file(self, file_id: str) -> dict[str, Any]:
        path = self.file_path(file_id)
        if path is None:
            raise ApiError(404, f"No such File object: {file_id}", "file_not_found", "file_id")
        if UPLOAD_ID.fullmatch(file_id):
            meta = _read_json(self.files_dir / f"{file_id}.json")
            if meta is not None:
                return meta
        found = self._job_file(file_id)
        assert found is not None
        st = path.stat()
        return {"id": file_id, "object": "file", "bytes": st.st_size,
                "created_at": int(st.st_mtime), "filename": path.name,
                "purpose": JOB_FILE_KINDS[found[1]], "status": "processed",
                "expires_at": None, "status_details": None}

    def files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Uploads and the files of finished jobs, newest first."""
        found = []
        for meta_path in self.files_dir.glob("file-*.json"):
            meta = _read_json(meta_path)
            if meta is not None and (self.files_dir / f"{meta_path.stem}.jsonl").exists():
                found.append(meta)
        created = {p.stem for p in self.batches_dir.glob("*.json")}
        for status in self.settings.outbox.glob("*.status.jsonl"):
            job = status.name[: -len(".status.jsonl")]
            for kind in JOB_FILE_KINDS:
                if kind == "input" and job in created:
                    continue  # its input is the upload, listed above
                try:
                    found.append(self.file(f"file-{job}.{kind}"))
                except ApiError:
                    continue
        if purpose:
            found = [f for f in found if f["purpose"] == purpose]
        return sorted(found, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def delete_file(self, file_id: str) -> dict[str, Any]:
        self.file(file_id)  # 404 unless it exists
        if UPLOAD_ID.fullmatch(file_id):
            (self.files_dir / f"{file_id}.jsonl").unlink(missing_ok=True)
            (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)
        else:
            found = self._job_file(file_id)
            assert found is not None
            if not self._final_state(found[0]):
                raise ApiError(409, f"{file_id} belongs to a batch that is still running",
                               "file_in_use", "file_id")
            (self.settings.outbox / f"{found[0]}.{found[1]}.jsonl").unlink(missing_ok=True)
            with self._lock:
                self._final.pop(found[0], None)  # its output or error file id is gone
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches ---------------------------------------------------------------

    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None) -> dict[str, Any]:
        if endpoint not in URLS:
            raise ApiError(400, f"endpoint {endpoint!r} is not one of {', '.join(URLS)}",
                           "invalid_value", "endpoint")
        window = WINDOW.fullmatch(completion_window or "")
        if window is None:
            raise ApiError(400, "completion_window must be a duration such as '24h' "
                           "(s, m, h or d)", "invalid_value", "completion_window")
        if not UPLOAD_ID.fullmatch(input_file_id) or self.file_path(input_file_id) is None:
            raise ApiError(404, f"No such File object: {input_file_id}", "file_not_found",
                           "input_file_id")
        if self.file(input_file_id)["purpose"] != "batch":
            raise ApiError(400, f"{input_file_id} was not uploaded with purpose 'batch'",
                           "invalid_value", "input_file_id")
        job = f"batch_{secrets.token_hex(12)}"
        now = datetime.now(timezone.utc)
        expires = now + timedelta(seconds=int(window[1]) * UNITS[window[2]])
        record = {"endpoint": endpoint, "completion_window": completion_window,
                  "metadata": metadata, "input_file_id": input_file_id,
                  "created_at": int(now.timestamp()), "expires_at": int(expires.timestamp())}
        write_atomic(self.batches_dir / f"{job}.json", [json.dumps(record).encode()])
        # The sidecar first, then the file by rename: the daemon claims them together.
        inbox = self.settings.inbox
        write_atomic(inbox / f"{job}.toml", [tomli_w.dumps({"expires_at": expires}).encode()])
        source = self.file_path(input_file_id)
        assert source is not None
        with open(source, "rb") as stream:
            write_atomic(inbox / f"{job}.jsonl", iter(lambda: stream.read(1 << 20), b""))
        return self.batch(job)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.batch(batch_id)
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            raise ApiError(409, f"Cannot cancel a batch with status {batch['status']}",
                           "batch_not_cancellable", "batch_id")
        record = self._record(batch_id) or {}
        record.setdefault("cancelling_at", int(time.time()))
        write_atomic(self.batches_dir / f"{batch_id}.json", [json.dumps(record).encode()])
        write_atomic(self.settings.inbox / f"{batch_id}.cancel", [b""])
        return self.batch(batch_id)

    def _record(self, job: str) -> dict[str, Any] | None:
        return _read_json(self.batches_dir / f"{job}.json")

    def _final_state(self, job: str) -> str | None:
        if job in self._final:
            return self._final[job]["status"]
        history = read_status(self.settings.outbox / f"{job}.status.jsonl")
        if history and JobState(history[-1]["state"]).final:
            return str(history[-1]["state"])
        return None

    def batch(self, batch_id: str) -> dict[str, Any]:
        if not JOB_ID.fullmatch(batch_id):
            raise ApiError(404, f"No such Batch object: {batch_id}", "batch_not_found",
                           "batch_id")
        if batch_id in self._final:
            return self._final[batch_id]
        record = self._record(batch_id)
        history = read_status(self.settings.outbox / f"{batch_id}.status.jsonl")
        waiting = self.settings.inbox / f"{batch_id}.jsonl"
        if not history and record is None and not (
                inbox.is_eligible_name(waiting.name) and waiting.is_file()
                or (self.settings.outbox / f"{batch_id}.status.jsonl").exists()):
            raise ApiError(404, f"No such Batch object: {batch_id}", "batch_not_found",
                           "batch_id")
        batch = self._build(batch_id, record or {}, history, waiting)
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            with self._lock:  # routes run in a thread pool
                if len(self._final) >= FINAL_CACHE:
                    del self._final[next(iter(self._final))]  # the oldest entry
                self._final[batch_id] = batch
        return batch

    def _build(self, job: str, record: dict[str, Any], history: list[dict[str, Any]],
               waiting: Path) -> dict[str, Any]:
        last = history[-1] if history else {}
        state = last.get("state", "queued")
        final = state in ("completed", "failed", "cancelled", "expired")
        status = STATUS.get(state, "validating")
        firsts: dict[str, int | None] = {}
        for line in history:
            firsts.setdefault(line.get("state", ""), _epoch(line.get("ts")))
        if status == "validating" and "in_progress" in firsts:
            status = "in_progress"  # queued again after a restart: it had begun
        cancel_asked = (self.settings.inbox / f"{job}.cancel").exists()
        if not final and (cancel_asked or "cancelling_at" in record):
            status = "cancelling"
        counts = last.get("request_counts") or {}
        tokens = last.get("tokens") or {}
        created = record.get("created_at") or (_epoch(history[0].get("ts")) if history else None)
        if created is None:
            try:
                created = int(waiting.stat().st_mtime)
            except FileNotFoundError:
                created = int(time.time())
        errors = None
        if last.get("errors"):
            errors = {"object": "list", "data": [
                {"code": e.get("code"), "message": e.get("message"), "line": e.get("line"),
                 "param": None} for e in last["errors"]]}
        outputs = {kind: f"file-{job}.{kind}" if final and
                   (self.settings.outbox / f"{job}.{kind}.jsonl").is_file() else None
                   for kind in ("results", "errors")}
        if outputs["errors"] and (self.settings.outbox / f"{job}.errors.jsonl"
                                  ).stat().st_size == 0:
            outputs["errors"] = None
        return {
            "id": job, "object": "batch",
            "endpoint": record.get("endpoint") or self._endpoint(job),
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
        }

    def _endpoint(self, job: str) -> str:
        """A dropped file's endpoint: its first line's url (short forms allowed)."""
        for path in (self.settings.work / f"{job}.jsonl",
                     self.settings.outbox / f"{job}.input.jsonl",
                     self.settings.inbox / f"{job}.jsonl"):
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
            data = tomllib.loads((self.settings.outbox / f"{job}.job.toml").read_text())
        except (OSError, ValueError):
            return None
        at = data.get("expires_at")
        return int(at.timestamp()) if isinstance(at, datetime) else None

    def batches(self) -> list[dict[str, Any]]:
        """Every batch, newest first: jobs in the outbox, files waiting in the
        inbox, and created batches whose file is between inbox and claim."""
        names = {p.name[: -len(".status.jsonl")] for p in
                 self.settings.outbox.glob("*.status.jsonl")}
        names |= {name[: -len(".jsonl")] for name, _ in inbox.scan(self.settings.inbox)}
        names |= {p.stem for p in self.batches_dir.glob("*.json")}
        found = []
        for name in names:
            try:
                found.append(self.batch(name))
            except ApiError:
                continue
        return sorted(found, key=lambda b: (b["created_at"], b["id"]), reverse=True)
