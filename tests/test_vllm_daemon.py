"""Real daemons on real vLLM (CPU build) with the tiny random Llama.

One daemon serves the module's tests, so the engine loads once; its text is
noise, so these tests check shapes, counts, routing and ordering, not content.
"""

import json
import subprocess

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from conftest import BATCHD, DaemonProcess, drop, final_state, outputs, read_jsonl, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """A running daemon (inotify mode) on a temp spool with tiny + other profiles."""
    from conftest import OTHER_PROFILE, TINY_PROFILE, served_spool
    base = tmp_path_factory.mktemp("served")
    # vLLM's priority scheduling on: a sidecar priority reaches every request
    tiny = TINY_PROFILE.replace("[engine]\n", '[engine]\nscheduling_policy = "priority"\n')
    config = served_spool(base, tiny_model.parent, {"tiny": tiny, "other": OTHER_PROFILE},
                          "[engine]\nwindow = 64\n[scheduling]\nmax_wait_seconds = 3\n")
    daemon = DaemonProcess(config)
    try:
        daemon.wait_ready()
        daemon.spool = base / "spool"
        yield daemon
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]
    finally:
        if daemon.proc.poll() is None:
            daemon.kill_tree()


def wait_final(outbox, job, timeout=300):
    return wait_for(lambda: final_state(outbox, job), timeout, what=f"{job} to finish")


def test_mixed_file_through_real_vllm(served):
    inbox, outbox = served.spool / "inbox", served.spool / "outbox"
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", **CHAT, "max_tokens": 8, "seed": 1}},
        {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "Once upon a time", "max_tokens": 5}},
        "{broken json",
        {"custom_id": "short", **CHAT, "n": 2, "max_tokens": 4},
        {"custom_id": "long", "messages": [{"role": "user", "content": "fox " * 2000}]},
        {"custom_id": "chat", "prompt": "duplicate id"},
        {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "badrole", "messages": [{"role": "robot", "content": "x"}]},
    ]
    drop(inbox, "mixed.jsonl", lines)
    assert wait_final(outbox, "mixed") == "completed"
    results = read_jsonl(outbox / "mixed.results.jsonl")
    errors = read_jsonl(outbox / "mixed.errors.jsonl")
    assert [r["custom_id"] for r in results] == ["chat", "cmpl", "short"]
    codes = {e["custom_id"]: e["response"]["body"]["error"]["code"] for e in errors}
    assert codes == {"line-3": "invalid_json_line", "long": "context_length_exceeded",
                     "chat": "duplicate_custom_id", "emb": "unsupported_url",
                     "badrole": "invalid_request"}
    assert all(e["response"]["status_code"] == 400 and e["line"] for e in errors)
    chat = ChatCompletion.model_validate(results[0]["response"]["body"])
    assert chat.usage.completion_tokens == 8 and chat.model == "batchd/tiny-llama"
    assert chat.choices[0].finish_reason == "length"
    cmpl = Completion.model_validate(results[1]["response"]["body"])
    assert cmpl.usage.completion_tokens == 5
    assert len(ChatCompletion.model_validate(results[2]["response"]["body"]).choices) == 2
    bench = json.loads((outbox / "mixed.bench.json").read_text())
    assert bench["requests"] == {"total": 8, "succeeded": 3, "failed": 5}
    assert bench["tokens"]["completion"] == 8 + 5 + 2 * 4
    assert bench["versions"]["vllm"] and bench["engine_args"]["max_model_len"] == 512
    assert bench["timing_s"]["model_load"] > 0
    status = read_jsonl(outbox / "mixed.status.jsonl")
    assert status[-1]["request_counts"] == {"total": 8, "completed": 3, "failed": 5}
    assert (outbox / "mixed.input.jsonl").exists()
    assert "profile = \"tiny\"" in (outbox / "mixed.job.toml").read_text()


def test_in_place_writer_sidecar_and_prefix_on_a_warm_engine(served):
    inbox, outbox = served.spool / "inbox", served.spool / "outbox"
    drop(inbox, "inplace.jsonl", [{"prompt": "a", "max_tokens": 3}] * 1 +
         [{"custom_id": "b", "prompt": "b", "max_tokens": 3}], how="inplace")
    assert wait_final(outbox, "inplace") == "completed"
    (inbox / "side.toml").write_text('profile = "tiny"\n[sampling]\nmax_tokens = 2\n')
    drop(inbox, "side.jsonl", [CHAT])
    drop(inbox, "tiny__pre.jsonl", [CHAT | {"max_tokens": 3}])
    assert wait_final(outbox, "side") == "completed"
    assert wait_final(outbox, "tiny__pre") == "completed"
    bench = json.loads((outbox / "side.bench.json").read_text())
    assert bench["timing_s"]["model_load"] == 0  # the engine stayed warm after inplace
    side = read_jsonl(outbox / "side.results.jsonl")[0]["response"]["body"]
    assert side["usage"]["completion_tokens"] == 2
    assert "routed_by = \"sidecar\"" in (outbox / "side.job.toml").read_text()
    assert "routed_by = \"filename prefix\"" in (outbox / "tiny__pre.job.toml").read_text()


def test_same_name_twice_gets_a_new_job_name(served):
    inbox, outbox = served.spool / "inbox", served.spool / "outbox"
    drop(inbox, "again.jsonl", [{"prompt": "x", "max_tokens": 2}])
    assert wait_final(outbox, "again") == "completed"
    drop(inbox, "again.jsonl", [{"prompt": "y", "max_tokens": 2}])
    assert wait_final(outbox, "again-2") == "completed"
    assert json.loads((outbox / "again.input.jsonl").read_text())["prompt"] == "x"
    assert json.loads((outbox / "again-2.input.jsonl").read_text())["prompt"] == "y"


def test_shared_prefixes_hit_vllms_prefix_cache(served):
    """A shuffled file of three long shared prompts: fed in prefix order, and
    vLLM's own per-request cached_tokens add up to the bench record's hit rate."""
    import random
    inbox, outbox = served.spool / "inbox", served.spool / "outbox"
    heads = [f"Rubric {g}: " + "answer briefly and grade fairly. " * 8 for g in range(3)]
    lines = [{"custom_id": f"g{g}-q{q}", "max_tokens": 2, "messages": [
        {"role": "system", "content": heads[g]}, {"role": "user", "content": f"Item {q}?"}]}
        for g in range(3) for q in range(6)]
    random.Random(5).shuffle(lines)
    drop(inbox, "graded.jsonl", lines)
    assert wait_final(outbox, "graded") == "completed"
    results = read_jsonl(outbox / "graded.results.jsonl")
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
    cached = [r["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
              for r in results]
    assert sum(cached) > 0
    bench = json.loads((outbox / "graded.bench.json").read_text())
    assert bench["order"] == "prefix"
    assert bench["prefix_cache"]["cached_tokens"] == sum(cached)
    assert 0 < bench["prefix_cache"]["hit_rate"] < 1


def test_tool_choice_is_refused_as_profiles_check_says(served):
    """The tiny profile names no tool parser: `batchd profiles check` reports every
    tool_choice refused, and the engine refuses each kind per line (vLLM's own
    message), while the other lines of the file run."""
    from batchd.engine.capabilities import REFUSED, capabilities
    from batchd.profiles import ProfileSet

    profile = ProfileSet.load(served.config.parent / "profiles").lookup("tiny")
    found = capabilities(profile)
    said = found.tool_choice
    assert said == {"auto": REFUSED, "required": REFUSED, "named": REFUSED}
    # the daemon said the same when it loaded the profile
    started = [e for e in served.logs() if e.get("event") == "engine_process_started"]
    assert started[0]["profile"] == "tiny" and started[0]["capabilities"] == found.line()
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    choices = {"auto": "auto", "required": "required",
               "named": {"type": "function", "function": {"name": "get_weather"}}}
    inbox, outbox = served.spool / "inbox", served.spool / "outbox"
    drop(inbox, "tools.jsonl", [{"custom_id": kind, **CHAT, "tools": [weather],
                                 "tool_choice": choice, "max_tokens": 4}
                                for kind, choice in choices.items()]
         + [{"custom_id": "plain", **CHAT, "max_tokens": 2}])
    assert wait_final(outbox, "tools") == "completed"
    errors = {e["custom_id"]: e["response"]["body"]["error"]
              for e in read_jsonl(outbox / "tools.errors.jsonl")}
    results = [r["custom_id"] for r in read_jsonl(outbox / "tools.results.jsonl")]
    assert results == ["plain"]
    assert {kind: REFUSED if kind in errors else "answered" for kind in choices} == said
    assert "tool-call-parser" in errors["required"]["message"]


def lines(prefix, n, tokens):
    return [{"custom_id": f"{prefix}{i}", "prompt": f"{prefix} number {i}",
             "max_tokens": tokens, "ignore_eos": True} for i in range(n)]


def status(outbox, job):
    from batchd.spool.outbox import read_status  # the daemon may be mid-line
    return read_status(outbox / f"{job}.status.jsonl")


def answered(outbox, job):
    counts = (status(outbox, job) or [{}])[-1].get("request_counts") or {}
    return counts.get("completed", 0) + counts.get("failed", 0)


def exactly_once(outbox, job, n, codes=()):
    results, errors = outputs(outbox, job)
    ids = [r["custom_id"] for r in results] + [e["custom_id"] for e in errors]
    assert sorted(ids) == sorted(f"{job}{i}" for i in range(n)), job
    assert {e["response"]["body"]["error"]["code"] for e in errors} <= set(codes), job
    return results, errors


BULK = 2000


def test_small_files_cancel_and_another_profile_during_a_long_job(served):
    """Many jobs at once on one engine (CONTRACT 14). A long job runs; an urgent
    file, two small ones, a doomed one (cancelled) and a file for another
    profile (overdue after 3 s) are dropped during it, and each ends while the
    long job still runs. The long job made way for the other profile, resumed,
    and ends with every line exactly once. Last in this module: it swaps models."""
    config, root = served.config, served.spool
    inbox, outbox = root / "inbox", root / "outbox"
    daemon = served
    # long enough that it is still running when other__x has come and gone,
    # on a fast hour of the machine too (1,000 lines once ended first there)
    drop(inbox, "bulk.jsonl", lines("bulk", BULK, 128))
    wait_for(lambda: answered(outbox, "bulk") > 0, 300, what="bulk's first answers")

    # an urgent file (priority 100) and two small ones: all run beside bulk
    (inbox / "urgent.toml").write_text("priority = 100\n")
    drop(inbox, "urgent.jsonl", lines("urgent", 3, 16))
    drop(inbox, "a.jsonl", lines("a", 20, 16))
    drop(inbox, "b.jsonl", lines("b", 20, 16))
    for job in ("urgent", "a", "b"):
        assert wait_for(lambda job=job: final_state(outbox, job), 120, what=job) == "completed"
    assert final_state(outbox, "bulk") is None  # still running
    for job, n in (("urgent", 3), ("a", 20), ("b", 20)):
        results, _ = exactly_once(outbox, job, n)
        assert [r["custom_id"] for r in results] == [f"{job}{i}" for i in range(n)]
        concurrency = json.loads((outbox / f"{job}.bench.json").read_text())["concurrency"]
        assert "bulk" in concurrency["overlapped_jobs"]
        # the engine's tokens while it ran: its own, and bulk's that ended meanwhile
        # (none, when it came and went between two of bulk's bunches)
        assert concurrency["engine_tokens"]["completion"] >= n * 16
    started = next(s["ts"] for s in status(outbox, "a") if s.get("phase") == "generating")
    assert started > next(s["ts"] for s in status(outbox, "bulk")
                          if s.get("phase") == "generating")
    assert "priority = 100" in (outbox / "urgent.job.toml").read_text()

    # one of several cancelled: the others untouched
    drop(inbox, "doomed.jsonl", lines("doomed", 600, 128))
    wait_for(lambda: answered(outbox, "doomed") > 0, 120, what="doomed's first answers")
    out = subprocess.run([BATCHD, "cancel", "doomed", "--config", str(config)],
                         capture_output=True, text=True, check=True)
    assert "cancel requested" in out.stdout
    assert wait_for(lambda: final_state(outbox, "doomed"), 30, what="cancel") == "cancelled"
    results, errors = exactly_once(outbox, "doomed", 600, {"cancelled"})
    assert results and errors
    assert final_state(outbox, "bulk") is None

    # a file whose lines name both profiles and an unknown model: its tiny lines
    # run beside bulk, its 'other' lines with other__x below
    mix = [{"custom_id": "m-tiny", "model": "tiny", "prompt": "a", "max_tokens": 4},
           {"custom_id": "m-other", "model": "org/other-model", "prompt": "b", "max_tokens": 4},
           {"custom_id": "m-unknown", "model": "gpt-9", "prompt": "c", "max_tokens": 4},
           {"custom_id": "m-none", "prompt": "d", "max_tokens": 4}]
    drop(inbox, "mix.jsonl", mix)
    wait_for(lambda: any(s.get("phase") == "waiting_for_model" for s in status(outbox, "mix")),
             60, what="mix's tiny lines")
    # a file for another profile waits 3 s at most, then bulk makes way
    drop(inbox, "other__x.jsonl", lines("other__x", 3, 8))
    assert wait_for(lambda: final_state(outbox, "other__x"), 300, what="other__x") == "completed"
    assert final_state(outbox, "bulk") is None
    exactly_once(outbox, "other__x", 3)
    assert wait_for(lambda: final_state(outbox, "mix"), 60, what="mix") == "completed"
    results, errors = outputs(outbox, "mix")
    assert [(r["custom_id"], r["response"]["body"]["model"]) for r in results] == [
        ("m-tiny", "batchd/tiny-llama"), ("m-other", "org/other-model"),
        ("m-none", "batchd/tiny-llama")]
    assert [(e["custom_id"], e["response"]["body"]["error"]["code"]) for e in errors] == \
        [("m-unknown", "model_not_found")]
    x_status = status(outbox, "other__x")
    assert x_status[0]["message"].startswith("claimed: waited")  # over max_wait_seconds
    assert wait_for(lambda: final_state(outbox, "bulk"), 600, what="bulk") == "completed"
    phases = [s.get("phase") for s in status(outbox, "bulk")]
    assert phases.count("yielded") == 1 and phases[-1] == "done"
    results, _ = exactly_once(outbox, "bulk", BULK)
    assert [r["custom_id"] for r in results] == [f"bulk{i}" for i in range(BULK)]
    bench = json.loads((outbox / "bulk.bench.json").read_text())
    assert bench["timing_s"]["model_load"] > 0  # loaded again after the other profile
    assert {"urgent", "a", "b", "doomed"} <= set(bench["concurrency"]["overlapped_jobs"])
    # the others' answers came while bulk was in the stream
    assert bench["concurrency"]["engine_tokens"]["completion"] > bench["tokens"]["completion"]
    loads = [e for e in daemon.logs() if e.get("event") == "engine_loaded"]
    assert [e["profile"] for e in loads] == ["tiny", "other", "tiny"]
    again = subprocess.run([BATCHD, "cancel", "doomed", "--config", str(config)],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "already ended: cancelled" in again.stdout
    unknown = subprocess.run([BATCHD, "cancel", "nosuchjob", "--config", str(config)],
                             capture_output=True, text=True)
    assert unknown.returncode == 1 and "no such job" in unknown.stderr
