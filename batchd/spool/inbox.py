"""The spool: which inbox files are eligible and settled, and the claim.

The claim is one ``rename()`` from ``inbox/`` into ``work/``, under a name
unique to this process, so two daemons (on one host or over NFS) can race for
a file and exactly one wins. The winner then reserves a job name by creating
its status file in outbox/ with ``O_EXCL`` (nothing is ever overwritten) and
renames its claim to ``work/JOB.jsonl``.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

from ..config import Settings
from ..layout import INPUT, Layout
from . import media
from .lease import Leases, pid_alive

IGNORED_SUFFIXES = (".part", ".tmp", "~")
_claims = count(1)


NAME_MAX = 255  # bytes in one file name on Linux file systems


def ensure_dirs(settings: Settings) -> None:
    for folder in settings.layout.folders:
        folder.mkdir(parents=True, exist_ok=True)


def check_writable(settings: Settings) -> None:
    """Raise OSError naming the folder unless a file can be made and removed in
    each spool folder (os.access would say yes to root on a read-only mount)."""
    for folder in settings.layout.folders:
        probe = folder / f".batchd-probe~{socket.gethostname()}~{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {folder.name}/ ({exc.strerror})",
                          str(folder)) from None


def is_eligible_name(name: str) -> bool:
    """Whether an inbox entry's name makes it a job (contract section 1)."""
    return (name.endswith(INPUT) and not name.startswith(".")
            and not name.endswith(IGNORED_SUFFIXES))


def safe_stem(name: str) -> str:
    """A job name from a file name: printable, no path parts, no leading dash or dot."""
    stem = name.removesuffix(INPUT)
    stem = re.sub(r"[^A-Za-z0-9._+=@,-]", "_", stem).lstrip("-.")
    return stem[:180] or "job"


@dataclass
class Settler:
    """Decides when an inbox file is complete.

    A file seen to arrive by rename is complete at once. Any other file is
    settled when its size, mtime and ctime have not changed for
    ``settle_seconds`` (an SMB copy or ``cp`` writes in place).
    """

    settle_seconds: float
    seen: dict[str, tuple[tuple[int, int, int], float]] = field(default_factory=dict)
    renamed: set[str] = field(default_factory=set)

    def mark_renamed(self, name: str) -> None:
        self.renamed.add(name)

    def settled(self, name: str, st: os.stat_result, now: float) -> bool:
        if name in self.renamed:
            return True
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        previous = self.seen.get(name)
        if previous is None or previous[0] != key:
            self.seen[name] = (key, now)
            return self.settle_seconds == 0
        return now - previous[1] >= self.settle_seconds

    def due(self, name: str) -> float:
        """When NAME, seen unchanged since, will have settled (the caller's clock)."""
        previous = self.seen.get(name)
        return 0.0 if previous is None else previous[1] + self.settle_seconds

    def forget(self, name: str) -> None:
        self.seen.pop(name, None)
        self.renamed.discard(name)


def scan(inbox: Path) -> list[tuple[str, os.stat_result]]:
    """Eligible inbox entries, oldest first, with their lstat (never followed)."""
    found = []
    try:
        entries = list(os.scandir(inbox))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not is_eligible_name(entry.name):
            continue
        try:
            found.append((entry.name, entry.stat(follow_symlinks=False)))
        except FileNotFoundError:
            continue  # claimed by another daemon meanwhile
    found.sort(key=lambda item: (item[1].st_mtime_ns, item[0]))
    return found


@dataclass
class Claimed:
    job: str
    input: Path  # work/JOB.jsonl
    original_name: str
    sidecar: Path | None  # work/JOB.toml when one came with the file


def claim(settings: Settings, name: str, leases: Leases) -> Claimed | None:
    """Take inbox/NAME into work/ under a lease; None when another process won the race."""
    source = settings.inbox / name
    # Unique to this process, and it keeps the original name for recovery.
    prefix = settings.layout.claim(os.getpid(), next(_claims), socket.gethostname(), "")
    temp = prefix.with_name(fit_name(prefix.name, name))
    try:
        os.rename(source, temp)
    except FileNotFoundError:
        return None
    job = ""
    try:
        job = reserve_name(settings, safe_stem(name))
        # The lease exists before work/JOB.jsonl does, so no other daemon ever
        # sees the job unowned.
        if not leases.create(job):
            raise FileExistsError(f"lease for new job {job} exists")
        target = settings.layout.input(job)
        pictures = media.claim(settings.layout, name, job)  # its images (jobs/images.py)
        os.rename(temp, target)
    except OSError:
        os.rename(temp, source)  # outbox full or read-only: give the file back
        if job:
            settings.layout.media_pointer(job).unlink(missing_ok=True)
        raise
    if pictures:
        media.move(settings.layout, job)
    sidecar = None
    side_source = settings.layout.inbox_sidecar(name)
    if side_source.exists() or side_source.is_symlink():
        side_target = settings.layout.sidecar(job)
        try:
            os.rename(side_source, side_target)
            sidecar = side_target
        except FileNotFoundError:
            pass
    if has_marker(settings.layout, name):
        try:
            settings.layout.ready_marker(name).unlink()  # consumed with the claim
        except FileNotFoundError:
            pass
    return Claimed(job, target, name, sidecar)


def has_marker(layout: Layout, name: str) -> bool:
    """Whether NAME.ready exists (a 255-byte NAME cannot have one)."""
    return len(os.fsencode(name)) + 6 <= NAME_MAX and layout.ready_marker(name).exists()


def fit_name(prefix: str, name: str) -> str:
    """PREFIX + NAME, shortened to a job-safe stem when it would pass the 255-byte
    limit of a file name (a crash recovery then gives the file back shortened)."""
    whole = prefix + name
    if len(os.fsencode(whole)) <= NAME_MAX:
        return whole
    return prefix + safe_stem(name)[: NAME_MAX - len(os.fsencode(prefix)) - 6] + INPUT


def reserve_name(settings: Settings, stem: str) -> str:
    """The first free job name for STEM, reserved by creating its status file."""
    for n in range(1, 1_000_000):
        job = stem if n == 1 else f"{stem}-{n}"
        if settings.layout.input(job).exists() or settings.layout.out_media(job).exists():
            continue
        try:
            fd = os.open(settings.layout.status(job),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return job
    raise RuntimeError(f"no free job name for {stem}")


def is_regular(st: os.stat_result) -> bool:
    return refusal(st) is None


def refusal(st: os.stat_result) -> str | None:
    """Why an inbox entry (its lstat) is never opened as data; None for a plain file.

    A second name (a hard link) is refused too: the file may belong to someone
    else, and the input is moved into outbox/ and failed/ with batchd's rights."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None if st.st_nlink <= 1 else f"is a hard link ({st.st_nlink} names)"
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a device node"), (stat.S_ISBLK, "a device node"))
    return "is " + next((what for test, what in kinds if test(mode)), "not a regular file")


def move_to_failed(settings: Settings, name: str) -> Path | None:
    """Move an inbox entry into failed/ untouched; None if it cannot be moved."""
    target = settings.failed / name
    if target.exists() or target.is_symlink():
        target = settings.failed / fit_name(
            f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-", name)
    try:
        os.rename(settings.inbox / name, target)
    except OSError:
        return None
    return target


def unfinished(settings: Settings) -> list[str]:
    """Jobs left in work/ (by a crash or a stop), oldest first."""
    jobs = []
    try:
        entries = list(os.scandir(settings.work))
    except FileNotFoundError:
        return []
    for entry in entries:
        job = Layout.job_of_input(entry.name)
        if job is not None:
            try:
                jobs.append((entry.stat(follow_symlinks=False).st_mtime_ns, job))
            except FileNotFoundError:
                continue  # finished by its owner meanwhile
    return [job for _, job in sorted(jobs)]


def orphan_claims(settings: Settings) -> list[tuple[Path, str]]:
    """Claims of this host whose process died between the two renames of a claim,
    with the inbox name each came from."""
    host = socket.gethostname()
    return [(path, name) for path, pid, owner, name in settings.layout.claims()
            if owner == host and not pid_alive(pid)]
