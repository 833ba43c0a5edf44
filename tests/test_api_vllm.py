"""`batchd api` beside a real daemon on real vLLM (the tiny random Llama): the
OpenAI cookbook flow with the real SDK, cancel, the dashboard in headless
Chromium, and a kill -9 of both processes mid-batch.

One daemon and one API serve the module (the engine loads once); the restart
test comes last and leaves new processes for the teardown to stop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from openai.types.chat import ChatCompletion

from conftest import TINY_PROFILE, ApiProcess, DaemonProcess, drop, served_spool, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chat(i: int, max_tokens: int = 8) -> dict:
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": f"Question number {i}?"}]}}


def jsonl(items: list) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items).encode()


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("api")
    config = served_spool(base, tiny_model.parent, {"tiny": TINY_PROFILE},
                          "[engine]\nwindow = 32\n")
    stack = SimpleNamespace(config=config, spool=base / "spool", daemon=DaemonProcess(config),
                            api=ApiProcess(config))
    try:
        stack.daemon.wait_ready(timeout=300)
        stack.api.wait_ready()
        yield stack
        stack.api.stop()
        assert stack.daemon.stop() == 0, stack.daemon.log.read_text()[-3000:]
    finally:
        for daemon in (stack.daemon,):
            if daemon.proc.poll() is None:
                daemon.kill_tree()
        if stack.api.proc.poll() is None:
            stack.api.proc.kill()


def wait_batch(client, batch_id: str, timeout: float = 300):
    final = ("completed", "failed", "cancelled", "expired")
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in final and b,
                    timeout, 0.3, what=f"batch {batch_id} to end")


def test_cookbook_flow_and_cancel_on_real_vllm(served):
    client = served.api.client()
    data = jsonl([chat(i) for i in range(6)] + ["{broken"])
    upload = client.files.create(file=("questions.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "cookbook"})
    # A second batch, cancelled while the first runs: it never reaches the engine.
    other = client.files.create(file=("other.jsonl", jsonl([chat(i) for i in range(300)])),
                                purpose="batch")
    doomed = client.batches.create(input_file_id=other.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    assert client.batches.cancel(doomed.id).status == "cancelling"
    done = wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (7, 6, 1)
    assert done.model == "batchd/tiny-llama" and done.metadata == {"run": "cookbook"}
    out = [json.loads(l) for l in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == [f"q{i}" for i in range(6)]
    for r in out:
        body = ChatCompletion.model_validate(r["response"]["body"])
        assert body.usage.completion_tokens == 8
    errors = client.files.content(done.error_file_id).text.splitlines()
    assert json.loads(errors[0])["response"]["body"]["error"]["code"] == "invalid_json_line"
    assert done.usage.output_tokens == 48
    cancelled = wait_batch(client, doomed.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts.completed == 0
    assert cancelled.output_file_id is not None  # an empty results file, as published
    assert len(client.files.content(cancelled.error_file_id).text.splitlines()) == 300
    # The list, one batch a page: the SDK follows `after`, newest first.
    walked = [b.id for page in client.batches.list(limit=1).iter_pages() for b in page.data]
    assert {doomed.id, batch.id} <= set(walked) and len(walked) == len(set(walked))
    assert walked == [b.id for b in client.batches.list(limit=100).data]  # same order


def test_anthropic_sdk_message_batches_on_real_vllm(served):
    """Anthropic's SDK, unchanged but for its base URL: create, retrieve until
    ended, results, cancel of a second batch, list."""
    import anthropic

    client = anthropic.Anthropic(base_url=served.api.url, api_key="none", max_retries=0)
    params = {"model": "tiny", "max_tokens": 6, "temperature": 0,
              "messages": [{"role": "user", "content": "Name a colour."}]}
    batch = client.messages.batches.create(requests=[
        {"custom_id": "plain", "params": params},
        {"custom_id": "system", "params": {**params, "system": "Be brief."}},
        {"custom_id": "invalid", "params": {**params, "max_tokens": 0}}])
    assert batch.type == "message_batch" and batch.processing_status == "in_progress"
    doomed = client.messages.batches.create(requests=[
        {"custom_id": f"r{i}", "params": {**params, "max_tokens": 16}} for i in range(300)])
    assert client.messages.batches.cancel(doomed.id).processing_status in ("canceling",
                                                                            "ended")
    ended = wait_for(lambda: (b := client.messages.batches.retrieve(batch.id))
                     .processing_status == "ended" and b, 300, 0.3, what="the batch to end")
    assert ended.request_counts.succeeded == 2 and ended.request_counts.errored == 1
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["plain"].type == "succeeded"
    message = results["plain"].message
    assert message.model == "batchd/tiny-llama" and message.usage.output_tokens >= 1
    assert results["invalid"].type == "errored"
    assert results["invalid"].error.error.type == "invalid_request_error"
    gone = wait_for(lambda: (b := client.messages.batches.retrieve(doomed.id))
                    .processing_status == "ended" and b, 300, 0.3, what="the cancel")
    counts = gone.request_counts
    assert counts.canceled > 0 and counts.succeeded + counts.canceled + counts.errored == 300
    listed = [b.id for b in client.messages.batches.list(limit=10)]
    assert listed[:2] == [doomed.id, batch.id]
    # the same batch on the OpenAI side
    assert served.api.client().batches.retrieve(batch.id).status == "completed"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_nope")


def _dom(url: str) -> str:
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=3000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=60)
    return run.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make system-deps "
                    "installs it); the dashboard was not loaded in a browser")
def test_dashboard_in_headless_chromium(served, tmp_path):
    """A file dropped into the inbox shows up on the page and reaches completed."""
    drop(served.spool / "inbox", "dashboard-demo.jsonl", [chat(i, 16) for i in range(40)])
    seen = []

    def state_on_page():
        dom = _dom(served.api.url + "/")
        marker = 'id="job-dashboard-demo" data-job="dashboard-demo" data-state="'
        if marker not in dom:
            return None
        state = dom.split(marker, 1)[1].split('"', 1)[0]
        seen.append(state)
        return state == "completed"

    wait_for(state_on_page, 300, 0.5, what="the page to show dashboard-demo completed")
    assert seen[-1] == "completed"
    dropped = served.api.client().batches.retrieve("dashboard-demo")  # a dropped file is a batch
    assert dropped.status == "completed" and dropped.request_counts.completed == 40
    detail = _dom(served.api.url + "/#job=dashboard-demo")
    assert "Status history" in detail and '"succeeded": 40' in detail  # the bench record
    shot = Path(os.environ.get("BATCHD_SCREENSHOT", tmp_path / "dashboard.png"))
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1400,760", "--virtual-time-budget=3000",
                    f"--screenshot={shot}", served.api.url + "/#job=dashboard-demo"],
                   capture_output=True, timeout=60, check=True)
    assert shot.stat().st_size > 10_000


def test_kill9_of_both_processes_mid_batch_loses_nothing(served):
    client = served.api.client()
    items = [chat(i, 16) for i in range(150)]
    upload = client.files.create(file=("long.jsonl", jsonl(items)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 10, 300,
             0.2, what="part of the batch answered")
    served.daemon.kill_tree()
    served.api.proc.kill()
    served.api.proc.wait(10)
    with pytest.raises(openai.APIConnectionError):
        client.batches.retrieve(batch.id)
    served.daemon = DaemonProcess(served.config)
    served.api = ApiProcess(served.config, port=served.api.port)
    served.daemon.wait_ready(timeout=300)
    served.api.wait_ready()
    done = wait_batch(client, batch.id)  # the same client and id after the restart
    assert done.status == "completed" and done.request_counts.completed == 150
    out = [json.loads(l) for l in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == sorted(f"q{i}" for i in range(150))
    assert done.error_file_id is None
