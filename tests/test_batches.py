"""The spool as OpenAI Files and Batches, in-process (fast): batchd/api/ (batches, files)
and the routes of batchd/api/app.py through FastAPI's test client, with the in-process
daemon on the fake engine. The real processes and the SDK: test_api.py."""

from __future__ import annotations

import json
import os

import pytest
from fastapi.testclient import TestClient

from batchd.api.app import create_app, is_local, parse_listen
from batchd.api.batches import Store
from batchd.api.files import ApiError
from batchd.config import ConfigError

from conftest import drain, drop

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "hi"}]}}


@pytest.fixture
def http(settings):
    return TestClient(create_app(settings))


def upload(http, data: bytes, purpose: str = "batch") -> dict:
    got = http.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": purpose})
    assert got.status_code == 200, got.text
    return got.json()


def test_created_batch_is_a_dropped_file_the_daemon_runs(http, daemon, settings):
    data = (json.dumps(LINE) + "\n" + json.dumps(LINE | {"custom_id": "b"}) + "\n").encode()
    f = upload(http, data)
    batch = http.post("/v1/batches", json={"input_file_id": f["id"], "completion_window": "2h",
                                           "endpoint": "/v1/chat/completions"}).json()
    job = batch["id"]
    assert batch["status"] == "validating" and batch["expires_at"] - batch["created_at"] == 7200
    assert (settings.inbox / f"{job}.jsonl").read_bytes() == data  # dropped like any file
    assert "expires_at" in (settings.inbox / f"{job}.toml").read_text()
    drain(daemon)
    done = http.get(f"/v1/batches/{job}").json()
    assert done["status"] == "completed" and done["request_counts"] == {
        "total": 2, "completed": 2, "failed": 0}
    assert done["output_file_id"] == f"file-{job}.results" and done["error_file_id"] is None
    assert len(http.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()) == 2
    assert http.get("/v1/batches").json()["data"][0]["id"] == job


def test_waiting_and_running_states(settings, daemon):
    store = Store(settings)
    store.ensure_dirs()
    drop(settings.inbox, "waiting.jsonl", [LINE])
    assert store.batch("waiting")["status"] == "validating"
    (settings.inbox / "waiting.cancel").write_text("")
    assert store.batch("waiting")["status"] == "cancelling"
    drain(daemon)
    ended = store.batch("waiting")
    assert ended["status"] == "cancelled" and ended["cancelled_at"]
    assert ended["output_file_id"] == "file-waiting.results"
    assert ended["error_file_id"] == "file-waiting.errors"


def test_pages_follow_after(settings, daemon):
    for n in range(5):
        drop(settings.inbox, f"p{n}.jsonl", [LINE])
    drain(daemon)
    http = TestClient(create_app(settings))
    seen, after = [], None
    while True:
        page = http.get("/v1/batches", params={"limit": 2} | ({"after": after} if after
                                                              else {})).json()
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(seen) == [f"p{n}" for n in range(5)] and len(seen) == 5
    assert http.get("/v1/batches", params={"limit": 0}).status_code == 400


def test_job_file_ids_never_leave_their_folder(settings):
    store = Store(settings)
    store.ensure_dirs()
    (settings.outbox / "x.status.jsonl").write_text("")
    for bad in ("file-../x.results", "file-x.status", "file-.x.results", "file-x/y.results",
                "file-", "file-x", "x.results", "file-0123", "file-x.results\x00"):
        assert store.files.path(bad) is None, bad
    assert store.files.path("file-x.results") is None  # not published: not final yet


def test_listen_addresses():
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert is_local("127.0.0.5") and is_local("::1") and is_local("localhost")
    assert not is_local("0.0.0.0") and not is_local("example.org")
    for bad in ("8080", "host:", ":80", "h:99999"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def test_a_file_being_claimed_is_still_a_batch(settings):
    """Between the claim's rename out of the inbox and its status file, the file
    is a claim in work/: the API still finds the batch (it once answered 404)."""
    store = Store(settings)
    store.ensure_dirs()
    claim = settings.layout.claim(os.getpid(), 1, "host", "inflight.jsonl")
    claim.write_text('{"prompt": "x"}\n')
    assert store.batch("inflight")["status"] == "validating"
    claim.unlink()
    with pytest.raises(ApiError):
        store.batch("inflight")


def test_a_retry_batch_names_its_original_and_serves_the_merged_file(http, daemon, settings):
    data = "".join(json.dumps(LINE | {"custom_id": c}) + "\n" for c in "abc").encode()
    f = upload(http, data)
    batch = http.post("/v1/batches", json={"input_file_id": f["id"],
                                           "endpoint": "/v1/chat/completions"}).json()
    assert http.post(f"/v1/batches/{batch['id']}/cancel").status_code == 200
    drain(daemon)
    assert http.get(f"/v1/batches/{batch['id']}").json()["status"] == "cancelled"
    got = http.post(f"/v1/batches/{batch['id']}/retry", json={"metadata": {"why": "again"}})
    assert got.status_code == 200, got.text
    retry = got.json()
    assert retry["id"] != batch["id"] and retry["id"].startswith("batch_")
    assert retry["metadata"] == {"why": "again", "retry_of": batch["id"]}
    assert retry["status"] == "validating" and retry["endpoint"] == "/v1/chat/completions"
    drain(daemon)
    done = http.get(f"/v1/batches/{retry['id']}").json()
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
    merged = http.get(f"/v1/files/{done['merged_file_id']}/content").text.splitlines()
    assert [json.loads(l)["custom_id"] for l in merged] == ["a", "b", "c"]
    again = http.post(f"/v1/batches/{retry['id']}/retry")
    assert again.status_code == 400 and again.json()["error"]["code"] == "nothing_to_retry"
    assert http.post("/v1/batches/batch_nope/retry").status_code == 404


MSG_PARAMS = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def test_message_batches_over_the_spool(http, daemon, settings):
    made = http.post("/v1/messages/batches", json={"requests": [
        {"custom_id": "one", "params": MSG_PARAMS},
        {"custom_id": "two", "params": {**MSG_PARAMS, "messages": []}}]})
    assert made.status_code == 200, made.text
    batch = made.json()
    assert batch["type"] == "message_batch" and batch["id"].startswith("msgbatch_")
    assert batch["processing_status"] == "in_progress" and batch["results_url"] is None
    assert batch["request_counts"]["processing"] == 2
    assert batch["created_at"].endswith("Z") and batch["expires_at"] > batch["created_at"]
    early = http.get(f"/v1/messages/batches/{batch['id']}/results")
    assert early.status_code == 404 and early.json()["error"]["type"] == "not_found_error"
    drain(daemon)
    done = http.get(f"/v1/messages/batches/{batch['id']}").json()
    assert done["processing_status"] == "ended" and done["ended_at"]
    assert done["request_counts"] == {"processing": 0, "succeeded": 1, "errored": 1,
                                      "canceled": 0, "expired": 0}
    assert done["results_url"].endswith(f"/v1/messages/batches/{batch['id']}/results")
    lines = [json.loads(l) for l in
             http.get(f"/v1/messages/batches/{batch['id']}/results").text.splitlines()]
    assert [(l["custom_id"], l["result"]["type"]) for l in lines] == [
        ("one", "succeeded"), ("two", "errored")]
    # the same job through the OpenAI side
    assert http.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed"
    listed = http.get("/v1/messages/batches").json()
    assert [b["id"] for b in listed["data"]] == [batch["id"]] and not listed["has_more"]
    gone = http.delete(f"/v1/messages/batches/{batch['id']}").json()
    assert gone == {"id": batch["id"], "type": "message_batch_deleted"}
    missing = http.get(f"/v1/messages/batches/{batch['id']}")
    assert missing.status_code == 404 and missing.json()["type"] == "error"


def test_message_batch_cancel_and_refusals(http, daemon, settings):
    batch = http.post("/v1/messages/batches", json={"requests": [
        {"custom_id": "a", "params": MSG_PARAMS}]}).json()
    cancelled = http.post(f"/v1/messages/batches/{batch['id']}/cancel").json()
    assert cancelled["processing_status"] == "canceling" and cancelled["cancel_initiated_at"]
    refused = http.delete(f"/v1/messages/batches/{batch['id']}")
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "invalid_request_error"
    drain(daemon)
    ended = http.get(f"/v1/messages/batches/{batch['id']}").json()
    assert ended["request_counts"]["canceled"] == 1
    for bad in ([{"custom_id": "bad id!", "params": MSG_PARAMS}],
                [{"custom_id": "x", "params": MSG_PARAMS}] * 2, [],
                [{"custom_id": "x", "params": MSG_PARAMS, "extra": 1}]):
        got = http.post("/v1/messages/batches", json={"requests": bad})
        assert got.status_code == 400 and got.json()["type"] == "error", got.text
