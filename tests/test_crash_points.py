"""kill -9 at the other points of a job's life: while validating and while
publishing. Real daemon processes and real signals on the fake engine (the
real-vLLM kills are in test_vllm_crash.py); points are chosen by the status file."""

import json

import pytest

from conftest import drop, final_state, read_jsonl, wait_for

pytestmark = pytest.mark.slow

N = 200_000


@pytest.fixture
def big_job(spool_config, tmp_path):
    config = spool_config("[engine]\nwindow = 4096\n")
    inbox = tmp_path / "spool" / "inbox"
    inbox.mkdir(parents=True)
    lines = [json.dumps({"custom_id": f"r{i}", "prompt": "x"}) for i in range(N)]
    lines[5] = "{broken"
    drop(inbox, "big.jsonl", lines)
    return config, tmp_path / "spool"


def last_state(spool):
    from batchd.spool.outbox import read_status  # the daemon may be mid-line
    records = read_status(spool / "outbox" / "big.status.jsonl")
    return records[-1] if records else {}


def exactly_once(spool):
    outbox = spool / "outbox"
    results = read_jsonl(outbox / "big.results.jsonl")
    errors = read_jsonl(outbox / "big.errors.jsonl")
    ids = [r["custom_id"] for r in results] + [e["custom_id"] for e in errors]
    assert len(ids) == N and len(set(ids)) == N
    assert [e["line"] for e in errors] == [6]


@pytest.mark.parametrize("phase,where", [("validating", "validating:2"),  # mid-way
                                         ("publishing", "publishing")])  # one line
def test_kill9_at_phase_then_resume(big_job, daemons, phase, where):
    config, spool = big_job
    import psutil
    # the daemon stops itself where it writes the phase's status line: the kill
    # lands in that phase, not after it, however slow the machine
    daemon = daemons(config, env={"BATCHD_FAKE_STOP_AT": where,
                                  "BATCHD_STATUS__INTERVAL": "0.05"}, fake=True)
    wait_for(lambda: psutil.Process(daemon.proc.pid).status() == psutil.STATUS_STOPPED,
             120, what=f"the daemon stopped at phase {phase}")
    assert last_state(spool).get("phase") == phase
    daemon.kill()
    assert final_state(spool / "outbox", "big") is None
    again = daemons(config, args=("--once",), fake=True)
    assert again.proc.wait(300) == 0, again.log.read_text()[-2000:]
    assert final_state(spool / "outbox", "big") == "completed"
    exactly_once(spool)
    assert list((spool / "work").iterdir()) == []
