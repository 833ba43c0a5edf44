"""Engine replicas on real vLLM (CPU build): one daemon, `[engine] replicas = 2`,
each replica an engine process on a core of its own. A file is dealt to both
and published once in input order; kill -9 of one replica's engine process
mid-job loses nothing and the replica comes back."""

import json
import os
import signal
import socket

import psutil
import pytest

from conftest import TINY_PROFILE, drop, final_state, outputs, served_spool, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def lines(prefix, n):
    # eight prefix families of a long shared system prompt each, in input order
    return [{"custom_id": f"{prefix}{i}", "max_tokens": 8, "ignore_eos": True,
             "messages": [{"role": "system", "content": f"Rubric {i % 8}: " + "be fair. " * 20},
                          {"role": "user", "content": f"Item {i}?"}]} for i in range(n)]


def engine_processes(daemon):
    return [p for p in psutil.Process(daemon.proc.pid).children(recursive=True)
            if "batchd.engine.host" in " ".join(p.cmdline())]


def exactly_once_in_order(outbox, job, n):
    results, errors = outputs(outbox, job)
    assert errors == []
    assert [r["custom_id"] for r in results] == [f"{job}{i}" for i in range(n)]


def test_two_replicas_share_a_job_and_survive_a_kill(tiny_model, tmp_path, daemons):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    config = served_spool(tmp_path, tiny_model.parent, {"tiny": TINY_PROFILE},
                          "[engine]\nreplicas = 2\nwindow = 32\n")
    daemon = daemons(config)
    daemon.wait_ready()
    inbox, outbox = tmp_path / "spool" / "inbox", tmp_path / "spool" / "outbox"

    drop(inbox, "shared.jsonl", lines("shared", 600))
    assert wait_for(lambda: final_state(outbox, "shared"), 600, what="shared") == "completed"
    exactly_once_in_order(outbox, "shared", 600)
    bench = json.loads((outbox / "shared.bench.json").read_text())
    replicas = bench["replicas"]
    host = socket.gethostname()
    assert sorted(r["where"] for r in replicas) == [f"{host} cores 0", f"{host} cores 1"]
    assert sum(r["requests"] for r in replicas) == 600
    assert min(r["requests"] for r in replicas) >= 600 * 0.25  # both did a fair share
    cores = sorted(tuple(p.cpu_affinity()) for p in engine_processes(daemon))
    assert cores == [(0,), (1,)]  # a core each

    # kill -9 of the second replica's engine process while a job runs on both
    drop(inbox, "killed.jsonl", lines("killed", 1500))
    wait_for(lambda: (tmp_path / "spool" / "work" / "killed.ckpt.jsonl").exists()
             and (tmp_path / "spool" / "work" / "killed.ckpt.jsonl").stat().st_size > 20_000,
             300, what="killed's first answers")
    victim = next(p for p in engine_processes(daemon) if p.cpu_affinity() == [1])
    victim.send_signal(signal.SIGKILL)
    assert wait_for(lambda: final_state(outbox, "killed"), 600, what="killed") == "completed"
    exactly_once_in_order(outbox, "killed", 1500)
    events = daemon.logs()
    died = [e for e in events if e.get("event") == "replica_died"]
    assert [e["replica"] for e in died] == [1] and died[0]["state"] == "dead"
    wait_for(lambda: [e["replica"] for e in daemon.logs()
                      if e.get("event") == "replica_ready"].count(1) == 2, 120,
             what="the killed replica back")
    assert daemon.stop() == 0
