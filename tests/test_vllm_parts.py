"""One job on two daemons with real vLLM engines of their own (CONTRACT 18).

Daemon A presents another host name (as on a second host sharing the spool
over NFS); the job is dropped while only A runs; B starts after the job
began and takes parts; A is killed with -9 mid-job: after lease_seconds of
silence B takes over A's parts and the job A owned, and publishes it once, in
input order, both daemons in its ``workers``, the hook run once. Then a second
job in parts is cancelled mid-way. The part bookkeeping itself is tested on
the fake engine in test_parts.py.
"""

import json
import subprocess

import pytest

from conftest import BATCHD, drop, final_state, outputs, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N = 4000


def events(daemon, name):
    return [e for e in daemon.logs() if e.get("event") == name]


def test_two_real_daemons_share_a_job_survive_a_kill_and_cancel(
        tiny_model, spool_config, tmp_path, daemons):
    hook = tmp_path / "hook.log"
    config = spool_config(
        "[scheduling]\npart_lines = 500\nlease_seconds = 3\n"
        f"[hooks]\non_final = [\"sh\", \"-c\", \"echo $BATCHD_JOB $BATCHD_STATE >> {hook}\"]\n"
        "[engine]\ncheckpoint_every = 16\ncheckpoint_seconds = 0.2\n")
    spool = tmp_path / "spool"
    outbox = spool / "outbox"
    sent = [{"custom_id": f"r{i}", "prompt": f"topic {i % 5} " * 30 + f"line {i}",
             "max_tokens": 12, "ignore_eos": True} for i in range(N)]
    a = daemons(config, env={"BATCHD_HOSTNAME": "second-host"})
    a.wait_ready()
    drop(spool / "inbox", "big.jsonl", sent)
    wait_for(lambda: events(a, "part_taken"), 300, what="A's first part")
    b = daemons(config)  # started after the job began
    wait_for(lambda: events(b, "part_taken"), 300, what="B's first part")
    out = subprocess.run([BATCHD, "status", "big", "--json", "--config", str(config)],
                         capture_output=True, text=True, check=True)
    parts = json.loads(out.stdout)["parts"]
    assert sum(p["lines"] for p in parts) == N and len(parts) >= 8
    assert {(p["daemon"] or "").split(":")[0] for p in parts} >= {"second-host"}
    a.kill()  # kill -9 mid-job; its parts' leases go stale after lease_seconds
    assert wait_for(lambda: final_state(outbox, "big"), 600, what="big") == "completed", \
        b.log.read_text()[-3000:]
    results, errors = outputs(outbox, "big")
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in sent]
    assert errors == []
    taken = {e["job"] for e in events(b, "job_taken_over")}
    assert "big" in taken and any(j.startswith("big#") for j in taken)
    bench = json.loads((outbox / "big.bench.json").read_text())
    workers = {w["daemon"].split(":")[0]: w for w in bench["workers"]}
    assert "second-host" in workers and len(workers) == 2
    assert bench["requests"]["succeeded"] == N
    assert bench["tokens"]["completion"] == 12 * N  # every part's answers counted once
    wait_for(lambda: hook.exists(), 30, what="the hook")

    more = [{"custom_id": f"c{i}", "prompt": f"cancel me {i}", "max_tokens": 12,
             "ignore_eos": True} for i in range(N)]
    drop(spool / "inbox", "tocancel.jsonl", more)
    wait_for(lambda: any(e["job"].startswith("tocancel#") for e in events(b, "part_taken")),
             300, what="tocancel's parts running")
    subprocess.run([BATCHD, "cancel", "tocancel", "--config", str(config)], check=True)
    assert wait_for(lambda: final_state(outbox, "tocancel"), 60) == "cancelled"
    results, errors = outputs(outbox, "tocancel")
    ids = [r["custom_id"] for r in results] + [e["custom_id"] for e in errors]
    assert sorted(ids) == sorted(line["custom_id"] for line in more)
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"cancelled"}
    wait_for(lambda: len(hook.read_text().splitlines()) == 2, 30, what="hooks")
    assert sorted(hook.read_text().splitlines()) == ["big completed", "tocancel cancelled"]
    assert b.stop() == 0
    assert not list((spool / "work").glob("big*")) and not list((spool / "work").glob("toc*"))
