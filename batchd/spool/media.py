"""A job's media folder through the spool: ``inbox/NAME.media/`` is dropped
before ``NAME.jsonl`` (cp, rsync, a share), claimed with the file into
``work/media/JOB/``, and kept as ``outbox/JOB.media/`` when the job ends.

Each move is one ``rename()`` of the whole folder, so a crash leaves it in one
place or the other, never half moved. The claim writes ``work/.JOB.media``
(the inbox name) before the job's input reaches ``work/``: a daemon that dies
between the input's rename and the folder's leaves the pointer, and whoever
takes the job up finishes the move (``move``). ``work/media/`` holds only
running jobs' folders: it is the one folder vLLM may read local images from
(``allowed_local_media_path``, batchd/engine/serving.py).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from pathlib import Path

import structlog

from ..layout import INPUT, MEDIA, Layout

log = structlog.get_logger()

# rsync's temp file (.NAME.XXXXXX) and --delay-updates folder: a transfer in progress
_RSYNC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9]{6}$|^\.~tmp~$")
ABANDONED_SECONDS = 300.0  # a temp file untouched this long is a dead transfer's


def pending(folder: Path, now: float, settle_seconds: float) -> float | None:
    """When FOLDER (an inbox media folder) will have settled, on the wall clock:
    None when it has (or there is none). A folder still being written holds an
    entry (or is itself) changed less than SETTLE_SECONDS ago, or an rsync temp
    file written in the last ABANDONED_SECONDS; its file waits for it. Entries
    that cannot be read are left to validation (their lines' pictures are missing)."""
    try:
        top = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(top.st_mode):
        return None  # not a folder: its lines' images are missing
    newest = max(top.st_mtime, top.st_ctime)
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
            except OSError:
                continue
            changed = max(st.st_mtime, st.st_ctime)
            if _RSYNC_TEMP.match(entry.name) and now - changed < ABANDONED_SECONDS:
                return now + max(settle_seconds, 0.5)
            newest = max(newest, changed)
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    due = newest + settle_seconds
    return due if due > now else None


def beside(path: Path) -> Path | None:
    """The media folder a user keeps beside a job file (``photos.media/`` beside
    ``photos.jsonl``), as `batchd validate` checks it and `batchd submit` brings
    it; None when there is none (or it is no folder)."""
    folder = path.with_name(path.name.removesuffix(INPUT) + MEDIA)
    return folder if folder.is_dir() else None


def copy_in(source: Path, target: Path) -> int:
    """`batchd submit`: SOURCE (a media folder) copied to TARGET (the inbox's
    NAME.media/) under a hidden name, every file fsynced, then renamed into
    place, so the daemon never sees half a folder; symbolic links are copied as
    links (validation refuses those that lead out). The files copied."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    copied = 0

    def copy(src: str, dst: str) -> None:
        nonlocal copied
        shutil.copy2(src, dst)
        with open(dst, "rb") as stream:
            os.fsync(stream.fileno())
        copied += 1

    try:
        shutil.copytree(source, tmp, symlinks=True, copy_function=copy)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return copied


def claim(layout: Layout, name: str, job: str) -> bool:
    """Before inbox/NAME becomes work/JOB.jsonl: whether a media folder came
    with it (a real folder, never a symlink); if so its pointer is written, so
    ``move`` finds it whoever takes the job up."""
    source = layout.inbox_media(name)
    try:
        if not stat.S_ISDIR(os.lstat(source).st_mode):
            log.warning("media_folder_refused", job=job, path=str(source),
                        reason="not a folder (a symbolic link?)")
            return False
    except FileNotFoundError:
        return False
    layout.media_pointer(job).write_text(source.name)
    return True


def move(layout: Layout, job: str) -> Path | None:
    """The job's media folder into work/media/JOB/ (after its claim, or after a
    crash that came between); the folder, or None when none came."""
    target, pointer = layout.media(job), layout.media_pointer(job)
    try:
        name = pointer.read_text()
    except FileNotFoundError:
        return target if target.is_dir() else None
    source = layout.inbox / Path(name).name  # only ever a name in the inbox
    if not target.is_dir():
        layout.media_root.mkdir(exist_ok=True)
        try:
            os.rename(source, target)
        except FileNotFoundError:
            log.warning("media_folder_missing", job=job, path=str(source))
    pointer.unlink(missing_ok=True)
    return target if target.is_dir() else None


def publish(layout: Layout, job: str, keep: bool) -> None:
    """The job ended: its media folder to outbox/JOB.media/ (KEEP) or removed."""
    layout.media_pointer(job).unlink(missing_ok=True)
    source = layout.media(job)
    if not source.is_dir():
        return  # none came, or published before a crash
    if not keep:
        shutil.rmtree(source, ignore_errors=True)
        return
    target = layout.out_media(job)
    if target.exists() or target.is_symlink():  # put there by hand: never overwritten
        target = target.with_name(f"{target.name}.{time.strftime('%Y%m%dT%H%M%S')}")
        log.warning("media_folder_renamed", job=job, path=str(target))
    os.rename(source, target)
