"""The whole pipeline in-process on the fake engine: fast checks of the plumbing.

The same paths run on real vLLM in test_vllm_daemon.py.
"""

import json
import os
import tomllib

import pytest

from batchd.spool.checkpoint import Checkpoint
from batchd.testing import FakeEngine
from batchd.profiles import ProfileSet

from conftest import drain, drop, final_state, in_process, one_pass, outputs, read_jsonl

GOOD = {"messages": [{"role": "user", "content": "hello"}]}


def test_mixed_file_one_output_per_line(daemon, settings):
    lines = [GOOD, "not json", "", {"custom_id": "dup", "prompt": "a"},
             {"custom_id": "dup", "prompt": "b"}, {"url": "/v1/nope", "body": {}},
             {"prompt": "x", "max_tokens": -1}, {"custom_id": "z", "method": "POST",
                                                 "url": "/v1/completions",
                                                 "body": {"prompt": "y"}}]
    drop(settings.inbox, "mixed.jsonl", lines)
    assert drain(daemon) == 1
    out = settings.outbox
    assert final_state(out, "mixed") == "completed"
    results, errors = outputs(out, "mixed")
    assert [r["custom_id"] for r in results] == ["line-1", "dup", "z"]
    assert {e["line"]: e["response"]["body"]["error"]["code"] for e in errors} == {
        2: "invalid_json_line", 5: "duplicate_custom_id", 6: "unsupported_url",
        7: "invalid_request"}
    assert len(results) + len(errors) == 7  # 8 lines, one blank
    bench = json.loads((out / "mixed.bench.json").read_text())
    assert bench["requests"] == {"total": 7, "succeeded": 3, "failed": 4}
    for key in ("job", "profile", "model", "engine_args", "tokens", "timing_s",
                "first_result_s", "throughput", "hardware", "versions", "started_at",
                "finished_at"):
        assert key in bench
    assert (out / "mixed.input.jsonl").read_bytes().count(b"\n") == 8
    assert list(settings.work.iterdir()) == []
    status = read_jsonl(out / "mixed.status.jsonl")
    assert [s["state"] for s in status][0] == "queued"
    assert status[-1]["request_counts"] == {"total": 7, "completed": 3, "failed": 4}


def test_engine_stays_warm_and_profiles_switch(daemon, settings):
    drop(settings.inbox, "a.jsonl", [GOOD])
    drop(settings.inbox, "tiny__b.jsonl", [GOOD])
    drop(settings.inbox, "other__c.jsonl", [GOOD])
    assert drain(daemon) == 2  # a and tiny__b run at once, in one session
    assert [e.profile.name for e in daemon.engines] == ["tiny", "other"]
    assert daemon.engines[0].closed and not daemon.engines[1].closed
    loads = [json.loads((settings.outbox / f"{j}.bench.json").read_text())["profile"]
             for j in ("a", "tiny__b", "other__c")]
    assert loads == ["tiny", "tiny", "other"]


def test_sidecar_routing_and_unknown_profile(daemon, settings):
    (settings.inbox / "s.toml").write_text('profile = "other"\n[sampling]\nmax_tokens = 3\n')
    drop(settings.inbox, "s.jsonl", [GOOD])
    (settings.inbox / "u.toml").write_text('profile = "nonesuch"\n')
    drop(settings.inbox, "u.jsonl", [GOOD, GOOD])
    drain(daemon)
    assert json.loads((settings.outbox / "s.bench.json").read_text())["profile"] == "other"
    results, _ = outputs(settings.outbox, "s")
    assert len(results[0]["response"]["body"]["choices"][0]["message"]["content"].split()) == 3
    status = read_jsonl(settings.outbox / "u.status.jsonl")[-1]
    assert status["state"] == "failed" and status["errors"][0]["code"] == "unknown_profile"
    assert "other, tiny" in status["errors"][0]["message"]
    _, errors = outputs(settings.outbox, "u")
    assert [e["response"]["body"]["error"]["code"] for e in errors] == ["unknown_profile"] * 2
    assert (settings.failed / "u.jsonl").exists()


def test_lines_naming_two_profiles_and_an_unknown_model(daemon, settings):
    """CONTRACT 3, per line: each line runs on the profile its model names, a line
    without one with the first named; an unknown model is that line's
    model_not_found; one results file in input order. The loaded profile's
    lines run first."""
    drop(settings.inbox, "first.jsonl", [{"model": "other", "prompt": "warm"}])
    drain(daemon)  # 'other' is loaded
    drop(settings.inbox, "m.jsonl", [
        {"custom_id": "t1", "model": "tiny", "prompt": "a"},
        {"custom_id": "o1", "model": "org/other-model", "prompt": "b"},
        {"custom_id": "x", "model": "gpt-9", "prompt": "c"},
        {"custom_id": "n", "prompt": "d"},
        {"custom_id": "t2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "TINY", "prompt": "e"}}])
    drain(daemon)
    assert final_state(settings.outbox, "m") == "completed"
    results, errors = outputs(settings.outbox, "m")
    assert [(r["custom_id"], r["response"]["body"]["model"]) for r in results] == [
        ("t1", "batchd/tiny-llama"), ("o1", "org/other-model"), ("n", "batchd/tiny-llama"),
        ("t2", "batchd/tiny-llama")]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("x", 404)]
    error = errors[0]["response"]["body"]["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "`gpt-9`" in error["message"]
    phases = [(s.get("phase"), s.get("profile")) for s in
              read_jsonl(settings.outbox / "m.status.jsonl")]
    assert ("waiting_for_model", "tiny") in phases  # other's part ran first: it was loaded
    assert [e.profile.name for e in daemon.engines] == ["other", "tiny"]
    job = tomllib.loads((settings.outbox / "m.job.toml").read_text())
    assert (job["profile"], job["parts"], job["routed_by"]) == \
        ("tiny", ["tiny", "other"], "lines' models, per line")


def test_non_regular_files_never_opened(daemon, settings):
    os.symlink("/etc/passwd", settings.inbox / "link.jsonl")
    os.mkfifo(settings.inbox / "fifo.jsonl")
    (settings.inbox / "dir.jsonl").mkdir()
    drain(daemon)
    for job in ("link", "fifo", "dir"):
        status = read_jsonl(settings.outbox / f"{job}.status.jsonl")[-1]
        assert status["state"] == "failed"
        assert status["errors"][0]["code"] == "not_a_regular_file"
    assert sorted(p.name for p in settings.failed.iterdir()) == [
        "dir.jsonl", "fifo.jsonl", "link.jsonl"]


def test_resume_from_checkpoint_with_torn_line(daemon, settings):
    """A crash left a checkpoint with two answers and a torn third: resume answers
    the rest once, keeps the two, and says it resumed."""
    lines = [{"custom_id": f"c{i}", "prompt": f"p{i}"} for i in range(1, 11)]
    drop(settings.work, "r.jsonl", lines)
    (settings.outbox / "r.status.jsonl").write_text(
        json.dumps({"ts": "x", "job": "r", "state": "in_progress"}) + "\n")
    ckpt = Checkpoint(settings.work / "r.ckpt.jsonl")
    for n in (3, 7):
        ckpt.add(n, "result", {"custom_id": f"c{n}", "response": {"body": {
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}}, "marker": "kept"})
    ckpt.close()
    with open(settings.work / "r.ckpt.jsonl", "ab") as f:
        f.write(b'{"line": 9, "kind": "res')
    drain(daemon)
    results, errors = outputs(settings.outbox, "r")
    assert errors == []
    assert [r["custom_id"] for r in results] == [f"c{i}" for i in range(1, 11)]
    assert [r.get("marker") for r in results if r.get("marker")] == ["kept", "kept"]
    status = read_jsonl(settings.outbox / "r.status.jsonl")
    assert any("resumed from checkpoint: 2 lines" in s.get("message", "") for s in status)
    assert status[-1]["state"] == "completed"


def test_cancel_before_run(daemon, settings):
    drop(settings.inbox, "c.jsonl", [GOOD, GOOD | {"custom_id": "x"}])
    (settings.inbox / "c.cancel").write_text("")
    drain(daemon)
    assert final_state(settings.outbox, "c") == "cancelled"
    _, errors = outputs(settings.outbox, "c")
    assert [e["response"]["body"]["error"]["code"] for e in errors] == ["cancelled"] * 2
    assert not (settings.inbox / "c.cancel").exists()


def test_crash_after_final_status_finishes_cleanup(daemon, settings):
    drop(settings.inbox, "p.jsonl", [GOOD])
    drain(daemon)
    # Put the input back as if the crash hit between the final line and the move.
    os.rename(settings.outbox / "p.input.jsonl", settings.work / "p.jsonl")
    before = (settings.outbox / "p.status.jsonl").read_text()
    drain(daemon)
    assert (settings.outbox / "p.input.jsonl").exists()
    assert (settings.outbox / "p.status.jsonl").read_text() == before


def test_profiles_shipped_validate():
    from pathlib import Path
    shipped = ProfileSet.load(Path(__file__).resolve().parent.parent / "profiles")
    assert shipped.errors == []
    assert {"smollm2-135m", "gemma3-4b", "gemma3-12b", "llama3.2-1b", "llama3.2-3b",
            "qwen3-4b", "qwen3-8b", "olmo2-1b", "minilm-l6"} <= set(shipped.profiles)


def test_read_only_outbox_stalls_then_recovers(settings):
    """A read-only outbox (chattr +i: even root cannot write) mid-job: the job stays
    resumable in work/, a new file is given back to the inbox, the daemon lives on;
    when the outbox is writable again both finish with every line once."""
    import shutil
    import subprocess
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr")
    outbox = settings.outbox

    def factory(profile):
        subprocess.run(["chattr", "+i", str(outbox)], check=True)
        return FakeEngine(profile)

    d = in_process(settings, factory=factory)
    drop(settings.inbox, "a.jsonl", [{"custom_id": f"a{i}", "prompt": "x"} for i in range(20)])
    try:
        assert not one_pass(d, now=99.0)  # seen, settling
        assert one_pass(d, now=100.0)  # claimed; the outbox turns read-only as it loads
        assert (settings.work / "a.jsonl").exists()
        drop(settings.inbox, "b.jsonl", [{"custom_id": "b", "prompt": "y"}])
        assert not one_pass(d, now=100.5)  # a: waiting to retry; b: seen, settling
        assert not one_pass(d, now=101.0)  # b cannot be claimed: given back
        assert (settings.inbox / "b.jsonl").exists()
    finally:
        subprocess.run(["chattr", "-i", str(outbox)], check=True)
    d.pool.factory = FakeEngine
    tick = 200.0
    while one_pass(d, now=tick) or not d.drained():
        tick += 1
        assert tick < 300
    for job, n in (("a", 20), ("b", 1)):
        assert final_state(outbox, job) == "completed"
        results, errors = outputs(outbox, job)
        assert len(results) == n and errors == []
    assert list(settings.work.iterdir()) == []


def test_input_swapped_for_a_symlink_after_the_scan_is_never_read(daemon, settings, tmp_path):
    """A writer who replaces a claimed file by a symlink (a race with the scan)
    gets not_a_regular_file; the target is never opened."""
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"prompt": "do not read me"}\n')
    os.symlink(secret, settings.work / "swapped.jsonl")
    (settings.outbox / "swapped.status.jsonl").write_text("")
    drain(daemon)
    status = read_jsonl(settings.outbox / "swapped.status.jsonl")[-1]
    assert status["state"] == "failed"
    assert status["errors"][0]["code"] == "not_a_regular_file"
    assert read_jsonl(settings.outbox / "swapped.results.jsonl") == []
    assert (settings.failed / "swapped.jsonl").is_symlink()


def test_sidecar_priority_orders_waiting_files(daemon, settings):
    for name, priority in (("low", -1), ("plain", None), ("high", 5)):
        if priority is not None:
            (settings.inbox / f"{name}.toml").write_text(f"priority = {priority}\n")
        drop(settings.inbox, f"{name}.jsonl", [GOOD])
    drain(daemon)
    finished = {job: (settings.outbox / f"{job}.bench.json").stat().st_mtime_ns
                for job in ("low", "plain", "high")}
    assert sorted(finished, key=finished.get) == ["high", "plain", "low"]


def test_metrics_textfile(spool_config, tmp_path):
    from batchd.config import load_settings
    settings = load_settings(spool_config('[metrics]\ntextfile = "metrics/batchd.prom"\n'))
    (tmp_path / "metrics").mkdir()
    d = in_process(settings, factory=FakeEngine)
    drop(settings.inbox, "m.jsonl", [GOOD, "bad json", GOOD | {"custom_id": "x"}])
    drain(d)
    text = (tmp_path / "metrics" / "batchd.prom").read_text()
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("batchd_jobs_total", (("state", "completed"),))] == 1
    assert samples[("batchd_jobs_total", (("state", "failed"),))] == 0
    assert samples[("batchd_requests_total", (("outcome", "succeeded"), ("profile", "tiny")))] == 2
    assert samples[("batchd_requests_total", (("outcome", "failed"), ("profile", "tiny")))] == 1
    assert samples[("batchd_model_loaded", (("model", "batchd/tiny-llama"),
                                            ("profile", "tiny")))] == 1
    assert "# TYPE batchd_tokens_total counter" in text
    assert samples[("batchd_last_claim_timestamp_seconds", ())] > 0


def test_profile_limits_bound_what_a_request_may_ask(daemon, settings):
    (settings.routing.profiles_dir / "capped.toml").write_text(
        'model = "org/capped"\n[limits]\nmax_tokens = 100\nn = 2\nlogprobs = 5\n')
    daemon.profiles = ProfileSet.load(settings.routing.profiles_dir)
    daemon.admission.reloaded(daemon.profiles)
    drop(settings.inbox, "capped__x.jsonl", [
        {"custom_id": "ok", "prompt": "a", "max_tokens": 100},
        {"custom_id": "long", "prompt": "a", "max_tokens": 101},
        {"custom_id": "many", "prompt": "a", "n": 3},
        {"custom_id": "lp", "prompt": "a", "logprobs": 6},
        {"custom_id": "chatlp", **GOOD, "logprobs": True, "top_logprobs": 9},
    ])
    drain(daemon)
    results, errors = outputs(settings.outbox, "capped__x")
    assert [r["custom_id"] for r in results] == ["ok"]
    params = {e["custom_id"]: e["response"]["body"]["error"]["param"] for e in errors}
    assert params == {"long": "max_tokens", "many": "n", "lp": "logprobs",
                      "chatlp": "top_logprobs"}
    assert "over this profile's limit of 100" in errors[0]["response"]["body"]["error"]["message"]


def test_loaded_profile_goes_first_unless_another_waited_too_long(settings):
    """With 'other' loaded, its files go before older 'tiny' files; once a file has
    waited past max_wait_seconds it goes next regardless. The status says why."""
    settings.scheduling.max_wait_seconds = 50
    d = in_process(settings, settle=0, factory=FakeEngine)
    drop(settings.inbox, "other__first.jsonl", [GOOD])
    assert one_pass(d, now=0.0)  # loads "other"
    drop(settings.inbox, "tiny__old.jsonl", [GOOD])
    drop(settings.inbox, "other__new.jsonl", [GOOD])
    assert one_pass(d, now=10.0)
    assert final_state(settings.outbox, "other__new") == "completed"
    assert final_state(settings.outbox, "tiny__old") is None
    status = read_jsonl(settings.outbox / "other__new.status.jsonl")[0]
    assert status["message"] == "claimed: profile other is already loaded"
    drop(settings.inbox, "other__late.jsonl", [GOOD])
    assert one_pass(d, now=61.0)  # tiny__old has waited 51 s > 50
    assert final_state(settings.outbox, "tiny__old") == "completed"
    assert final_state(settings.outbox, "other__late") is None
    status = read_jsonl(settings.outbox / "tiny__old.status.jsonl")[0]
    assert status["message"].startswith("claimed: waited 51s, over max_wait_seconds")
    bench = json.loads((settings.outbox / "tiny__old.bench.json").read_text())
    assert bench["timing_s"]["queued"] >= 51


def test_expired_before_it_ran(daemon, settings):
    """A sidecar's expires_at already past: every line is `batch_expired`, final `expired`."""
    (settings.inbox / "old.toml").write_text('expires_at = 2020-01-01T00:00:00Z\n')
    drop(settings.inbox, "old.jsonl", [GOOD, GOOD | {"custom_id": "b"}, "bad json"])
    drain(daemon)
    assert final_state(settings.outbox, "old") == "expired"
    results, errors = outputs(settings.outbox, "old")
    assert results == []
    assert sorted(e["response"]["body"]["error"]["code"] for e in errors) == [
        "batch_expired", "batch_expired", "invalid_json_line"]
    import tomllib
    job_toml = tomllib.loads((settings.outbox / "old.job.toml").read_text())
    assert job_toml["expires_at"].isoformat() == "2020-01-01T00:00:00+00:00"
    # where the input is once the job has ended, and it is there
    assert job_toml["input"] == str(settings.layout.out("old", "input.jsonl"))
    assert (settings.outbox / "old.input.jsonl").is_file()


def test_completion_window_passes_mid_job(settings):
    """A window that ends while the job runs: answered lines stay, the rest expire.
    The engine's steps move both of the daemon's clocks (a FakeClock, and the wall
    clock the expiry is checked on), so the window ends after step 30 of 100 at
    any machine speed."""
    from datetime import datetime, timedelta, timezone
    from batchd.testing import FakeClock
    clock = FakeClock(0.0)
    start = datetime.now(timezone.utc)
    d = in_process(settings, factory=lambda p: FakeEngine(p, step_seconds=0.05, per_step=4,
                                                      sleep=clock.sleep), clock=clock,
               wall=lambda: start.timestamp() + clock())
    soon = start + timedelta(seconds=1.5)  # the job needs 100 steps of 0.05 s
    (settings.inbox / "w.toml").write_text(f'expires_at = {soon.isoformat()}\n')
    drop(settings.inbox, "w.jsonl", [GOOD | {"custom_id": f"r{i}"} for i in range(400)])
    drain(d)
    assert final_state(settings.outbox, "w") == "expired"
    results, errors = outputs(settings.outbox, "w")
    assert 0 < len(results) <= 30 * 4 and len(results) + len(errors) == 400
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"batch_expired"}
    assert {r["custom_id"] for r in results}.isdisjoint(e["custom_id"] for e in errors)


def test_bad_completion_window_rejects_the_file(daemon, settings):
    (settings.inbox / "bw.toml").write_text('completion_window = "tomorrow"\n')
    drop(settings.inbox, "bw.jsonl", [GOOD])
    drain(daemon)
    assert final_state(settings.outbox, "bw") == "failed"
    last = json.loads((settings.outbox / "bw.status.jsonl").read_text().splitlines()[-1])
    assert last["errors"][0]["code"] == "invalid_sidecar"
    assert "completion_window" in last["errors"][0]["message"]
