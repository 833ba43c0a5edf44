"""`batchd api` with the real `openai` SDK against real `batchd api` and
`python -m batchd.testing run` processes (the fake engine) (fast); test_api_vllm.py runs the
same flow on real vLLM and drives the dashboard in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import openai
import pytest

from conftest import BATCHD, drop, read_jsonl, wait_for

pytestmark = pytest.mark.slow  # real processes: a few seconds each

GOOD = {"method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}}


def lines(n: int, prefix: str = "r") -> bytes:
    return "".join(json.dumps(GOOD | {"custom_id": f"{prefix}{i}"}) + "\n"
                   for i in range(n)).encode()


@pytest.fixture
def stack(spool_config, daemons, apis):
    """A fake-engine daemon and the API on one spool; STEP slows the engine."""

    def start(extra: str = "", step: float = 0.0, api_args: tuple = ()):
        config = spool_config(extra)
        daemon = daemons(config, env={"BATCHD_FAKE_STEP_SECONDS": str(step)}, fake=True)
        daemon.wait_ready()
        api = apis(config, args=api_args)
        return config, daemon, api

    return start


def wait_batch(client, batch_id: str, states=("completed", "failed", "cancelled", "expired"),
               timeout: float = 60):
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in states and b,
                    timeout, 0.2, what=f"batch {batch_id} in {states}")


def test_cookbook_flow(stack):
    """Upload, create, poll, download output and errors: the OpenAI cookbook."""
    _, _, api = stack()
    client = api.client()
    data = lines(5) + b"not json\n" + json.dumps(GOOD | {"custom_id": "r0"}).encode() + b"\n"
    upload = client.files.create(file=("reviews.jsonl", data), purpose="batch")
    assert upload.bytes == len(data) and upload.filename == "reviews.jsonl"
    assert client.files.retrieve(upload.id).purpose == "batch"
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"team": "search"})
    assert batch.status in ("validating", "in_progress", "finalizing", "completed")
    assert batch.expires_at - batch.created_at == 24 * 3600
    done = wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 7
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 2)
    assert done.metadata == {"team": "search"} and done.model == "batchd/tiny-llama"
    assert done.in_progress_at and done.completed_at >= done.created_at
    assert done.usage.output_tokens > 0
    out = [json.loads(l) for l in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == [f"r{i}" for i in range(5)]
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in out)
    errors = [json.loads(l) for l in client.files.content(done.error_file_id).text.splitlines()]
    assert sorted(e["response"]["body"]["error"]["code"] for e in errors) == [
        "duplicate_custom_id", "invalid_json_line"]
    assert client.files.content(done.input_file_id).content == data
    listed = {f.id for f in client.files.list()}
    assert {upload.id, done.output_file_id, done.error_file_id} <= listed
    assert done.id in {b.id for b in client.batches.list()}


def test_dropped_file_is_a_batch(stack, settings):
    _, _, api = stack()
    client = api.client()
    drop(settings.inbox, "dropped.jsonl", [GOOD | {"custom_id": "a"}, GOOD | {"custom_id": "b"}])
    done = wait_batch(client, "dropped")
    assert done.status == "completed" and done.request_counts.completed == 2
    assert done.endpoint == "/v1/chat/completions" and done.completion_window == "none"
    assert done.input_file_id == "file-dropped.input"
    assert b'"custom_id": "a"' in client.files.content(done.input_file_id).content
    assert "file-dropped.results" in {f.id for f in client.files.list(purpose="batch_output")}


def test_cancel_and_pagination(stack):
    _, _, api = stack(step=0.2)
    client = api.client()
    upload = client.files.create(file=("many.jsonl", lines(200)), purpose="batch")
    ids = [client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id for _ in range(3)]
    wait_for(lambda: client.batches.retrieve(ids[0]).request_counts.completed > 0, 30,
             what="the first batch to start")
    cancelling = client.batches.cancel(ids[0])
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    for batch_id in ids[1:]:
        client.batches.cancel(batch_id)
    ended = [wait_batch(client, batch_id) for batch_id in ids]
    assert [b.status for b in ended] == ["cancelled"] * 3
    first = ended[0]
    assert first.request_counts.completed > 0 and first.cancelled_at
    out = client.files.content(first.output_file_id).text.splitlines()
    errs = client.files.content(first.error_file_id).text.splitlines()
    assert len(out) + len(errs) == 200  # every line answered or cancelled
    assert {json.loads(e)["response"]["body"]["error"]["code"] for e in errs} == {"cancelled"}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(ids[0])
    # One batch a page: the SDK follows `after` to the end, newest first.
    page = client.batches.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    walked = [b.id for b in client.batches.list(limit=1).iter_pages() for b in b.data]
    assert walked == sorted(walked, key=lambda i: -client.batches.retrieve(i).created_at) \
        and set(ids) <= set(walked) and len(walked) == len(set(walked))


def test_bad_requests_get_openai_errors(stack):
    _, _, api = stack(extra="[limits]\nmax_file_bytes = 4096\n")
    client = api.client()
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.retrieve("nope")
    assert exc.value.body["code"] == "batch_not_found"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-000000000000000000000000",
                              endpoint="/v1/chat/completions", completion_window="24h")
    upload = client.files.create(file=("a.jsonl", lines(2)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/images/generations",
                              completion_window="24h")
    assert exc.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                              completion_window="soon")
    assert exc.value.body["param"] == "completion_window"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    assert exc.value.body["param"] == "purpose"
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=("big.jsonl", lines(100)), purpose="batch")
    assert exc.value.status_code == 413 and exc.value.body["code"] == "file_too_large"
    # Ids never name a path: traversal, hidden names and job files of running jobs.
    # (raw requests: the SDK itself refuses dot segments)
    import httpx
    for bad in ("files/file-..", "files/file-..%2F..%2Fetc%2Fpasswd", "files/file-.hidden.results",
                "files/file-x.status", "files/file-%2e%2e%2fconfig.toml/content",
                "batches/..%2F..%2Fconfig", "batches/.hidden", "files/file-a%00.results"):
        got = httpx.get(f"{api.url}/v1/{bad}", timeout=5)
        assert got.status_code == 404 and "error" in got.json(), bad
    raw = httpx.post(api.url + "/v1/files", content=b"plain", timeout=5)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "file"
    assert not [p for p in (api.config.parent / "spool" / "api" / "files").iterdir()
                if p.name.startswith(".")]  # refused uploads leave nothing behind


def test_expired_window_keeps_finished_lines(stack):
    _, _, api = stack(step=0.2)
    client = api.client()
    upload = client.files.create(file=("slow.jsonl", lines(300)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="3s")
    done = wait_batch(client, batch.id)
    assert done.status == "expired" and done.expired_at
    counts = done.request_counts
    assert counts.completed > 0 and counts.failed > 0 and counts.total == 300
    errors = client.files.content(done.error_file_id).text.splitlines()
    assert {json.loads(e)["response"]["body"]["error"]["code"] for e in errors} == {
        "batch_expired"}


def test_keys(stack, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# operators\nsecret-one\nsecret-two\n")
    _, _, api = stack(extra=f'[api]\nkeys_file = "{keys}"\n')
    with pytest.raises(openai.AuthenticationError):
        api.client("wrong").batches.list()
    import httpx
    assert httpx.get(api.url + "/v1/files", timeout=5).status_code == 401  # no key at all
    assert api.client("secret-two").batches.list().data == []
    assert httpx.get(api.url + "/", timeout=5).status_code == 200  # the page has no data
    assert httpx.get(api.url + "/dashboard/jobs", timeout=5).status_code == 401
    keys.write_text("secret-three\n")  # rotated without a restart
    with pytest.raises(openai.AuthenticationError):
        api.client("secret-one").batches.list()
    assert api.client("secret-three").batches.list().data == []
    # Anthropic's SDK sends x-api-key; a wrong one gets Anthropic's 401
    import anthropic
    assert anthropic.Anthropic(base_url=api.url, api_key="secret-three",
                               max_retries=0).messages.batches.list().data == []
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=api.url, api_key="secret-one",
                            max_retries=0).messages.batches.list()


def test_refuses_to_listen_beyond_localhost_without_keys(spool_config, tmp_path):
    config = spool_config()
    run = subprocess.run([BATCHD, "api", "--config", str(config), "--listen", "0.0.0.0:8080"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "without API keys" in run.stderr
    empty = tmp_path / "empty-keys"
    empty.write_text("# none yet\n")
    config = spool_config(f'[api]\nkeys_file = "{empty}"\n')
    run = subprocess.run([BATCHD, "api", "--config", str(config), "--listen", "0.0.0.0:8080"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "has no keys" in run.stderr


def test_restart_of_both_processes_mid_batch_loses_nothing(stack, daemons, apis):
    config, daemon, api = stack(step=0.1)
    client = api.client()
    upload = client.files.create(file=("long.jsonl", lines(300)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 40, 30,
             what="part of the batch done")
    daemon.kill_tree()  # kill -9, as a crash
    api.proc.kill()
    api.proc.wait(10)  # both gone: restart at once, on the same port
    daemons(config, env={"BATCHD_FAKE_STEP_SECONDS": "0.02"}, fake=True).wait_ready()
    api2 = apis(config, port=api.port)
    client2 = api2.client()
    assert client2.batches.retrieve(batch.id).id == batch.id  # same id after the restart
    done = wait_batch(client2, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 300
    out = [json.loads(l) for l in client2.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == sorted(f"r{i}" for i in range(300))
    assert done.error_file_id is None
    assert client2.files.retrieve(upload.id).bytes == len(lines(300))


def test_uploads_stream_to_disk(stack):
    """A 20 MB upload arrives whole, byte for byte, without the API holding it in memory."""
    import psutil
    _, _, api = stack()
    client = api.client()
    body = lines(60_000)
    rss_before = psutil.Process(api.proc.pid).memory_info().rss
    upload = client.files.create(file=("big.jsonl", body), purpose="batch")
    rss_after = psutil.Process(api.proc.pid).memory_info().rss
    assert upload.bytes == len(body)
    assert client.files.content(upload.id).content == body
    assert rss_after - rss_before < len(body)  # not held whole
    assert os.path.getsize(api.config.parent / "spool" / "api" / "files"
                           / f"{upload.id}.jsonl") == len(body)
    assert read_jsonl(api.config.parent / "spool" / "api" / "files" / f"{upload.id}.json") \
        == [client.files.retrieve(upload.id).model_dump()]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make system-deps "
                    "installs it); the dashboard was not loaded in a browser")
def test_dashboard_shows_failed_lines(stack, settings, tmp_path):
    """A job whose lines partly failed carries a failed share on its bar and a
    badge; one whose every line failed says so beside its state. Its screenshot
    (BATCHD_SCREENSHOT=docs/dashboard-failed.png keeps it) shows both."""
    from conftest import final_state
    _, _, api = stack()
    drop(settings.inbox, "partly.jsonl", [GOOD | {"custom_id": "a"}, "{oops",
                                          GOOD | {"custom_id": "b"}, "{oops"])
    drop(settings.inbox, "allbad.jsonl", ["{oops", '{"prompt": 1}'])
    for job in ("partly", "allbad"):
        wait_for(lambda job=job: final_state(settings.outbox, job), 60, what=f"{job} to end")
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=3000", "--dump-dom", api.url + "/"],
                         capture_output=True, text=True, timeout=60).stdout
    rows = {job: dom.split(f'id="job-{job}"', 1)[1].split("</tr>", 1)[0]
            for job in ("partly", "allbad")}
    assert 'data-failed="2"' in rows["partly"] and ">2 failed<" in rows["partly"]
    assert 'class="bad" style="width: 50%;"' in rows["partly"]
    assert ">all 2 failed<" in rows["allbad"] and 'data-state="completed"' in rows["allbad"]
    # a job's history: newest first, a run of lines saying the same folded into one row
    detail = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                             "--virtual-time-budget=3000", "--dump-dom",
                             api.url + "/#job=partly"], capture_output=True, text=True,
                            timeout=60).stdout
    history = re.findall(r'<tr class="history">(.*?)</tr>', detail)
    states = [re.findall(r"<td[^>]*>([^<]*)</td>", row)[1] for row in history]
    assert states[0] == "completed" and states[-1] == "queued", states
    said = [re.sub(r"^<td>[^<]*</td>", "", row) for row in history]  # all but the time
    assert all(a != b for a, b in zip(said, said[1:])), said
    shot = Path(os.environ.get("BATCHD_SCREENSHOT", tmp_path / "dashboard-failed.png"))
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1400,500", "--virtual-time-budget=3000",
                    f"--screenshot={shot.resolve()}", api.url + "/#job=partly"],
                   capture_output=True, timeout=60, check=True)
    assert shot.stat().st_size > 10_000
