"""Pictures in batch lines on real vLLM (the CPU build, the shipped tiny-vision
profile: a random Idefics3, each image 4 image tokens and 3 around them).

One daemon and one `batchd api` serve the module. A job dropped with its
media folder (cp -r of the folder, then the file by rename) answers images by
relative path, in a subfolder, two in one line, a data: URL, a text-only line
and an Anthropic base64 block; hostile lines are each their line's
invalid_image; the answers equal vLLM's own server started with
--allowed-local-media-path on the same pictures; the OpenAI SDK's batch with
data: URLs runs through `batchd api`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import (MODELS, ROOT, ApiProcess, DaemonProcess, drop, final_state,
                      free_port, outputs, served_spool, wait_for)
from test_fidelity import comparable

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "batchd/tiny-vision"
# The shipped profile with the scheduler's batch given, as vLLM's server gets it
# (batchd opens vLLM with LLM's offline defaults; the server's differ).
PROFILE = (ROOT / "profiles" / "tiny-vision.toml").read_text().replace(
    "[engine]\n", "[engine]\nmax_num_seqs = 256\nmax_num_batched_tokens = 4096\n", 1)
SERVER_FLAGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
                "--limit-mm-per-prompt", '{"image": 4}', "--enable-prompt-tokens-details",
                "--max-num-seqs", "256", "--max-num-batched-tokens", "4096"]
QUESTION = "What is in the picture?"
PER_IMAGE = 7  # prompt tokens an image adds on this model


def png(color, size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def chat(custom_id: str, *urls: str) -> dict:
    content = [{"type": "text", "text": QUESTION},
               *({"type": "image_url", "image_url": {"url": u}} for u in urls)]
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "max_tokens": 6, "temperature": 0,
                     "messages": [{"role": "user", "content": content if urls else QUESTION}]}}


@pytest.fixture(scope="module")
def served(vision_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    config = served_spool(base, MODELS, {"tiny-vision": PROFILE})
    stack = SimpleNamespace(base=base, spool=base / "spool", daemon=DaemonProcess(config),
                            api=ApiProcess(config))
    try:
        stack.daemon.wait_ready(timeout=300)
        stack.api.wait_ready()
        yield stack
        stack.api.stop()
        assert stack.daemon.stop() == 0, stack.daemon.log.read_text()[-3000:]
    finally:
        if stack.daemon.proc.poll() is None:
            stack.daemon.kill_tree()
        if stack.api.proc.poll() is None:
            stack.api.proc.kill()


def test_a_job_with_its_media_folder_answers_as_vllm_serves_it(served):
    made = served.base / "photos.media"
    (made / "sub").mkdir(parents=True)
    (made / "cat.png").write_bytes(png((200, 30, 30)))
    (made / "sub" / "dog.png").write_bytes(png((30, 200, 30), (64, 64)))
    (made / "notes.png").write_text("a shopping list, not a picture")
    secret = served.base / "secret.png"
    secret.write_bytes(png((0, 0, 255)))
    (made / "out.png").symlink_to(secret)
    inbox = served.spool / "inbox"
    subprocess.run(["cp", "-r", str(made), str(inbox)], check=True)  # the folder first
    data = "data:image/png;base64," + base64.b64encode(png((10, 10, 10))).decode()
    anthropic = {"custom_id": "anthropic", "params": {
        "model": MODEL, "max_tokens": 6, "temperature": 0, "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": data.split(",", 1)[1]}},
                {"type": "text", "text": QUESTION}]}]}}
    good = [chat("rel", "cat.png"), chat("sub", "sub/dog.png"),
            chat("two", "cat.png", "sub/dog.png"), chat("data", data), chat("text")]
    hostile = [chat("dotdot", "../../../secret.png"), chat("abs", str(secret)),
               chat("link", "out.png"), chat("missing", "gone.png"),
               chat("notimage", "notes.png"), chat("http", "http://example.com/cat.png")]
    drop(inbox, "photos.jsonl", [*good, anthropic, *hostile])
    wait_for(lambda: final_state(served.spool / "outbox", "photos") == "completed", 300,
             what="the picture job to complete")
    results, errors = outputs(served.spool / "outbox", "photos")
    bodies = {r["custom_id"]: r["response"]["body"] for r in results if "response" in r}
    assert sorted(bodies) == sorted(line["custom_id"] for line in good)
    text = bodies["text"]["usage"]["prompt_tokens"]
    images = {"rel": 1, "sub": 1, "two": 2, "data": 1}
    for custom_id, n in images.items():  # the prompts hold the image tokens
        assert bodies[custom_id]["usage"]["prompt_tokens"] == text + n * PER_IMAGE, custom_id
    [answered] = [r for r in results if r["custom_id"] == "anthropic"]
    assert answered["result"]["type"] == "succeeded", answered
    assert answered["result"]["message"]["usage"]["input_tokens"] == text + PER_IMAGE
    refused = {e["custom_id"]: e["response"]["body"]["error"] for e in errors}
    assert sorted(refused) == sorted(line["custom_id"] for line in hostile)
    for custom_id, error in refused.items():
        assert error["code"] == "invalid_image", (custom_id, error)
        assert error["message"].startswith("line "), error
    kept = served.spool / "outbox" / "photos.media"
    assert (kept / "sub" / "dog.png").is_file() and not (inbox / "photos.media").exists()
    assert json.loads((served.spool / "outbox" / "photos.bench.json").read_text())[
        "images"] == 6
    # vLLM's own server, reading the same pictures under --allowed-local-media-path
    port = free_port()
    log = open(served.base / "server.log", "wb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
         str(MODELS / "tiny-vision"), "--served-model-name", MODEL, "--port", str(port),
         "--host", "127.0.0.1", "--allowed-local-media-path", str(kept), *SERVER_FLAGS],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def up():
            assert server.poll() is None, (served.base / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                return True
            except OSError:
                return False

        wait_for(up, 300, interval=1.0, what="vLLM's API server")
        for line in good:
            body = json.loads(json.dumps(line["body"]))
            for message in body["messages"]:
                for part in message["content"] if isinstance(message["content"], list) else []:
                    url = part.get("image_url", {}).get("url", "")
                    if not url.startswith("data:") and part["type"] == "image_url":
                        part["image_url"]["url"] = (kept / url).as_uri()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as reply:
                served_body = json.loads(reply.read())
            assert comparable(bodies[line["custom_id"]]) == comparable(served_body), \
                line["custom_id"]
        # vLLM's own fence, as batchd starts its engine (work/media/ there): a
        # file outside the allowed folder, or a link inside it that leads out,
        # is refused by vLLM itself
        for url in (secret.as_uri(), (kept / "out.png").as_uri(),
                    (kept / ".." / "secret.png").as_uri()):
            body = {**chat("x", url)["body"]}
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused_by_vllm:
                urllib.request.urlopen(request, timeout=120)
            assert refused_by_vllm.value.code == 400
            assert "allowed-local-media-path" in refused_by_vllm.value.read().decode(), url
    finally:
        server.terminate()
        server.wait(120)


def test_data_urls_through_the_openai_sdk(served):
    client = served.api.client()
    data = "data:image/png;base64," + base64.b64encode(png((90, 90, 200))).decode()
    lines = [chat("img", data), chat("plain")]
    upload = client.files.create(file=("pics.jsonl", "".join(json.dumps(x) + "\n"
                                                              for x in lines).encode()),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status in
                    ("completed", "failed") and b, 300, 0.3, what="the batch")
    assert done.status == "completed" and done.request_counts.completed == 2, done
    out = {r["custom_id"]: r["response"]["body"] for r in
           map(json.loads, client.files.content(done.output_file_id).text.splitlines())}
    assert out["img"]["usage"]["prompt_tokens"] == \
        out["plain"]["usage"]["prompt_tokens"] + PER_IMAGE
