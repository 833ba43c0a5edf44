"""Several daemons on one spool (one per GPU, or one per host over NFS): every
file runs exactly once, and every status file has one writer."""

import pytest

from conftest import drop, final_state, read_jsonl, wait_for

pytestmark = pytest.mark.slow


def test_three_daemons_200_files(spool_config, tmp_path, daemons):
    config = spool_config()
    running = [daemons(config, env={"BATCHD_FAKE_STEP_SECONDS": "0.01"}, fake=True)
               for _ in range(3)]
    for daemon in running:
        daemon.wait_ready()
    inbox, outbox = tmp_path / "spool" / "inbox", tmp_path / "spool" / "outbox"
    for i in range(200):
        drop(inbox, f"f{i:03d}.jsonl", [{"custom_id": f"f{i}-{k}", "prompt": "x"}
                                        for k in range(3)])
    wait_for(lambda: all(final_state(outbox, f"f{i:03d}") for i in range(200)), 180,
             interval=0.2, what="all 200 files")
    owners = {}
    for i in range(200):
        job = f"f{i:03d}"
        status = read_jsonl(outbox / f"{job}.status.jsonl")
        assert status[-1]["state"] == "completed"
        writers = {s["daemon"] for s in status}
        assert len(writers) == 1, (job, writers)
        owners[job] = writers.pop()
        results = read_jsonl(outbox / f"{job}.results.jsonl")
        assert sorted(r["custom_id"] for r in results) == [f"f{i}-{k}" for k in range(3)]
    assert sorted(p.name for p in outbox.glob("*.status.jsonl")) == \
        sorted(f"f{i:03d}.status.jsonl" for i in range(200))  # no f001-2: nothing ran twice
    claims = [e for d in running for e in d.logs() if e.get("event") == "job_claimed"]
    assert len(claims) == 200
    assert len(set(owners.values())) >= 2  # the work was shared
    assert list(inbox.iterdir()) == [] and list((tmp_path / "spool" / "work").iterdir()) == []
