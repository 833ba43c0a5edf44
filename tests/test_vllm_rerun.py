"""Re-runs, retries and signals on real vLLM (CPU build, tiny Llama), with real
daemon processes: the result cache, `batchd retry` after a cancel mid-job, and
the hook command and webhook across a kill -9 and restart.

One daemon serves the module until the last test kills it and starts another.
"""

import json
import os
import subprocess
import sys

import pytest
from standardwebhooks import Webhook

from conftest import (BATCHD, DaemonProcess, Receiver, drop, final_state, free_port, outputs,
                      read_jsonl, wait_for)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# The hook: one line per run; for the job "held" it then waits until released
# (opening the FIFO blocks until the test opens its other end), standing for a
# hook still running when its daemon is killed.
HOOK = """import json, os, sys
open(sys.argv[1], "a").write(json.dumps({k: v for k, v in os.environ.items()
                                         if k.startswith("BATCHD_")}) + "\\n")
if os.environ["BATCHD_JOB"] == "held":
    open(sys.argv[2]).read()
"""


class Spool:
    def __init__(self, base, config):
        self.base, self.config = base, config
        self.inbox, self.outbox = base / "spool" / "inbox", base / "spool" / "outbox"
        self.hook_log, self.release = base / "hook.log", base / "release"
        self.port = free_port()  # the webhook receiver's: nothing listens yet
        self.daemon: DaemonProcess | None = None

    def start(self):
        self.daemon = DaemonProcess(self.config)
        self.daemon.wait_ready()

    def wait(self, job, timeout=300):
        return wait_for(lambda: final_state(self.outbox, job), timeout, what=f"{job} to end")

    def bench(self, job):
        return json.loads((self.outbox / f"{job}.bench.json").read_text())

    def hooks_run(self):
        return [json.loads(l) for l in self.hook_log.read_text().splitlines()] \
            if self.hook_log.exists() else []


@pytest.fixture(scope="module")
def spool(tiny_model, tmp_path_factory):
    from conftest import TINY_PROFILE, served_spool
    base = tmp_path_factory.mktemp("rerun")
    (base / "hook.py").write_text(HOOK)
    os.mkfifo(base / "release")
    (base / "secret").write_text(SECRET + "\n")
    spool = Spool(base, None)
    argv = [sys.executable, str(base / "hook.py"), str(spool.hook_log), str(spool.release)]
    spool.config = served_spool(
        base, tiny_model.parent, {"tiny": TINY_PROFILE},
        "[engine]\nwindow = 64\n[cache]\nenabled = true\n"
        f"[hooks]\non_final = {json.dumps(argv)}\n"
        f'webhook_url = "http://127.0.0.1:{spool.port}/events"\n'
        'webhook_secret_file = "secret"\nwebhook_backoff_seconds = 0.5\n')
    spool.start()
    try:
        yield spool
        assert spool.daemon.stop() == 0, spool.daemon.log.read_text()[-3000:]
    finally:
        if spool.daemon.proc.poll() is None:
            spool.daemon.kill_tree()


def chat(i: int, **body) -> dict:
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": f"Question {i}: why?"}],
                     "max_tokens": 16, "temperature": 0, **body}}


def answer(line: dict) -> dict:
    body = dict(line["response"]["body"])
    assert body.pop("id") and body.pop("created")
    return {"custom_id": line["custom_id"], **body}


def test_a_rerun_is_answered_from_the_cache(spool):
    lines = [chat(i) for i in range(200)]
    drop(spool.inbox, "first.jsonl", lines)
    assert spool.wait("first") == "completed"
    drop(spool.inbox, "second.jsonl", lines)
    assert spool.wait("second") == "completed"
    first, second = spool.bench("first"), spool.bench("second")
    assert first["cache"] == {"hits": 0, "misses": 200}
    assert second["cache"] == {"hits": 200, "misses": 0}
    assert second["concurrency"]["engine_tokens"]["completion"] == 0  # nothing reached vLLM
    # answered before any engine work: no generation time at all
    assert second["timing_s"]["generation"] == 0 < first["timing_s"]["generation"]
    one, two = outputs(spool.outbox, "first")[0], outputs(spool.outbox, "second")[0]
    assert [answer(l) for l in two] == [answer(l) for l in one]
    assert all(a["response"]["body"]["id"] != b["response"]["body"]["id"]
               for a, b in zip(one, two))

    changed = lines[:]
    for i in range(0, 200, 20):
        changed[i] = chat(i, max_tokens=8)
    sampled = {"custom_id": "hot", "method": "POST", "url": "/v1/completions",
               "body": {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.8}}
    drop(spool.inbox, "third.jsonl", changed + [sampled])
    assert spool.wait("third") == "completed"
    assert spool.bench("third")["cache"] == {"hits": 190, "misses": 10}
    drop(spool.inbox, "fourth.jsonl", [sampled])
    assert spool.wait("fourth") == "completed"
    fourth = spool.bench("fourth")
    assert fourth["cache"] == {"hits": 0, "misses": 0}  # never cacheable
    assert fourth["concurrency"]["engine_tokens"]["completion"] == 8


def test_retry_after_a_cancel_mid_job_gives_one_complete_file(spool):
    # long enough (about 15 s here) that the cancel lands mid-job
    lines = [chat(i, temperature=0.7, max_tokens=48, ignore_eos=True) for i in range(2500)]
    drop(spool.inbox, "long.jsonl", lines)
    wait_for(lambda: any((r.get("request_counts") or {}).get("completed", 0) >= 40
                         for r in read_jsonl(spool.outbox / "long.status.jsonl")),
             300, what="long to be under way")
    subprocess.run([BATCHD, "cancel", "long", "--config", str(spool.config)], check=True,
                   capture_output=True)
    assert spool.wait("long") == "cancelled"
    results, errors = outputs(spool.outbox, "long")
    cancelled = [e for e in errors if e["response"]["body"]["error"]["code"] == "cancelled"]
    assert results and cancelled and len(results) + len(errors) == 2500

    done = subprocess.run([BATCHD, "retry", "long", "--config", str(spool.config)],
                          check=True, capture_output=True, text=True)
    name = done.stdout.strip()
    assert name == "long-retry"
    assert spool.wait(name) == "completed"
    merged = read_jsonl(spool.outbox / f"{name}.merged.jsonl")
    assert [m["custom_id"] for m in merged] == [f"q{i}" for i in range(2500)]
    assert all(m["response"]["status_code"] == 200 for m in merged)
    assert merged[:1] and all("choices" in m["response"]["body"] for m in merged)
    retried = read_jsonl(spool.outbox / f"{name}.results.jsonl")
    assert len(retried) == len(cancelled)


def test_hooks_run_once_and_webhooks_arrive_signed_across_a_restart(spool):
    """The receiver is down while jobs end. A hook still runs when the daemon is
    killed (job "held"); another job's final line is written meanwhile
    ("after"). The next daemon starts neither hook twice, runs the pending one,
    and delivers every signed event once the receiver is up."""
    drop(spool.inbox, "held.jsonl", [chat(1000)])
    wait_for(lambda: any(r["BATCHD_JOB"] == "held" for r in spool.hooks_run()), 120,
             what="the hook of held to start")
    drop(spool.inbox, "after.jsonl", [chat(1001)])
    assert spool.wait("after") == "completed"
    assert not any(r["BATCHD_JOB"] == "after" for r in spool.hooks_run())  # not yet
    spool.daemon.kill()  # kill -9, right after after's final status line
    receiver = Receiver(port=spool.port)
    released = False
    try:
        spool.start()
        wait_for(lambda: any(r["BATCHD_JOB"] == "after" for r in spool.hooks_run()), 120,
                 what="the hook of after, in the new daemon")
        spool.release.write_text("")  # the old daemon's hook of held ends now
        released = True
        ended = ["first", "second", "third", "fourth", "long", "long-retry", "held", "after"]
        # the first jobs' deliveries back off (0.5 s, doubling) for as long as the
        # receiver was down: this module's whole run
        wait_for(lambda: {json.loads(b)["data"]["id"] for _, b in receiver.got} >= set(ended),
                 300, what="every job's webhook")
        wait_for(lambda: not list((spool.base / "spool" / "events").glob("*.json")), 60,
                 what="every event record done")
        runs = [r["BATCHD_JOB"] for r in spool.hooks_run()]
        assert sorted(runs) == sorted(ended)  # each job's hook exactly once
        long_run = next(r for r in spool.hooks_run() if r["BATCHD_JOB"] == "long")
        assert long_run["BATCHD_STATE"] == "cancelled" and long_run["BATCHD_TOTAL"] == "2500"
        retry_run = next(r for r in spool.hooks_run() if r["BATCHD_JOB"] == "long-retry")
        assert retry_run["BATCHD_MERGED_FILE"].endswith("long-retry.merged.jsonl")
        by_job: dict[str, set] = {}
        for headers, body in receiver.got:
            event = Webhook(SECRET).verify(body, headers)  # the receiver's own library
            by_job.setdefault(event["data"]["id"], set()).add(
                (headers["webhook-id"], event["id"], event["type"]))
        assert all(len(ids) == 1 for ids in by_job.values())  # redeliveries: one id
        assert {job: next(iter(ids))[2] for job, ids in by_job.items()} == {
            **{job: "batch.completed" for job in ended}, "long": "batch.cancelled"}
    finally:
        receiver.close()
        if not released:  # never leave the hook blocked
            try:
                os.close(os.open(spool.release, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no hook is reading it
