"""batchd's answers against vLLM's own: the same multi-feature file through a
batchd daemon, vLLM's OpenAI API server and vLLM's batch runner, on the same
local model with the same server options; bodies equal field by field once
ids and timestamps are removed.

The model is the tiny random Llama (its tokenizer has <think> and <tool_call>
tokens, so the qwen3 reasoning parser and the hermes tool parser load on it).
Its text is noise, so every line is greedy or seeded, and the reasoning line
controls the model's output with a regex (structured outputs apply inside
reasoning: enable_in_reasoning) after a prefilled "<think>" assistant turn.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import (BENCH_TINY, DaemonProcess, drop, final_state, free_port, read_jsonl,
                      served_spool, wait_for)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "batchd/tiny-llama"
# The server's options, as `vllm serve` flags and as the profile that says the same.
# The scheduler's batch is given explicitly: vLLM's defaults differ by entry
# point (batchd opens vLLM with LLM's offline defaults).
SERVER_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                "--enable-prompt-tokens-details",  # batchd always reports cached_tokens
                "--max-num-seqs", "256", "--max-num-batched-tokens", "4096",
                "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
                "--reasoning-parser", "qwen3",
                "--structured-outputs-config", '{"enable_in_reasoning": true}']
# The tests' tiny profile (its [engine] table last), with the same options added.
PROFILE = BENCH_TINY + """max_num_seqs = 256
max_num_batched_tokens = 4096
structured_outputs_config = { enable_in_reasoning = true }
[chat]
tool_call_parser = "hermes"
enable_auto_tool_choice = true
reasoning_parser = "qwen3"
"""

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12},
                                           "sure": {"type": "boolean"}},
          "required": ["answer", "sure"], "additionalProperties": False}
GREEDY = {"temperature": 0.0}
CHAT, CMPL, RESP = "/v1/chat/completions", "/v1/completions", "/v1/responses"

LINES = [
    ("logprobs", CHAT, {"messages": USER, "max_tokens": 6, "logprobs": True,
                        "top_logprobs": 2, **GREEDY}),
    ("n-seed-stop", CHAT, {"messages": USER, "max_tokens": 5, "n": 2, "seed": 7,
                           "temperature": 0.9, "stop": ["zz"]}),
    ("tools-required", CHAT, {"messages": USER, "tools": [WEATHER], "tool_choice": "required",
                              "max_tokens": 40, **GREEDY}),
    ("tools-named", CHAT, {"messages": USER, "tools": [WEATHER], "max_tokens": 40,
                           "tool_choice": {"type": "function",
                                           "function": {"name": "get_weather"}}, **GREEDY}),
    ("json-schema", CHAT, {"messages": USER, "max_tokens": 200, **GREEDY,
                           "chat_template_kwargs": {"enable_thinking": False},
                           "response_format": {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}}),
    ("reasoning", CHAT, {"messages": USER + [{"role": "assistant", "content": "<think>"}],
                         "continue_final_message": True, "add_generation_prompt": False,
                         "structured_outputs": {"regex": "plan</think>answer"},
                         "max_tokens": 20, **GREEDY}),
    ("thinking-off", CHAT, {"messages": USER, "max_completion_tokens": 4, "min_tokens": 4,
                            "chat_template_kwargs": {"enable_thinking": False},
                            "prompt_logprobs": 1, **GREEDY}),
    ("echo", CMPL, {"prompt": "The quick brown fox", "max_tokens": 4, "echo": True,
                    "logprobs": 2, **GREEDY}),
    ("completion-seed", CMPL, {"prompt": "Batch inference", "max_tokens": 5, "seed": 3,
                               "temperature": 1.0}),
    ("responses", RESP, {"input": "What is the capital of France?", "max_output_tokens": 6,
                         **GREEDY}),
]
# Anthropic's Message Batches lines ({"custom_id", "params"}), answered by vLLM's
# Anthropic serving layer; the server gets each params on /v1/messages.
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": WEATHER["function"]["parameters"]}
ANTHROPIC = [
    ("a-plain", {"messages": USER, "max_tokens": 6, **GREEDY}),
    ("a-system", {"system": "Answer in one word.", "messages": USER, "max_tokens": 6,
                  **GREEDY}),
    ("a-multi-turn", {"messages": USER + [
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}],
        "max_tokens": 6, **GREEDY}),
    ("a-tool-use", {"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": {"type": "any"},
                    "max_tokens": 40, **GREEDY}),
    ("a-stop", {"messages": USER, "max_tokens": 12, "stop_sequences": ["the", "e"],
                "top_k": 1}),
]
ANTHROPIC_BAD = [
    {"custom_id": "a-unknown-field", "params": {"model": MODEL, "messages": USER,
                                                "max_tokens": 4, "frobnicate": 1}},
    {"custom_id": "a-no-max-tokens", "params": {"model": MODEL, "messages": USER}},
    {"custom_id": "a-bad-role", "params": {"model": MODEL, "max_tokens": 4,
                                           "messages": [{"role": "robot", "content": "x"}]}},
]
# cached_tokens depends on what ran before on each side (the prefix cache)
# (an Anthropic thinking block's signature is random on each answer)
VOLATILE = {"id", "created", "created_at", "system_fingerprint", "call_id", "cached_tokens",
            "signature"}


class Near(float):
    """A float equal to any within 1e-3 (batch order may move the last bits of a
    logprob; rounding both sides would still split two values at a boundary)."""

    def __eq__(self, other):
        return isinstance(other, (int, float)) and abs(self - other) <= 1e-3

    def __ne__(self, other):
        return not self == other

    __hash__ = float.__hash__


def comparable(value):
    """A body without ids and timestamps, floats compared within 1e-3."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, float):
        return Near(value)
    if isinstance(value, str) and value.startswith(("chatcmpl-tool-", "call_", "msg_", "rs_")):
        return "<id>"
    return value


def batch_line(custom_id, url, body):
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": MODEL, **body}}


@pytest.fixture(scope="module")
def answers(tiny_model, tmp_path_factory):
    """{source: {custom_id: body}} for batchd, vLLM's server and vLLM's batch runner."""
    base = tmp_path_factory.mktemp("fidelity")
    config = served_spool(base, tiny_model.parent, {"tiny": PROFILE})
    # vLLM's engine core inside the server's process, as batchd's tiny profile
    # runs it (a load of seconds, not half a minute; the answers are the same)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    port = free_port()
    server_log = open(base / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
         "--served-model-name", MODEL, "--port", str(port), "--host", "127.0.0.1",
         *SERVER_FLAGS], stdout=server_log, stderr=subprocess.STDOUT, env=env)
    daemon = DaemonProcess(config)
    try:
        daemon.wait_ready()
        spool = base / "spool"
        drop(spool / "inbox", "features.jsonl", [batch_line(*line) for line in LINES] + EXTRA)
        drop(spool / "inbox", "anthropic.jsonl",
             [{"custom_id": c, "params": {"model": MODEL, **p}} for c, p in ANTHROPIC]
             + ANTHROPIC_BAD)
        wait_for(lambda: final_state(spool / "outbox", "features"), 600, what="batchd job")
        wait_for(lambda: final_state(spool / "outbox", "anthropic"), 600, what="anthropic job")
        anthropic = {r["custom_id"]: r["result"]
                     for r in read_jsonl(spool / "outbox" / "anthropic.results.jsonl")}
        ours = {r["custom_id"]: r for r in read_jsonl(spool / "outbox" / "features.results.jsonl")}
        errors = {e["custom_id"]: e for e in read_jsonl(spool / "outbox" / "features.errors.jsonl")}

        def ready():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                return True
            except OSError:
                assert server.poll() is None, (base / "server.log").read_text()[-3000:]
                return False

        wait_for(ready, 600, interval=1.0, what="vLLM's API server")
        served = {}
        for custom_id, url, body in LINES + [(c, "/v1/messages", p) for c, p in ANTHROPIC]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{url}", json.dumps({"model": MODEL, **body}).encode(),
                {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=300) as reply:
                    served[custom_id] = json.loads(reply.read())
            except urllib.error.HTTPError as exc:  # the server's refusal, kept to compare
                served[custom_id] = {"http_status": exc.code, **json.loads(exc.read())}
    finally:
        server.terminate()
        server.wait(120)
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]
    # vLLM's batch runner takes chat lines only (0.32: no /v1/completions or /v1/responses).
    runner_in, runner_out = base / "runner.jsonl", base / "runner.out.jsonl"
    runner_in.write_text("".join(json.dumps(batch_line(*line)) + "\n"
                                 for line in LINES if line[1] == CHAT))
    subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i",
                    str(runner_in), "-o", str(runner_out), "--model", str(tiny_model),
                    "--served-model-name", MODEL, *SERVER_FLAGS], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=open(base / "runner.log", "wb"))
    runner = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(runner_out)}
    return {"batchd": {k: v["response"]["body"] for k, v in ours.items()}, "errors": errors,
            "server": served, "run_batch": runner, "anthropic": anthropic}


# Lines only batchd runs: its per-line refusals, and tool_choice "auto" (answered
# as `batchd profiles check` says, test_tool_choice_is_answered_as_profiles_check_says).
EXTRA = [
    {"custom_id": "tools-auto", "method": "POST", "url": CHAT,
     "body": {"messages": USER, "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 8,
              **GREEDY}},
    {"custom_id": "unknown-field", "method": "POST", "url": CHAT,
     "body": {"messages": USER, "frobnicate": True}},
    {"custom_id": "remote-image", "method": "POST", "url": CHAT, "body": {"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}},
    {"custom_id": "responses-unknown", "method": "POST", "url": RESP,
     "body": {"input": "hi", "max_tokens": 3}},
]


SEEDED = {"n-seed-stop", "completion-seed"}


def known_gap(custom_id: str) -> None:
    """Seeded sampling (temperature > 0 with a seed) came out different from
    vLLM's own server on vLLM 0.27 (equal on 0.32); the cause is not yet known."""
    if custom_id in SEEDED and vllm_release() < (0, 28):
        pytest.xfail("seeded sampling differs from vLLM 0.27's server (known gap)")


@pytest.mark.parametrize("custom_id", [line[0] for line in LINES])
def test_body_equals_vllm_server(answers, custom_id):
    assert custom_id in answers["batchd"], answers["errors"].get(custom_id)
    known_gap(custom_id)
    assert comparable(answers["batchd"][custom_id]) == comparable(answers["server"][custom_id])


@pytest.mark.parametrize("custom_id", [line[0] for line in LINES if line[1] == CHAT])
def test_chat_body_equals_vllm_batch_runner(answers, custom_id):
    known_gap(custom_id)
    assert comparable(answers["batchd"][custom_id]) == comparable(answers["run_batch"][custom_id])


def vllm_release() -> tuple[int, ...]:
    import vllm
    return tuple(int(p) for p in vllm.__version__.split(".")[:2])


@pytest.mark.parametrize("custom_id", [line[0] for line in ANTHROPIC])
def test_anthropic_line_equals_vllm_server(answers, custom_id):
    """An Anthropic batch line's message is what vLLM's server answers on /v1/messages."""
    result, served = answers["anthropic"][custom_id], answers["server"][custom_id]
    if "http_status" in served:  # vLLM refused it: so does batchd, with its message
        assert served["http_status"] == 400 and result["type"] == "errored", result
        # the message is vLLM's; the type is Anthropic's word for a 400
        assert result["error"]["error"] == {"type": "invalid_request_error",
                                            "message": served["error"]["message"]}
        return
    assert result["type"] == "succeeded", result
    assert comparable(result["message"]) == comparable(served)
    assert result["message"]["type"] == "message" and result["message"]["model"] == MODEL


def test_anthropic_lines_vllm_refuses_are_errored_results(answers):
    results = answers["anthropic"]
    assert set(results) == {c for c, _ in ANTHROPIC} | {b["custom_id"] for b in ANTHROPIC_BAD}
    for bad in ANTHROPIC_BAD:
        result = results[bad["custom_id"]]
        assert result["type"] == "errored", result
        assert result["error"]["type"] == "error"
        assert result["error"]["error"]["type"] == "invalid_request_error"
    assert "frobnicate" in results["a-unknown-field"]["error"]["error"]["message"]
    assert "max_tokens" in results["a-no-max-tokens"]["error"]["error"]["message"]


def test_features_are_in_the_bodies(answers):
    if vllm_release() < (0, 28):
        pytest.skip("vLLM 0.27 does not apply structured outputs inside reasoning "
                    "(enable_in_reasoning), so the noise model's tool and schema lines are "
                    "free text there; the bodies still equal its own server's")
    ours = answers["batchd"]
    first = ours["logprobs"]["choices"][0]
    assert len(first["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert len(ours["n-seed-stop"]["choices"]) == 2
    for name in ("tools-required", "tools-named"):
        calls = ours[name]["choices"][0]["message"]["tool_calls"]
        assert calls and calls[0]["function"]["name"] == "get_weather"
        json.loads(calls[0]["function"]["arguments"])  # vLLM's grammar: valid JSON
    # Thinking off: the qwen3 parser leaves the whole output in content. The
    # noise model pads with whitespace to max_tokens; the schema's first key is
    # there, and the answer string only (the schema caps it at 12 characters).
    content = ours["json-schema"]["choices"][0]["message"]["content"]
    assert re.match(r'\{\s*"answer":\s*"', content)
    message = ours["reasoning"]["choices"][0]["message"]
    assert (message.get("reasoning") or message.get("reasoning_content")) == "plan"
    assert message["content"] == "answer"
    assert ours["thinking-off"]["usage"]["completion_tokens"] == 4
    assert ours["thinking-off"]["prompt_logprobs"]
    echo = ours["echo"]["choices"][0]
    assert echo["text"].startswith("The quick brown fox") and echo["logprobs"]["top_logprobs"]
    assert ours["responses"]["object"] == "response"
    assert all(body["model"] == MODEL for body in ours.values())


def test_refused_fields_are_line_errors_naming_the_field(answers):
    errors = {k: v["response"]["body"]["error"] for k, v in answers["errors"].items()}
    assert errors["unknown-field"]["param"] == "frobnicate"
    assert errors["remote-image"]["param"] == "messages.0.content.1.image_url.url"
    assert errors["responses-unknown"]["param"] == "max_tokens"
    assert errors.pop("remote-image")["code"] == "invalid_image"  # batchd fetches none
    assert all(e["code"] == "invalid_request" for e in errors.values())
    assert set(errors) == {"unknown-field", "responses-unknown"}


def test_tool_choice_is_answered_as_profiles_check_says(answers, tmp_path):
    """The profile runs the hermes parser with auto tool choice: `batchd profiles
    check` reports every tool_choice answered, and the engine answers one line of
    each kind with a body."""
    from batchd.engine.capabilities import ANSWERED, capabilities
    from batchd.profiles import load_profile

    (tmp_path / "tiny.toml").write_text(PROFILE)
    said = capabilities(load_profile(tmp_path / "tiny.toml")).tool_choice
    assert said == {"auto": ANSWERED, "required": ANSWERED, "named": ANSWERED}
    lines = {"auto": "tools-auto", "required": "tools-required", "named": "tools-named"}
    got = {kind: ANSWERED if custom_id in answers["batchd"] else "refused"
           for kind, custom_id in lines.items()}
    assert got == said, {k: answers["errors"].get(v) for k, v in lines.items()}
    # (what the answers hold is vLLM's: test_body_equals_vllm_server compares them)
    assert all(answers["batchd"][v]["object"] == "chat.completion" for v in lines.values())
