"""A file still in the inbox is a job in state `waiting` (phase `settling` or
`in_inbox`) for every view: the listing, `batchd status JOB` and its --follow
through the claim to the end, the metrics and the API (fast: no vLLM)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest
from fastapi.testclient import TestClient

from batchd import views
from batchd.api.app import create_app
from batchd.config import load_settings
from batchd.layout import JobState, Phase
from batchd.metrics import Metrics
from batchd.spool.inbox import ensure_dirs
from batchd.spool.listing import job_rows, waiting_file, waiting_files

from conftest import BATCHD, drain, drop, wait_for

@pytest.fixture
def settings(spool_config):
    """conftest's settings, with the spool's folders made."""
    made = load_settings(spool_config())
    ensure_dirs(made)
    return made


LINE = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "hi"}]}}


def status_line(job: str, state: str, **fields) -> str:
    return json.dumps({"ts": "2026-12-02T20:00:00.000Z", "job": job, "state": state,
                       "request_counts": {"total": 2, "completed": 0, "failed": 0},
                       "message": "", **fields}) + "\n"


def claim_steps(settings, name: str, job: str):
    """The claim of inbox/NAME as job JOB and its life, one step at a time, as a
    daemon makes them (spool/inbox.py, claim): out of the inbox into a claim in
    flight, the status file reserved, the input in work/, then status lines."""
    layout = settings.layout
    temp = layout.claim(os.getpid(), 1, socket.gethostname(), name)
    yield lambda: os.rename(layout.inbox / name, temp)
    yield lambda: layout.status(job).touch()
    yield lambda: os.rename(temp, layout.input(job))
    for state, phase in (("queued", None), ("in_progress", "generating"),
                         ("completed", "done")):
        line = status_line(job, state, **({"phase": phase} if phase else {}))
        yield lambda line=line: layout.status(job).open("a").write(line)


# -- the listing ---------------------------------------------------------------------

def test_inbox_files_wait_settling_then_in_inbox(settings):
    drop(settings.inbox, "q.jsonl", [LINE, LINE | {"custom_id": "b"}])
    now = time.time()
    (w,) = waiting_files(settings, now=now)
    assert (w.job, w.name, w.state, w.phase) == ("q", "q.jsonl", JobState.WAITING,
                                                  Phase.SETTLING)  # settle_seconds 0.3
    (w,) = waiting_files(settings, now=now + 5)
    assert w.phase == Phase.IN_INBOX and w.lines() == 2
    record = w.record()
    assert record["state"] == "waiting" and record["phase"] == "in_inbox"
    assert record["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    assert record["file"] == "q.jsonl" and record["message"] == "in inbox, not claimed yet"
    (row,) = job_rows(settings)
    assert (row["job"], row["state"]) == ("q", "waiting")
    assert row["phase"] in ("settling", "in_inbox")


def test_a_missing_ready_marker_keeps_a_file_settling(settings):
    settings.watch.require_ready_marker = True
    drop(settings.inbox, "m.jsonl", [LINE])
    (w,) = waiting_files(settings, now=time.time() + 60)
    assert w.phase == Phase.SETTLING and "m.jsonl.ready" in w.why
    (settings.inbox / "m.jsonl.ready").touch()
    assert waiting_files(settings, now=time.time() + 60)[0].phase == Phase.IN_INBOX


def test_waiting_files_are_named_as_their_claim_will_name_them(settings):
    (settings.outbox / "reviews.status.jsonl").write_text(status_line("reviews", "completed"))
    drop(settings.inbox, "reviews.jsonl", [LINE])  # dropped again: the claim says reviews-2
    drop(settings.inbox, "my q.jsonl", [LINE])  # a stem made safe
    drop(settings.inbox, "a_b.jsonl", [LINE])
    drop(settings.inbox, "a b.jsonl", [LINE])  # the same safe stem: the older file wins
    os.utime(settings.inbox / "a b.jsonl", (1, 1))
    os.symlink("/etc/hostname", settings.inbox / "link.jsonl")  # never claimed: not waiting
    named = {w.name: w.job for w in waiting_files(settings)}
    assert named == {"reviews.jsonl": "reviews-2", "my q.jsonl": "my_q",
                     "a b.jsonl": "a_b", "a_b.jsonl": "a_b-2"}
    assert waiting_file(settings, "a_b-2").name == "a_b.jsonl"
    assert waiting_file(settings, "reviews") is None  # that is the ended job
    assert waiting_file(settings, "link") is None and waiting_file(settings, "nope") is None
    rows = {r["job"]: r["state"] for r in job_rows(settings)}
    assert rows == {"reviews": "completed", "reviews-2": "waiting", "my_q": "waiting",
                    "a_b": "waiting", "a_b-2": "waiting"}


# -- batchd status JOB [--follow] ------------------------------------------------------

def batchd(*args, config):
    return subprocess.run([BATCHD, *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=60)


def test_status_of_a_file_in_the_inbox(spool_config, tmp_path):
    config = spool_config()
    src = tmp_path / "questions.jsonl"
    src.write_text(json.dumps(LINE) + "\n\n" + json.dumps(LINE | {"custom_id": "b"}) + "\n")
    assert batchd("submit", str(src), config=config).stdout.strip() == "questions"
    one = batchd("status", "questions", config=config)
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("questions: waiting (") and "questions.jsonl" in one.stdout
    record = json.loads(batchd("status", "questions", "--json", config=config).stdout)
    assert record["job"] == "questions" and record["state"] == "waiting"
    assert record["phase"] in ("settling", "in_inbox")
    assert record["request_counts"]["total"] == 2
    gone = batchd("status", "nope", config=config)
    assert gone.returncode == 2 and "no such job: nope" in gone.stderr


def test_follow_starts_in_the_inbox_and_ends_with_the_job(spool_config, tmp_path):
    """The README's first job: submit, then at once `status --follow`, before any
    daemon has claimed the file; the claim (made here step by step) follows."""
    config = spool_config()
    settings = load_settings(config)
    src = tmp_path / "questions.jsonl"
    src.write_text(json.dumps(LINE) + "\n" + json.dumps(LINE | {"custom_id": "b"}) + "\n")
    assert batchd("submit", str(src), config=config).returncode == 0
    follow = subprocess.Popen([BATCHD, "status", "questions", "--follow", "--json",
                               "--config", str(config)], stdout=subprocess.PIPE, text=True)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: lines.extend(
        json.loads(raw) for raw in follow.stdout), daemon=True)
    try:
        reader.start()
        wait_for(lambda: lines, 30, what="the waiting line")
        assert lines[0]["state"] == "waiting" and lines[0]["job"] == "questions"
        for step in claim_steps(settings, "questions.jsonl", "questions"):
            step()
        assert follow.wait(30) == 0
        reader.join(10)
    finally:
        follow.kill()
    states = [line["state"] for line in lines]
    assert states[0] == "waiting" and states[-3:] == ["queued", "in_progress", "completed"]
    assert set(states[:-3]) == {"waiting"}
    assert {line["phase"] for line in lines[:-3]} <= {"settling", "in_inbox"}


def test_follow_polls_through_every_step_of_the_claim(settings, capsys, monkeypatch):
    """Each poll of the follower sees the next step of the claim, so it looks at
    the file in a claim in flight and at a reserved, empty status file too."""
    drop(settings.inbox, "q.jsonl", [LINE])
    first = waiting_file(settings, "q")
    steps = claim_steps(settings, "q.jsonl", "q")
    monkeypatch.setattr(views.time, "sleep", lambda _s: next(steps)())
    assert views.follow_waiting(settings, first, as_json=True) == 0
    printed = [json.loads(raw) for raw in capsys.readouterr().out.splitlines()]
    assert [p["state"] for p in printed] == ["waiting", "queued", "in_progress", "completed"]
    assert next(steps, None) is None  # it followed every step to the end


def test_follow_of_a_file_removed_from_the_inbox_ends(settings, capsys, monkeypatch):
    drop(settings.inbox, "q.jsonl", [LINE])
    first = waiting_file(settings, "q")
    monkeypatch.setattr(views.time, "sleep", lambda _s: (settings.inbox / "q.jsonl").unlink())
    assert views.follow_waiting(settings, first, as_json=True) == 1
    assert "q.jsonl left the inbox" in capsys.readouterr().err


def test_follow_before_the_daemon_claims_and_runs_it(settings, daemon, capsys):
    """An in-process daemon (the fake engine) claims and finishes the file while a
    follower that started on the inbox file follows it."""
    drop(settings.inbox, "q.jsonl", [LINE, LINE | {"custom_id": "b"}])
    first = waiting_file(settings, "q")
    assert first is not None
    done: list[int] = []
    follower = threading.Thread(target=lambda: done.append(
        views.follow_waiting(settings, first, as_json=True, poll=0.01)), daemon=True)
    follower.start()
    drain(daemon)
    follower.join(30)
    assert done == [0]
    printed = [json.loads(raw) for raw in capsys.readouterr().out.splitlines()
               if raw.startswith("{")]  # not the daemon's log lines
    assert printed[0]["state"] == "waiting" and printed[-1]["state"] == "completed"
    assert printed[-1]["request_counts"]["completed"] == 2


# -- the metrics -----------------------------------------------------------------------

def test_metrics_count_waiting_files(tmp_path):
    path = tmp_path / "batchd.prom"
    metrics = Metrics(path)
    metrics.waiting(3, settling=1)
    text = path.read_text()
    assert "batchd_jobs_waiting 3.0" in text and "batchd_jobs_settling 1.0" in text
    path.unlink()
    metrics.waiting(3, settling=1)  # unchanged: not rewritten on every pass of the loop
    assert not path.exists()
    metrics.waiting(0)
    assert "batchd_jobs_waiting 0.0" in path.read_text()


# -- the API ---------------------------------------------------------------------------

@pytest.fixture
def http(settings):
    return TestClient(create_app(settings))


def test_an_unclaimed_file_is_a_validating_batch(http, settings):
    drop(settings.inbox, "my q.jsonl", [LINE])  # claimed as my_q
    got = http.get("/v1/batches/my_q")
    assert got.status_code == 200, got.text
    batch = got.json()
    assert batch["status"] == "validating" and batch["endpoint"] == "/v1/chat/completions"
    assert batch["created_at"] and batch["output_file_id"] is None
    assert [b["id"] for b in http.get("/v1/batches").json()["data"]] == ["my_q"]
    assert http.get("/v1/batches/nope").status_code == 404
    (row,) = http.get("/dashboard/jobs").json()
    assert (row["job"], row["state"]) == ("my_q", "waiting")
    detail = http.get("/dashboard/jobs/my_q").json()
    assert detail["batch"]["status"] == "validating" and detail["history"] == []
    assert detail["waiting"]["state"] == "waiting" and detail["waiting"]["file"] == "my q.jsonl"


def test_a_file_dropped_again_is_a_new_waiting_batch(http, settings):
    (settings.outbox / "d.status.jsonl").write_text(status_line("d", "completed"))
    drop(settings.inbox, "d.jsonl", [LINE])
    assert http.get("/v1/batches/d").json()["status"] == "completed"
    assert http.get("/v1/batches/d-2").json()["status"] == "validating"
    assert {b["id"]: b["status"] for b in http.get("/v1/batches").json()["data"]} == {
        "d": "completed", "d-2": "validating"}


def test_created_batches_read_as_waiting_until_claimed(http):
    f = http.post("/v1/files", files={"file": ("in.jsonl", json.dumps(LINE).encode() + b"\n")},
                  data={"purpose": "batch"}).json()
    batch = http.post("/v1/batches", json={"input_file_id": f["id"], "completion_window": "24h",
                                           "endpoint": "/v1/chat/completions"}).json()
    assert batch["status"] == "validating"
    assert http.get(f"/v1/batches/{batch['id']}").json()["status"] == "validating"
    made = http.post("/v1/messages/batches", json={"requests": [
        {"custom_id": "a", "params": {"model": "tiny", "max_tokens": 4,
                                      "messages": [{"role": "user", "content": "hi"}]}}]})
    assert made.status_code == 200, made.text
    got = http.get(f"/v1/messages/batches/{made.json()['id']}").json()
    assert got["processing_status"] == "in_progress" and got["ended_at"] is None
    assert got["request_counts"]["processing"] == 1
    assert got["created_at"].endswith("Z")
