"""Anthropic Message Batches lines in a dropped file, in-process on the fake
engine: each line answered in its own format, every outcome in the results
file. vLLM's own answers for them: test_fidelity.py."""

import json

from conftest import drain, drop, final_state, outputs

PARAMS = {"model": "tiny", "max_tokens": 8,
          "messages": [{"role": "user", "content": "Hello"}]}


def test_anthropic_lines_get_anthropic_results_one_per_line(daemon, settings):
    lines = [
        {"custom_id": "plain", "params": PARAMS},
        {"custom_id": "system", "params": {**PARAMS, "system": "Be brief."}},
        {"custom_id": "no-messages", "params": {"model": "tiny", "max_tokens": 8}},
        {"custom_id": "extra", "params": PARAMS, "priority": 1},
        {"custom_id": "not-object", "params": "hello"},
        {"custom_id": "plain", "params": PARAMS},  # a repeated custom_id
        {"custom_id": "openai", "messages": [{"role": "user", "content": "hi"}]},  # mixed in
        {"custom_id": "broken", "body": {}, "url": "/v1/nope"},
    ]
    drop(settings.inbox, "anthropic.jsonl", lines)
    drain(daemon)
    assert final_state(settings.outbox, "anthropic") == "completed"
    results, errors = outputs(settings.outbox, "anthropic")
    by_id = {r["custom_id"]: r for r in results}
    assert [r["custom_id"] for r in results] == ["plain", "system", "no-messages", "extra",
                                                 "not-object", "plain", "openai"]
    assert by_id["system"]["result"]["type"] == "succeeded"
    assert "message" in by_id["system"]["result"]
    failed = [r for r in results if "result" in r and r["result"]["type"] == "errored"]
    assert [(r["custom_id"], r["line"], r["code"]) for r in failed] == [
        ("no-messages", 3, "invalid_request"), ("extra", 4, "invalid_request"),
        ("not-object", 5, "invalid_request"), ("plain", 6, "duplicate_custom_id")]
    error = failed[0]["result"]["error"]
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "params.messages" in error["error"]["message"]
    assert results[-1]["response"]["status_code"] == 200  # the OpenAI line: OpenAI's shape
    assert [e["custom_id"] for e in errors] == ["broken"]
    status = json.loads((settings.outbox / "anthropic.status.jsonl").read_text()
                        .splitlines()[-1])
    assert status["request_counts"] == {"total": 8, "completed": 3, "failed": 5}


def test_cancelled_and_expired_anthropic_lines(daemon, settings):
    (settings.inbox / "gone.cancel").write_text("")
    drop(settings.inbox, "gone.jsonl", [{"custom_id": "a", "params": PARAMS}])
    (settings.inbox / "late.toml").write_text('expires_at = 2000-01-01T00:00:00Z\n')
    drop(settings.inbox, "late.jsonl", [{"custom_id": "b", "params": PARAMS}])
    drain(daemon)
    assert outputs(settings.outbox, "gone")[0][0]["result"] == {"type": "canceled"}
    assert outputs(settings.outbox, "late")[0][0]["result"] == {"type": "expired"}
    assert outputs(settings.outbox, "late")[1] == []
