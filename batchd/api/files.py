"""The Files half of the API: uploads under ``SPOOL/api/files/`` and the files
of jobs (their input, results and errors) under ids of their own.

An upload is ``file-ID.jsonl`` with its object in ``file-ID.json``; a job's
file is ``file-JOB.KIND`` (KIND results, errors or input) and is served only
once the job is final, so a reader never sees half of one. Every id from a
request is checked against a strict pattern before it names a path.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from ..config import Settings
from ..layout import ERRORS, MERGED, PUBLISHED_INPUT, RESULTS
from ..spool.outbox import write_atomic

# A job name as spool.inbox.safe_stem makes it; a file id is one of those with a kind.
JOB_ID = re.compile(r"[A-Za-z0-9_+=@,][A-Za-z0-9._+=@,-]{0,199}")
UPLOAD_ID = re.compile(r"file-[0-9a-f]{24}")
# A job file's kind in its id -> (its outbox file, its OpenAI purpose).
JOB_FILE_KINDS = {"results": (RESULTS, "batch_output"), "errors": (ERRORS, "batch_output"),
                  "input": (PUBLISHED_INPUT, "batch"), "merged": (MERGED, "batch_output")}


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, code and the parameter at fault."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as stream:
            data = json.load(stream)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


class Files:
    """Uploads and job files. FINAL_STATE(job) says whether a job has ended (its
    files are then complete); FORGET(job) drops what the batches cache holds of it."""

    def __init__(self, settings: Settings, final_state: Callable[[str], str | None],
                 forget: Callable[[str], None]):
        self.layout = settings.layout
        self.dir = self.layout.api_files
        self.final_state = final_state
        self.forget = forget

    def new_upload(self) -> tuple[str, Path]:
        """A fresh file id and the hidden temp path its upload streams into."""
        file_id = f"file-{secrets.token_hex(12)}"
        return file_id, self.layout.upload_temp(file_id)

    def finish_upload(self, file_id: str, tmp: Path, filename: str, purpose: str) -> dict:
        size = tmp.stat().st_size
        os.replace(tmp, self.layout.upload(file_id))
        meta = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed",
                "expires_at": None, "status_details": None}
        write_atomic(self.layout.upload_meta(file_id), [json.dumps(meta).encode()])
        return meta

    def _job_file(self, file_id: str) -> tuple[str, str] | None:
        """(job, kind) for an id naming a job's file, e.g. file-reviews.results."""
        if not file_id.startswith("file-") or "." not in file_id:
            return None
        job, kind = file_id[len("file-"):].rsplit(".", 1)
        if kind not in JOB_FILE_KINDS or not JOB_ID.fullmatch(job):
            return None
        return job, kind

    def path(self, file_id: str) -> Path | None:
        if UPLOAD_ID.fullmatch(file_id):
            path = self.layout.upload(file_id)
            return path if path.is_file() else None
        found = self._job_file(file_id)
        if found is None:
            return None
        job, kind = found
        path = self.layout.out(job, JOB_FILE_KINDS[kind][0])
        if kind == "input" and not path.exists():
            path = self.layout.input(job)  # still running
        if kind != "input" and not self.final_state(job):
            return None  # published at the end, never half-written
        return path if path.is_file() and not path.is_symlink() else None

    def get(self, file_id: str) -> dict[str, Any]:
        path = self.path(file_id)
        if path is None:
            raise ApiError(404, f"No such File object: {file_id}", "file_not_found", "file_id")
        if UPLOAD_ID.fullmatch(file_id):
            meta = _read_json(self.layout.upload_meta(file_id))
            if meta is not None:
                return meta
        found = self._job_file(file_id)
        assert found is not None
        st = path.stat()
        return {"id": file_id, "object": "file", "bytes": st.st_size,
                "created_at": int(st.st_mtime), "filename": path.name,
                "purpose": JOB_FILE_KINDS[found[1]][1], "status": "processed",
                "expires_at": None, "status_details": None}

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Uploads and the files of finished jobs, newest first."""
        found = []
        for meta_path in self.dir.glob("file-*.json"):
            meta = _read_json(meta_path)
            if meta is not None and self.layout.upload(meta_path.stem).exists():
                found.append(meta)
        created = {p.stem for p in self.layout.api_batches.glob("*.json")}
        for job, _status in self.layout.statuses():
            for kind in JOB_FILE_KINDS:
                if kind == "input" and job in created:
                    continue  # its input is the upload, listed above
                try:
                    found.append(self.get(f"file-{job}.{kind}"))
                except ApiError:
                    continue
        if purpose:
            found = [f for f in found if f["purpose"] == purpose]
        return sorted(found, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)  # 404 unless it exists
        if UPLOAD_ID.fullmatch(file_id):
            self.layout.upload(file_id).unlink(missing_ok=True)
            self.layout.upload_meta(file_id).unlink(missing_ok=True)
        else:
            found = self._job_file(file_id)
            assert found is not None
            if not self.final_state(found[0]):
                raise ApiError(409, f"{file_id} belongs to a batch that is still running",
                               "file_in_use", "file_id")
            self.layout.out(found[0], JOB_FILE_KINDS[found[1]][0]).unlink(missing_ok=True)
            self.forget(found[0])  # its output or error file id is gone
        return {"id": file_id, "object": "file", "deleted": True}
