"""A job's media folder through the spool: ``inbox/NAME.media/`` is dropped
before ``NAME.jsonl`` (cp, rsync, a share), claimed with the file into
``work/media/JOB/``, and kept as ``outbox/JOB.media/`` when the job ends.

Each step is one ``rename()`` of the whole folder, so a crash leaves it in one
place or the other, never half moved, and a step done before a crash is
skipped when the job is taken up again. ``work/media/`` holds only running jobs'
folders: it is the one folder vLLM may read local images from
(``allowed_local_media_path``, batchd/engine/serving.py).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import structlog

from ..layout import Layout

log = structlog.get_logger()


def pending(folder: Path, now: float, settle_seconds: float) -> float | None:
    """When FOLDER (an inbox media folder) will have settled, on the wall clock:
    None when it has (or there is none). A folder still being written holds an
    entry changed less than SETTLE_SECONDS ago, or an rsync temp file (``.NAME.XXXXXX``,
    renamed into place when complete); its file waits for it."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return None  # not a folder: its lines' images are missing
    except FileNotFoundError:
        return None
    newest = 0.0
    stack = [str(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                return now + settle_seconds  # renamed under us: still being written
            if entry.name.startswith("."):
                return now + max(settle_seconds, 0.5)
            newest = max(newest, st.st_mtime, st.st_ctime)
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    due = newest + settle_seconds
    return due if due > now else None


def claim(layout: Layout, name: str, job: str) -> Path | None:
    """Move inbox/NAME.media/ (a real folder, never a symlink) to work/media/JOB/
    with the claim of inbox/NAME; its path, or None when none came."""
    source, target = layout.inbox_media(name), layout.media(job)
    try:
        if not stat.S_ISDIR(os.lstat(source).st_mode):
            log.warning("media_folder_refused", job=job, path=str(source),
                        reason="not a folder (a symbolic link?)")
            return None
    except FileNotFoundError:
        return target if target.is_dir() else None
    layout.media_root.mkdir(exist_ok=True)
    try:
        os.rename(source, target)
    except FileNotFoundError:  # another daemon's claim took it
        return None
    return target


def recover(layout: Layout, job: str) -> Path | None:
    """A job taken up again (after a crash, or by another daemon): its media
    folder in work/, or the inbox's if a crash came between the claim's renames."""
    target = layout.media(job)
    if target.is_dir():
        return target
    return claim(layout, f"{job}.jsonl", job) if layout.inbox_media(job).is_dir() else None


def publish(layout: Layout, job: str, keep: bool) -> None:
    """The job ended: its media folder to outbox/JOB.media/ (KEEP) or removed."""
    source = layout.media(job)
    if not source.is_dir():
        return  # none came, or published before a crash
    if not keep:
        shutil.rmtree(source, ignore_errors=True)
        return
    os.rename(source, layout.out_media(job))  # job names are unique: never there yet
