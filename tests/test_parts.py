"""One job on many daemons (CONTRACT 18), on the fake engine: cutting a job
into parts, the parts' leases and checkpoints, takeover, one publication in
input order. The same on real vLLM, two daemons with their own engines, is in
test_vllm_parts.py."""

import json
import os
import signal
import subprocess
import time
from array import array

import pytest

from batchd.jobs.order import PrefixOrder, family
from batchd.jobs.parts import cut
from batchd.lines import Request
from batchd.spool.parts import unpack

from conftest import BATCHD, drop, final_state, outputs, read_jsonl, wait_for


def lines(prefix, n, **extra):
    return [{"custom_id": f"{prefix}{i}", "prompt": f"{prefix} {i}", **extra} for i in range(n)]


def check_once_in_order(outbox, job, sent, errors=()):
    results, failed = outputs(outbox, job)
    assert [r["custom_id"] for r in results] == [l["custom_id"] for l in sent
                                                 if l["custom_id"] not in errors]
    assert sorted(e["custom_id"] for e in failed) == sorted(errors)
    return results, failed


# -- cutting ------------------------------------------------------------------------

def test_cut_keeps_prefix_groups_together_and_run_order():
    order = PrefixOrder()
    topics = [f"topic {t} " * 40 for t in range(6)]
    for i in range(600):  # six groups of 100 interleaved in the file, and no group
        body = {"prompt": topics[i % 6] + f"line {i}"} if i < 540 else {"prompt": f"alone {i}"}
        order.add(Request(i, f"c{i}", "/v1/completions", body), offset=10 * i)
    sequence = [line for line, _ in order.sequence()]
    pieces = cut(((family(g), *order._at(i)) for g, i in order.grouped()), 150)
    got = [[unpack(e)[0] for e in piece] for piece in pieces]
    assert sorted(sum(got, [])) == list(range(600))  # every line in exactly one part
    assert all(len(p) <= 300 for p in got) and len(got) >= 3
    for piece in got:  # each part keeps the order the lines run in
        assert piece == [line for line in sequence if line in set(piece)]
    for t in range(6):  # a topic's lines are all on one engine
        where = {k for k, piece in enumerate(got) for line in piece if line < 540 and line % 6 == t}
        assert len(where) == 1, (t, where)
    for piece in pieces:  # each line with its own offset
        assert all(unpack(e)[1] == 10 * unpack(e)[0] for e in piece)


def test_cut_splits_a_group_larger_than_a_part():
    grouped = [(7, i, i) for i in range(1000)]  # one system prompt shared by every line
    pieces = cut(grouped, 100)
    assert [len(p) for p in pieces] == [100] * 10
    assert [unpack(e)[0] for p in pieces for e in p] == list(range(1000))
    assert cut([(0, i, i) for i in range(250)], 100) and \
        [len(p) for p in cut([(0, i, i) for i in range(250)], 100)] == [100, 100, 50]
    assert isinstance(pieces[0], array)


# -- one daemon, a job in parts -------------------------------------------------------

@pytest.fixture
def parts_config(spool_config):
    return spool_config("[scheduling]\npart_lines = 40\n[engine]\ncheckpoint_every = 4\n")


def test_one_daemon_runs_every_part_and_publishes_once_in_input_order(parts_config, tmp_path):
    from batchd.config import load_settings
    from batchd.daemon import Daemon
    from batchd.testing import FakeEngine

    settings = load_settings(parts_config)
    d = Daemon(settings, factory=lambda p: FakeEngine(p, per_step=16), clock=lambda: 1000.0)
    d.setup()
    spool = tmp_path / "spool"
    sent = lines("r", 150)
    sent.insert(33, "not json")
    drop(spool / "inbox", "big.jsonl", sent)
    small = lines("s", 5)
    drop(spool / "inbox", "small.jsonl", small)
    for tick in range(2000):
        d.run_once(now=2000.0 + tick)
        if final_state(spool / "outbox", "big") and final_state(spool / "outbox", "small"):
            break
    assert final_state(spool / "outbox", "big") == "completed"
    results, errors = outputs(spool / "outbox", "big")
    assert [r["custom_id"] for r in results] == [l["custom_id"] for l in sent if l != "not json"]
    assert [e["response"]["body"]["error"]["code"] for e in errors] == ["invalid_json_line"]
    bench = json.loads((spool / "outbox" / "big.bench.json").read_text())
    assert bench["split"] == {"parts": 4, "part_lines": 40}
    assert bench["requests"] == {"total": 151, "succeeded": 150, "failed": 1}
    (worker,) = bench["workers"]
    assert worker["parts"] == 4 and worker["requests"] == 150
    status = read_jsonl(spool / "outbox" / "big.status.jsonl")
    assert {s["daemon"] for s in status} == {status[0]["daemon"]}  # one writer
    assert [s["state"] for s in status].count("completed") == 1
    assert final_state(spool / "outbox", "small") == "completed"  # unsplit: runs as before
    assert json.loads((spool / "outbox" / "small.bench.json").read_text())["split"] is None
    assert list((spool / "work").iterdir()) == []


# -- daemons sharing the spool ---------------------------------------------------------

def hook_config(spool_config, tmp_path, lease_seconds=60.0, part_lines=300, extra=""):
    log = tmp_path / "hook.log"
    return spool_config(
        f"[scheduling]\npart_lines = {part_lines}\nlease_seconds = {lease_seconds}\n"
        f"[hooks]\non_final = [\"sh\", \"-c\", \"echo $BATCHD_JOB $BATCHD_STATE >> {log}\"]\n"
        "[engine]\ncheckpoint_every = 16\ncheckpoint_seconds = 0.1\n" + extra), log


def part_events(daemon, event):
    return [e for e in daemon.logs() if e.get("event") == event]


FAKE_SLOW = {"BATCHD_FAKE_STEP_SECONDS": "0.02"}


@pytest.mark.slow
def test_two_daemons_share_a_job_and_a_late_one_joins(spool_config, tmp_path, daemons):
    config, hook = hook_config(spool_config, tmp_path)
    spool = tmp_path / "spool"
    sent = lines("r", 3000, max_tokens=8)
    # the engines answer nothing until the late daemon has a part, however slow
    # its start: then the job is shared at any speed of the machine
    hold = tmp_path / "hold"
    hold.touch()
    env = {**FAKE_SLOW, "BATCHD_FAKE_HOLD": str(hold)}
    first = daemons(config, env=env, fake=True)
    first.wait_ready()
    drop(spool / "inbox", "big.jsonl", sent)
    wait_for(lambda: part_events(first, "part_taken"), 30, what="the first part")
    second = daemons(config, env=env, fake=True)  # started after the job began
    wait_for(lambda: part_events(second, "part_taken"), 30, what="the second's first part")
    table = subprocess.run([BATCHD, "status", "--config", str(config)], capture_output=True,
                           text=True, check=True).stdout
    assert all(f":{d.proc.pid}" in table for d in (first, second))  # both daemons listed
    shown = json.loads(subprocess.run([BATCHD, "status", "big", "--json", "--config",
                                       str(config)], capture_output=True, text=True,
                                      check=True).stdout)
    assert len(shown["parts"]) == 10 and shown["state"] == "in_progress"
    hold.unlink()
    assert wait_for(lambda: final_state(spool / "outbox", "big"), 120, what="big") == "completed"
    check_once_in_order(spool / "outbox", "big", sent)
    bench = json.loads((spool / "outbox" / "big.bench.json").read_text())
    workers = {w["daemon"]: w for w in bench["workers"]}
    assert len(workers) == 2 and sum(w["requests"] for w in workers.values()) == 3000
    assert bench["requests"]["succeeded"] == 3000 and bench["split"]["parts"] == 10
    assert sum(len(part_events(d, "part_taken")) for d in (first, second)) == 10
    wait_for(lambda: hook.exists(), 30, what="the hook")
    time.sleep(0.5)  # a second run of the hook would have come by now
    assert hook.read_text().splitlines() == ["big completed"]
    assert list((spool / "work").glob("big*")) == []
    assert first.stop() == 0 and second.stop() == 0
    assert list((spool / "daemons").iterdir()) == []  # each removed its record


@pytest.mark.slow
def test_kill9_of_a_daemon_mid_job_and_a_cancel(spool_config, tmp_path, daemons):
    """The owner is killed: the other daemon takes over the job and the killed
    one's parts (its pid is gone: at once) and finishes it exactly once. Then
    a second job in parts is cancelled: every part stops, answered lines stay."""
    config, hook = hook_config(spool_config, tmp_path)
    spool = tmp_path / "spool"
    sent = lines("r", 3000, max_tokens=8)
    hold = tmp_path / "hold"  # nothing answered until the kill: the owner dies mid-job
    hold.touch()
    env = {**FAKE_SLOW, "BATCHD_FAKE_HOLD": str(hold)}
    owner = daemons(config, env=env, fake=True)
    owner.wait_ready()
    drop(spool / "inbox", "big.jsonl", sent)
    wait_for(lambda: part_events(owner, "part_taken"), 30, what="the owner's first part")
    other = daemons(config, env=env, fake=True)
    wait_for(lambda: part_events(other, "part_taken"), 30, what="the other's first part")
    owner.kill()
    hold.unlink()
    assert wait_for(lambda: final_state(spool / "outbox", "big"), 120, what="big") == "completed"
    check_once_in_order(spool / "outbox", "big", sent)
    assert any(e.get("job") == "big" for e in part_events(other, "job_taken_over"))
    status = read_jsonl(spool / "outbox" / "big.status.jsonl")
    assert len({s["daemon"] for s in status}) == 2  # the owner's lines, then its successor's

    more = lines("c", 3000, max_tokens=8)
    hold.touch()  # held running until cancelled
    drop(spool / "inbox", "tocancel.jsonl", more)
    wait_for(lambda: (spool / "work" / "tocancel.parts" / "plan.json").exists()
             and part_events(other, "part_taken")[-1].get("job", "").startswith("tocancel"),
             30, what="tocancel's parts running")
    (spool / "inbox" / "tocancel.cancel").touch()
    assert wait_for(lambda: final_state(spool / "outbox", "tocancel"), 30) == "cancelled"
    results, errors = outputs(spool / "outbox", "tocancel")
    assert len(results) + len(errors) == 3000 and errors
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"cancelled"}
    ids = [r["custom_id"] for r in results] + [e["custom_id"] for e in errors]
    assert sorted(ids) == sorted(l["custom_id"] for l in more)
    wait_for(lambda: not list((spool / "work").glob("tocancel*")), 10, what="work/ cleaned")
    wait_for(lambda: len(hook.read_text().splitlines()) == 2, 30, what="hooks")
    assert sorted(hook.read_text().splitlines()) == ["big completed", "tocancel cancelled"]


def test_a_stopped_daemon_of_another_host_loses_its_part(spool_config, tmp_path, daemons):
    """A daemon presenting another host name is stopped (SIGSTOP, as a host cut
    off from the spool): after lease_seconds of silence its part and the job it
    owns are taken over. When it runs again it finds its leases lost and writes
    no more into them; the job comes out exactly once."""
    config, hook = hook_config(spool_config, tmp_path, lease_seconds=2.0, part_lines=300)
    spool = tmp_path / "spool"
    sent = lines("r", 1500, max_tokens=8)
    # a part of 300 lines takes about 2 s here: it is stopped in the middle of one
    cut_off = daemons(config, env={"BATCHD_FAKE_STEP_SECONDS": "0.05",
                                   "BATCHD_HOSTNAME": "elsewhere"}, fake=True)
    cut_off.wait_ready()
    drop(spool / "inbox", "big.jsonl", sent)

    def running_a_part():
        for path in (spool / "work" / "big.parts").glob("*elsewhere*.progress.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not record["done"] and 0 < record["answered"] < record["total"] - 100:
                return True
        return False

    wait_for(running_a_part, 30, interval=0.01, what="it to be in the middle of a part")
    os.kill(cut_off.proc.pid, signal.SIGSTOP)
    try:
        frozen = {p.name: p.stat().st_size for p in (spool / "work" / "big.parts").glob(
            "*elsewhere*.ckpt.jsonl")}
        taker = daemons(config, env=FAKE_SLOW, fake=True)
        wait_for(lambda: any(e.get("job") == "big" for e in part_events(taker, "job_taken_over")),
                 30, what="the job taken over")
        wait_for(lambda: any("#" in str(e.get("job")) for e in part_events(
            taker, "job_taken_over")), 30, what="its part taken over")
    finally:
        os.kill(cut_off.proc.pid, signal.SIGCONT)

    def lost():
        return {e["job"] for e in part_events(cut_off, "lease_lost")}

    wait_for(lambda: "big" in lost() and any("#" in j for j in lost()), 30,
             what="the cut-off daemon to notice it lost the job and its part")
    assert wait_for(lambda: final_state(spool / "outbox", "big"), 120, what="big") == "completed"
    check_once_in_order(spool / "outbox", "big", sent)
    time.sleep(0.5)
    assert hook.read_text().splitlines() == ["big completed"]
    assert frozen  # it had written its own checkpoint, which the taker read


@pytest.mark.slow
def test_the_last_parts_of_many_jobs_end_together_and_each_job_publishes_once(
        spool_config, tmp_path, daemons):
    """Three daemons, four jobs of four equal parts dropped at once: last parts
    end at nearly the same moment on different daemons; each job has one final
    status line, one writer of its status file, one hook run, every line once."""
    config, hook = hook_config(spool_config, tmp_path, part_lines=100)
    spool = tmp_path / "spool"
    running = [daemons(config, env=FAKE_SLOW, fake=True) for _ in range(3)]
    for daemon in running:
        daemon.wait_ready()
    sent = {f"j{j}": lines(f"j{j}-", 400) for j in range(4)}
    for job, body in sent.items():
        drop(spool / "inbox", f"{job}.jsonl", body)
    for job, body in sent.items():
        assert wait_for(lambda job=job: final_state(spool / "outbox", job), 120) == "completed"
        check_once_in_order(spool / "outbox", job, body)
        status = read_jsonl(spool / "outbox" / f"{job}.status.jsonl")
        assert [s["state"] for s in status].count("completed") == 1
        assert len({s["daemon"] for s in status}) == 1
    wait_for(lambda: hook.exists() and len(hook.read_text().splitlines()) >= 4, 30)
    time.sleep(0.5)
    assert sorted(hook.read_text().splitlines()) == [f"j{j} completed" for j in range(4)]
    ran = {e["job"] for d in running for e in part_events(d, "part_taken")}
    assert len(ran) == 16
    assert sum(bool(part_events(d, "part_taken")) for d in running) >= 2
