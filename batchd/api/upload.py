"""Receiving a file upload: a multipart body streamed straight to the spool's
disk (python-multipart's streaming parser), never held in memory, refused as
soon as it passes the spool's size limit."""

from __future__ import annotations

import os
from typing import Any

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from .files import ApiError, Files

PURPOSES = ("batch", "user_data")


async def receive(request: Request, files: Files, limit: int) -> dict[str, Any]:
    """Stream a multipart upload straight to the spool's disk, never into memory,
    and refuse it as soon as it passes LIMIT bytes."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(400, "upload with multipart/form-data (fields 'file' and 'purpose')",
                       "invalid_value", "file")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + 65536:
        raise ApiError(413, f"file is over the limit of {limit} bytes", "file_too_large", "file")
    file_id, tmp = files.new_upload()
    fields: dict[str, bytes] = {}
    part: dict[str, Any] = {}
    out = open(tmp, "wb")
    written = 0

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, field=b"", value=b"", data=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["field"].lower()] = part["value"]
        part["field"] = part["value"] = b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        part["filename"] = None if filename is None else \
            os.path.basename(filename.decode("utf-8", "replace"))[:255]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal written
        if part.get("name") == "file" and part.get("filename") is not None:
            written += end - start
            if written > limit:
                raise ApiError(413, f"file is over the limit of {limit} bytes",
                               "file_too_large", "file")
            out.write(data[start:end])
        elif len(part["data"]) < 4096:
            part["data"] += data[start:end]

    def on_part_end() -> None:
        if part.get("name") == "file" and part.get("filename") is not None:
            fields["filename"] = part["filename"].encode()
        elif part.get("name"):
            fields[part["name"]] = part["data"]

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    try:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors
            raise ApiError(400, f"malformed multipart upload: {exc}", "invalid_value",
                           "file") from None
        out.flush()
        os.fsync(out.fileno())
        out.close()
        if "filename" not in fields:
            raise ApiError(400, "no 'file' part in the upload", "invalid_value", "file")
        purpose = fields.get("purpose", b"").decode("utf-8", "replace")
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose must be one of {', '.join(PURPOSES)}",
                           "invalid_value", "purpose")
        return files.finish_upload(file_id, tmp, fields["filename"].decode(), purpose)
    finally:
        out.close()
        tmp.unlink(missing_ok=True)
