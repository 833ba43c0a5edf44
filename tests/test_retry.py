"""`batchd retry` and the merged file, in-process on the fake engine. A retry
after a real cancel mid-job on real vLLM: test_vllm_rerun.py."""

import json

import structlog

from batchd.cli import main
from batchd.spool.outbox import read_status

from conftest import drain, drop, final_state, outputs, read_jsonl

HUGE = "w " * 100_001  # over the fake engine's context: context_length_exceeded


def retry(capsys, *args) -> tuple[int, str, str]:
    """`batchd retry ARGS`: (exit status, its last stdout line, its stderr)."""
    capsys.readouterr()  # the daemon's log so far
    try:
        status = main(["retry", *args])
    finally:
        structlog.reset_defaults()  # the command configured logging to this stdout
    out, err = capsys.readouterr()
    return status, (out.strip().splitlines() or [""])[-1], err


def code(line: dict) -> str:
    return line["response"]["body"]["error"]["code"]


def test_a_retry_merges_into_one_line_per_input_line(daemon, settings, capsys):
    config = str(settings.source)
    lines = [{"custom_id": "a", "prompt": "one"}, "not json", "",
             {"custom_id": "b", "prompt": "two"}, {"custom_id": "big", "prompt": HUGE}]
    (settings.inbox / "orig.cancel").write_text("")
    drop(settings.inbox, "orig.jsonl", lines)
    (settings.inbox / "orig.toml").write_text("priority = 3\n[sampling]\nmax_tokens = 4\n")
    drain(daemon)
    assert final_state(settings.outbox, "orig") == "cancelled"
    before = {p.name: p.read_bytes() for p in settings.outbox.glob("orig.*")}

    status, name, _ = retry(capsys, "orig", "--config", config)
    assert status == 0
    assert name == "orig-retry"
    retry_lines = read_jsonl(settings.inbox / "orig-retry.jsonl")
    assert [l["custom_id"] for l in retry_lines] == ["a", "b", "big"]
    assert "retry_of = \"orig\"" in (settings.inbox / "orig-retry.toml").read_text()
    drain(daemon)
    assert final_state(settings.outbox, name) == "completed"
    merged = read_jsonl(settings.outbox / f"{name}.merged.jsonl")
    assert [m["custom_id"] for m in merged] == ["a", "line-2", "b", "big"]
    assert "response" in merged[0] and merged[0]["response"]["status_code"] == 200
    assert code(merged[1]) == "invalid_json_line" and merged[1]["line"] == 2
    assert merged[2]["response"]["body"]["usage"]["completion_tokens"] == 4  # its sampling
    assert code(merged[3]) == "context_length_exceeded" and merged[3]["line"] == 5
    assert not any(m.get("line") and code(m) == "cancelled" for m in merged)
    job_toml = (settings.outbox / f"{name}.job.toml").read_text()
    assert "priority = 3" in job_toml and 'profile = "tiny"' in job_toml
    assert read_status(settings.outbox / f"{name}.status.jsonl")[-1]["merged_file"] == \
        f"{name}.merged.jsonl"
    # the original's files are as they were
    assert {p.name: p.read_bytes() for p in settings.outbox.glob("orig.*")} == before

    # a retry of the retry, for the one line that still failed
    status, again, _ = retry(capsys, name, "--config", config, "--codes",
                             "context_length_exceeded")
    assert status == 0
    assert again == "orig-retry-retry"
    drain(daemon)
    merged2 = read_jsonl(settings.outbox / f"{again}.merged.jsonl")
    results, errors = outputs(settings.outbox, name)
    assert len(merged2) == len(results) + len(errors) == 3


def test_retry_refuses_what_it_cannot_retry(daemon, settings, capsys):
    config = str(settings.source)
    assert retry(capsys, "nope", "--config", config)[::2] == (1, "batchd: no job 'nope' in "
                                                                f"{settings.outbox}\n")
    drop(settings.inbox, "fine.jsonl", [{"prompt": "x"}])
    drain(daemon)
    status, _, err = retry(capsys, "fine", "--config", config)
    assert status == 1 and "no failed lines" in err
    assert retry(capsys, "../etc", "--config", config)[0] == 2
    assert not list(settings.inbox.glob("*.jsonl"))


def test_a_merge_whose_original_is_gone_still_publishes_the_retry(daemon, settings, capsys):
    (settings.inbox / "o.cancel").write_text("")
    drop(settings.inbox, "o.jsonl", [{"prompt": "x"}])
    drain(daemon)
    status, name, _ = retry(capsys, "o", "--config", str(settings.source))
    assert status == 0
    (settings.outbox / "o.results.jsonl").unlink()  # deleted meanwhile
    drain(daemon)
    assert final_state(settings.outbox, name) == "completed"
    assert not (settings.outbox / f"{name}.merged.jsonl").exists()
    last = read_status(settings.outbox / f"{name}.status.jsonl")[-1]
    assert "cannot be read" in last["merged_error"]
    assert json.loads((settings.outbox / f"{name}.bench.json").read_text())["requests"][
        "succeeded"] == 1
