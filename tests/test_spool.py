"""Eligibility, settling, the claim race and job names."""

import os
import threading
from pathlib import Path

from batchd.spool import inbox as spool
from batchd.spool.lease import Leases


def test_eligible_names():
    assert spool.is_eligible_name("a.jsonl")
    for name in (".a.jsonl", "a.jsonl.part", "a.jsonl.tmp", "a.jsonl~", "a.json", ".~tmp~",
                 "a.jsonl.ready", "a.toml"):
        assert not spool.is_eligible_name(name), name


def test_safe_stem():
    assert spool.safe_stem("reviews.jsonl") == "reviews"
    assert spool.safe_stem("--rm -rf .jsonl") == "rm_-rf_"
    assert "/" not in spool.safe_stem("../../etc.jsonl")
    assert len(spool.safe_stem("x" * 300 + ".jsonl")) <= 180


def test_settler_waits_for_quiet(settings, tmp_path):
    f = tmp_path / "f"
    f.write_text("a")
    settler = spool.Settler(1.0)
    st = os.stat(f)
    assert not settler.settled("f", st, 100.0)
    assert not settler.settled("f", st, 100.5)
    f.write_text("ab")
    st2 = os.stat(f)
    assert not settler.settled("f", st2, 101.2)  # changed: the clock restarts
    assert settler.settled("f", st2, 102.3)
    settler.mark_renamed("g")
    assert settler.settled("g", st, 0.0)


def test_claim_race_one_winner(settings):
    spool.ensure_dirs(settings)
    (settings.inbox / "job.jsonl").write_text('{"prompt": "x"}\n')
    results = []
    barrier = threading.Barrier(8)

    def racer():
        barrier.wait()
        results.append(spool.claim(settings, "job.jsonl", Leases(settings.layout, 60)))

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0].job == "job"
    assert sorted(p.name for p in settings.work.iterdir()) == ["job.jsonl", "job.lease"]


def test_names_never_collide(settings):
    spool.ensure_dirs(settings)
    jobs = []
    for _ in range(3):
        (settings.inbox / "r.jsonl").write_text("{}\n")
        (settings.inbox / "r.toml").write_text('profile = "tiny"\n')
        jobs.append(spool.claim(settings, "r.jsonl", Leases(settings.layout, 60)))
    assert [j.job for j in jobs] == ["r", "r-2", "r-3"]
    assert all(j.sidecar and j.sidecar.name == f"{j.job}.toml" for j in jobs)


def test_orphan_claim_goes_back(settings):
    spool.ensure_dirs(settings)
    import socket
    orphan = settings.work / f".claim~999999~1~{socket.gethostname()}~lost.jsonl"
    orphan.write_text("{}\n")
    assert spool.orphan_claims(settings) == [(orphan, "lost.jsonl")]


def test_auto_mode_polls_on_network_filesystems(monkeypatch, tmp_path):
    from batchd.spool import watcher
    monkeypatch.setattr(watcher, "filesystem_type", lambda path: "nfs4")
    assert watcher.choose_mode("auto", tmp_path) == (
        "poll", "inbox is on nfs4, where inotify misses remote writes")
    monkeypatch.setattr(watcher, "filesystem_type", lambda path: "fuse.sshfs")
    assert watcher.choose_mode("auto", tmp_path)[0] == "poll"
    monkeypatch.setattr(watcher, "filesystem_type", lambda path: "ext4")
    assert watcher.choose_mode("auto", tmp_path)[0] == "inotify"
    assert watcher.choose_mode("poll", tmp_path) == ("poll", "set in config")


def test_filesystem_type_reads_the_mount_table(tmp_path):
    """The mount table's answer equals df's (coreutils reads the same table) and
    names /proc's own type."""
    import subprocess

    from batchd.spool.watcher import filesystem_type
    df = subprocess.run(["df", "--output=fstype", str(tmp_path)], capture_output=True,
                        text=True, check=True).stdout.split()
    assert filesystem_type(tmp_path) == df[-1]
    assert filesystem_type(Path("/proc/self")) == "proc"


def test_leases_take_over_only_from_the_gone(settings, monkeypatch):
    import json
    import time as _time
    spool.ensure_dirs(settings)
    mine = Leases(settings.layout, lease_seconds=30)
    other = Leases(settings.layout, lease_seconds=30)
    other.pid = 999_999_999  # a pid that does not exist: a daemon killed by -9
    assert other.create("a")
    assert mine.acquire("a")  # same host, dead pid: taken over at once
    assert json.loads(mine.path("a").read_text())["pid"] == mine.pid
    remote = Leases(settings.layout, lease_seconds=30)
    remote.host = "elsewhere"
    assert remote.create("b")
    assert not mine.acquire("b")  # another host's fresh lease is respected
    old = _time.time() - 120
    os.utime(mine.path("b"), (old, old))
    assert mine.acquire("b")  # its heartbeat is older than lease_seconds
    assert not remote.acquire("b")  # and the previous owner cannot take it back
    mine.release("b")
    assert not mine.path("b").exists()
