"""Several daemons on one spool (one per GPU set, or one per host over NFS):
every file runs exactly once, every status file has one writer, a cold daemon
leaves a file to a warm one for a moment, and a daemon cut off from the spool
loses its jobs to another without writing into them again."""

import json
import os
import signal
import subprocess

import pytest

from conftest import BATCHD, drop, final_state, outputs, read_jsonl, wait_for


@pytest.mark.slow
def test_three_daemons_200_files(spool_config, tmp_path, daemons):
    config = spool_config()
    running = [daemons(config, env={"BATCHD_FAKE_STEP_SECONDS": "0.01"}, fake=True)
               for _ in range(3)]
    for daemon in running:
        daemon.wait_ready()
    inbox, outbox = tmp_path / "spool" / "inbox", tmp_path / "spool" / "outbox"
    for i in range(200):
        drop(inbox, f"f{i:03d}.jsonl", [{"custom_id": f"f{i}-{k}", "prompt": "x"}
                                        for k in range(3)])
    wait_for(lambda: all(final_state(outbox, f"f{i:03d}") for i in range(200)), 180,
             interval=0.2, what="all 200 files")
    owners = {}
    for i in range(200):
        job = f"f{i:03d}"
        status = read_jsonl(outbox / f"{job}.status.jsonl")
        assert status[-1]["state"] == "completed"
        writers = {s["daemon"] for s in status}
        assert len(writers) == 1, (job, writers)
        owners[job] = writers.pop()
        results = read_jsonl(outbox / f"{job}.results.jsonl")
        assert sorted(r["custom_id"] for r in results) == [f"f{i}-{k}" for k in range(3)]
    assert sorted(p.name for p in outbox.glob("*.status.jsonl")) == \
        sorted(f"f{i:03d}.status.jsonl" for i in range(200))  # no f001-2: nothing ran twice
    claims = [e for d in running for e in d.logs() if e.get("event") == "job_claimed"]
    assert len(claims) == 200
    assert len(set(owners.values())) >= 2  # the work was shared
    assert list(inbox.iterdir()) == [] and list((tmp_path / "spool" / "work").iterdir()) == []


def _warm_peer(settings, profile):
    """A record of another daemon of the spool (another host), PROFILE loaded,
    slots free: what spool/daemons.py reads."""
    folder = settings.layout.daemons()
    folder.mkdir(exist_ok=True)
    (folder / "elsewhere~1.json").write_text(json.dumps({
        "daemon": "elsewhere:1", "host": "elsewhere", "pid": 1, "profile": profile,
        "running": [], "free": 3, "replicas": []}))


def test_a_cold_daemon_leaves_a_file_to_a_warm_one_for_a_moment(daemon, settings):
    """An idle daemon of the spool holds the file's model: this cold one (nothing
    loaded) leaves the file to it for DEFER_SECONDS, then takes it if it is
    still there. A file for a profile no other daemon holds is taken at once."""
    from batchd.candidates import DEFER_SECONDS

    _warm_peer(settings, "tiny")
    drop(settings.inbox, "warm.jsonl", [{"prompt": "x"}])
    start = 2000.0
    daemon.run_once(now=start)  # first seen
    daemon.run_once(now=start + 0.5)  # settled: left to the warm daemon
    daemon.run_once(now=start + DEFER_SECONDS - 0.1)
    assert (settings.inbox / "warm.jsonl").exists() and daemon.session is None
    daemon.run_once(now=start + DEFER_SECONDS + 0.1)  # nobody took it: this one does
    assert not (settings.inbox / "warm.jsonl").exists() and daemon.session is not None
    while daemon.session is not None:
        daemon.run_once(now=start + DEFER_SECONDS + 0.1)
    assert final_state(settings.outbox, "warm") == "completed"

    _warm_peer(settings, "other")  # warm on another model: no reason to wait
    drop(settings.inbox, "cold.jsonl", [{"prompt": "x"}])
    daemon.run_once(now=start + 10)
    daemon.run_once(now=start + 10.5)
    assert not (settings.inbox / "cold.jsonl").exists()


FAKE_SLOW = {"BATCHD_FAKE_STEP_SECONDS": "0.02"}


@pytest.mark.slow  # ~8 s: make test runs it, make check does not
def test_a_stopped_daemon_of_another_host_loses_its_job(spool_config, tmp_path, daemons):
    """A daemon presenting another host name is stopped (SIGSTOP, as a host cut
    off from the spool) mid-job: after lease_seconds of silence another daemon
    takes the job over. When the first runs again it finds its lease lost and
    writes no more for the job; the job comes out exactly once, in input order,
    its hook run once. `batchd status` lists the spool's live daemons, and each
    removes its record when it stops."""
    log = tmp_path / "hook.log"
    config = spool_config(
        "[scheduling]\nlease_seconds = 2.0\n"
        f"[hooks]\non_final = [\"sh\", \"-c\", \"echo $BATCHD_JOB $BATCHD_STATE >> {log}\"]\n"
        "[engine]\ncheckpoint_every = 16\ncheckpoint_seconds = 0.1\n")
    spool = tmp_path / "spool"
    sent = [{"custom_id": f"r{i}", "prompt": f"r {i}", "max_tokens": 8} for i in range(1500)]
    cut_off = daemons(config, env={"BATCHD_FAKE_STEP_SECONDS": "0.05",
                                   "BATCHD_HOSTNAME": "elsewhere"}, fake=True)
    cut_off.wait_ready()
    drop(spool / "inbox", "big.jsonl", sent)

    def in_the_middle():
        status = read_jsonl(spool / "outbox" / "big.status.jsonl") \
            if (spool / "outbox" / "big.status.jsonl").exists() else []
        counts = status[-1].get("request_counts") or {} if status else {}
        return 0 < counts.get("completed", 0) < len(sent) - 500

    wait_for(in_the_middle, 30, interval=0.01, what="it to be in the middle of the job")
    os.kill(cut_off.proc.pid, signal.SIGSTOP)
    try:
        taker = daemons(config, env=FAKE_SLOW, fake=True)
        wait_for(lambda: any(e.get("event") == "job_taken_over" and e.get("job") == "big"
                             for e in taker.logs()), 30, what="the job taken over")
        table = subprocess.run([BATCHD, "status", "--config", str(config)],
                               capture_output=True, text=True, check=True).stdout
        assert f":{taker.proc.pid}" in table  # the live daemons are listed
    finally:
        os.kill(cut_off.proc.pid, signal.SIGCONT)
    wait_for(lambda: any(e.get("event") == "lease_lost" and e.get("job") == "big"
                         for e in cut_off.logs()), 30,
             what="the cut-off daemon to notice it lost the job")
    assert wait_for(lambda: final_state(spool / "outbox", "big"), 120, what="big") == "completed"
    results, errors = outputs(spool / "outbox", "big")
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in sent]
    assert errors == []
    from batchd.config import load_settings
    from batchd.spool import events
    # the job's event is done (its hook ran, and is not due again) with one run logged
    wait_for(lambda: log.exists() and events.pending(load_settings(config)) == [], 30,
             what="the hook done")
    assert log.read_text().splitlines() == ["big completed"]
    assert cut_off.stop() == 0 and taker.stop() == 0
    assert list((spool / "daemons").iterdir()) == []  # each removed its record
