"""Engine replicas on real vLLM (CPU build): one daemon, `[engine] replicas = 2`,
each replica an engine process on a core of its own. A file is dealt to both;
kill -9 of one replica's engine process mid-job loses nothing, the replica
comes back, and the file is published once in input order. A file for another
profile then swaps every replica (the old engine processes all end first)."""

import json
import os
import signal
import subprocess
import socket

import psutil
import pytest

from batchd.engine.places import core_range, cpu_slices

from conftest import (BATCHD, OTHER_PROFILE, TINY_PROFILE, drop, family_chats, final_state,
                      outputs, served_spool, wait_for)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]



def engine_processes(daemon):
    return [p for p in psutil.Process(daemon.proc.pid).children(recursive=True)
            if "batchd.engine.host" in " ".join(p.cmdline())]


def exactly_once_in_order(outbox, job, n, prefix=None):
    results, errors = outputs(outbox, job)
    assert errors == []
    assert [r["custom_id"] for r in results] == [f"{prefix or job}{i}" for i in range(n)]


def test_two_replicas_share_a_job_and_survive_a_kill(tiny_model, tmp_path, daemons):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    config = served_spool(tmp_path, tiny_model.parent,
                          {"tiny": TINY_PROFILE, "other": OTHER_PROFILE},
                          "[engine]\nreplicas = 2\nwindow = 32\n")
    daemon = daemons(config)
    daemon.wait_ready()
    inbox, outbox = tmp_path / "spool" / "inbox", tmp_path / "spool" / "outbox"

    # kill -9 of the second replica's engine process while the job runs on both
    drop(inbox, "shared.jsonl", family_chats("shared", 1200))

    def answered_by_both():  # the daemon's record (once a second): each replica's count
        records = [json.loads(p.read_text())
                   for p in (tmp_path / "spool" / "daemons").glob("*.json")]
        counts = [r["requests"] for rec in records for r in rec.get("replicas", [])]
        return len(counts) == 2 and min(counts) > 0

    wait_for(answered_by_both, 300, what="answers from both replicas")
    shares = cpu_slices(2)  # each replica's share of the cores: a core each here
    engines = engine_processes(daemon)
    assert sorted(p.cpu_affinity() for p in engines) == shares
    victim = next(p for p in engines if p.cpu_affinity() == shares[1])
    other = next(p for p in engines if p.cpu_affinity() == shares[0])
    # the other replica (and its vLLM engine core) stopped meanwhile: the job cannot
    # end before the death is seen, however fast the machine
    os.killpg(other.pid, signal.SIGSTOP)
    try:
        victim.send_signal(signal.SIGKILL)
        wait_for(lambda: any(e.get("event") == "replica_died" for e in daemon.logs()), 60,
                 what="the death seen")
    finally:
        os.killpg(other.pid, signal.SIGCONT)
    assert final_state(outbox, "shared") is None
    assert wait_for(lambda: final_state(outbox, "shared"), 600, what="shared") == "completed"
    exactly_once_in_order(outbox, "shared", 1200)  # no error line: nothing lost, nothing twice
    died = [e for e in daemon.logs() if e.get("event") == "replica_died"]
    assert [e["replica"] for e in died] == [1] and died[0]["state"] == "dead"
    wait_for(lambda: [e["replica"] for e in daemon.logs()
                      if e.get("event") == "replica_ready"].count(1) == 2, 300,
             what="the killed replica back")
    bench = json.loads((outbox / "shared.bench.json").read_text())
    replicas = bench["replicas"]
    host = socket.gethostname()
    assert sorted(r["where"] for r in replicas) == [f"{host} cores {core_range(c)}"
                                                    for c in shares]
    # every answer counted once, on the replica that gave it (how fairly they
    # share a job is measured by `python -m benchmarks run replicas`)
    assert sum(r["requests"] for r in replicas) == 1200
    assert min(r["requests"] for r in replicas) > 0
    status = subprocess.run([BATCHD, "status", "--config", str(config)], capture_output=True,
                            text=True, check=True).stdout
    assert f"{host} cores {core_range(shares[1])}" in status and "ready" in status

    # a swap swaps them all: every engine process of the old profile (and its
    # memory) gone before the other profile's replicas answer, a core each again
    old = engine_processes(daemon)
    old_memory = sum(p.memory_info().rss for p in old)
    drop(inbox, "other__swap.jsonl", family_chats("swap", 200))
    job = "other__swap"  # the PROFILE__ prefix chose the profile; the job keeps the name
    assert wait_for(lambda: final_state(outbox, job), 600, what="swap") == "completed"
    exactly_once_in_order(outbox, job, 200, prefix="swap")
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in old)
    new = engine_processes(daemon)
    assert len(new) == 2 and not {p.pid for p in new} & {p.pid for p in old}
    assert sorted(p.cpu_affinity() for p in new) == shares
    swapped = [e for e in daemon.logs() if e.get("event") == "engine_process_ended"]
    assert len(swapped) >= 3  # the killed one, then both of the old profile
    print(f"memory of the old profile's engine processes, freed by the swap: "
          f"{old_memory / 2**20:.0f} MiB")
    assert daemon.stop() == 0
