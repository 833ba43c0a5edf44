"""Nothing lost, ever: kill -9, SIGTERM and a dead engine process, on real vLLM.

Crash points are chosen by the checkpoint's size, not by sleeping.
"""

import json
import signal

import psutil
import pytest

from batchd.spool.outbox import read_status

from conftest import drop, final_state, read_jsonl, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N = 1500


def make_crash_spool(spool_config, prompt):
    config = spool_config('[engine]\nwindow = 64\ncheckpoint_every = 8\n'
                          'checkpoint_seconds = 0.2\n')
    spool = config.parent / "spool"
    (spool / "inbox").mkdir(parents=True)
    lines = [{"custom_id": f"r{i}", "prompt": prompt(i), "max_tokens": 48,
              "ignore_eos": True} for i in range(N)]
    lines.insert(7, "not json")  # a bad line must also come out exactly once
    drop(spool / "inbox", "long.jsonl", lines)
    return config, spool


@pytest.fixture
def crash_spool(tiny_model, spool_config):
    return make_crash_spool(spool_config, lambda i: f"line {i}")


@pytest.fixture
def shared_prefix_spool(tiny_model, spool_config):
    """Seven shared ~290-character prefixes, interleaved: prefix order (the
    default) feeds the engine topic by topic, far from file order."""
    return make_crash_spool(spool_config, lambda i: f"topic {i % 7} " * 36 + f"line {i}")


def ckpt_size(spool):
    path = spool / "work" / "long.ckpt.jsonl"
    return path.stat().st_size if path.exists() else 0


def children(proc):
    return psutil.Process(proc.pid).children(recursive=True)


def command(p) -> str:
    """A process's name and command line; "" for one that has just exited (vLLM's
    short-lived helpers come and go while the tree is listed)."""
    try:
        return p.name() + " " + " ".join(p.cmdline())
    except psutil.Error:
        return ""


def engine_cores(proc):
    """vLLM's EngineCore processes under a daemon (inside its engine process)."""
    return [p for p in children(proc) if "EngineCore" in command(p)]


def engine_hosts(proc):
    """The daemon's engine process (python -m batchd.engine.host)."""
    return [p for p in children(proc) if "batchd.engine.host" in command(p)]


def engine_loads(daemon) -> int:
    return sum(e.get("event") == "engine_loaded" for e in daemon.logs())


def check_exactly_once(outbox):
    results = read_jsonl(outbox / "long.results.jsonl")
    errors = read_jsonl(outbox / "long.errors.jsonl")
    ids = [r["custom_id"] for r in results] + [e["custom_id"] for e in errors]
    assert len(ids) == N + 1
    # published in input order, although the engine got them in prefix order
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(N)]
    assert sorted(ids) == sorted([f"r{i}" for i in range(N)] + ["line-8"])
    assert [e["response"]["body"]["error"]["code"] for e in errors] == ["invalid_json_line"]
    return results


def test_kill9_then_double_sigterm_then_finish(shared_prefix_spool, daemons):
    """Three jobs at once through three daemons: kill -9 mid-generation; the next
    daemon ends the killed one's engine processes, resumes every job from its
    checkpoint and is stopped by SIGTERM (they checkpoint and say so) and a
    second SIGTERM while the engine shuts down (it exits at once, 128+15); a
    third runs --once to the end. Every line comes out exactly once, in input
    order."""
    config, spool = shared_prefix_spool
    outbox = spool / "outbox"
    sides = {f"side{k}": [{"custom_id": f"s{k}-{i}", "prompt": f"side {k} line {i}",
                           "max_tokens": 48, "ignore_eos": True} for i in range(150)]
             for k in (1, 2)}
    for job, lines in sides.items():
        drop(spool / "inbox", f"{job}.jsonl", lines)

    first = daemons(config)
    wait_for(lambda: ckpt_size(spool) > 20_000, 300, what="checkpoint to grow")
    engine_children = children(first.proc)
    in_flight = {job for job in sides if (spool / "work" / f"{job}.ckpt.jsonl").exists()
                 and final_state(outbox, job) is None}
    first.kill()  # kill -9 in the middle of generation
    assert final_state(outbox, "long") is None
    assert in_flight == set(sides)  # three jobs in flight at once
    killed_at = ckpt_size(spool)
    # The engine was fed in prefix order, one topic after another: what was
    # answered is scattered over the file, not its first lines.
    answered = []
    for raw in (spool / "work" / "long.ckpt.jsonl").read_text().splitlines():
        try:
            answered.append(json.loads(raw)["line"])
        except ValueError:
            break  # a record torn by the kill
    assert max(answered) > 3 * len(answered)

    second = daemons(config)
    # The new daemon ends the engine processes its killed predecessor left.
    _, alive = psutil.wait_procs(engine_children, timeout=60)
    assert alive == []
    wait_for(lambda: ckpt_size(spool) > killed_at + 20_000, 300, what="resumed progress")
    second_children = children(second.proc)
    second.proc.send_signal(signal.SIGTERM)
    # Two signals sent back to back may merge into one; the second goes once the
    # first has been acted on (the job checkpointed), while the engine shuts down.
    wait_for(lambda: read_status(outbox / "long.status.jsonl")[-1].get("phase") == "interrupted",
             60, interval=0.01, what="the first SIGTERM to be handled")
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(60) == 128 + signal.SIGTERM  # exited at once, not drained
    assert (spool / "work" / "long.jsonl").exists()
    status = read_jsonl(outbox / "long.status.jsonl")
    assert any("resumed from checkpoint" in s.get("message", "") for s in status)
    assert status[-1]["phase"] == "interrupted"

    third = daemons(config, args=("--once",))
    _, alive = psutil.wait_procs(second_children, timeout=60)
    assert alive == []  # the engine the hasty exit left behind was ended
    assert third.proc.wait(600) == 0, third.log.read_text()[-3000:]
    assert final_state(outbox, "long") == "completed"
    check_exactly_once(outbox)
    for job, lines in sides.items():
        assert final_state(outbox, job) == "completed"
        results = read_jsonl(outbox / f"{job}.results.jsonl")
        assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
        assert read_jsonl(outbox / f"{job}.errors.jsonl") == []
        bench = json.loads((outbox / f"{job}.bench.json").read_text())
        assert "long" in bench["concurrency"]["overlapped_jobs"]
    # nothing left in work/ but the (empty) folder the engine reads pictures from
    assert [p.name for p in (spool / "work").iterdir()
            if p.name != "media" or any(p.iterdir())] == []


def test_poison_job_fails_after_repeated_engine_deaths_and_the_queue_moves_on(
        crash_spool, daemons):
    """A job that kills the engine max_engine_failures (2) times is failed with
    engine_error lines for the rest, keeps its answers, and the next file runs.
    The first death is vLLM's engine core: the job goes on, on a fresh engine,
    from its checkpoint; the second is batchd's engine process. A bystander
    running beside it at the first death waits, then runs alone and completes."""
    config, spool = crash_spool
    outbox = spool / "outbox"
    bystander = [{"custom_id": f"b{i}", "prompt": f"bystander {i}", "max_tokens": 48,
                  "ignore_eos": True} for i in range(200)]
    drop(spool / "inbox", "bystander.jsonl", bystander)
    daemon = daemons(config)
    grown = 5_000
    for loads, find in ((1, engine_cores), (2, engine_hosts)):
        # the engine of this round loaded and answering: not the last one on its way out
        victims = wait_for(lambda grown=grown, loads=loads, find=find: (
            ckpt_size(spool) > grown and engine_loads(daemon) >= loads and find(daemon.proc)),
            300, what=f"progress on engine {loads} before a kill")
        for victim in victims:
            victim.kill()
        psutil.wait_procs(victims, timeout=30)
        # the survivor of the first death answers more lines (the wait above, next round)
        grown = ckpt_size(spool) + 5_000
    deaths = [e for e in daemon.logs() if e.get("event") == "engine_died"]
    assert [e["deaths"] for e in deaths] == [1, 2]
    assert deaths[0]["jobs"] == ["bystander", "long"] and deaths[1]["jobs"] == ["long"]
    drop(spool / "inbox", "after.jsonl", [{"prompt": "next file", "max_tokens": 3}])
    assert wait_for(lambda: final_state(outbox, "long"), 300, what="poison job end") == "failed"
    status = read_jsonl(outbox / "long.status.jsonl")[-1]
    assert status["errors"][0]["code"] == "engine_error"
    assert "died 2 times" in status["errors"][0]["message"]
    results = read_jsonl(outbox / "long.results.jsonl")
    errors = read_jsonl(outbox / "long.errors.jsonl")
    assert len(results) > 0
    assert len(results) + len(errors) == N + 1
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {
        "engine_error", "invalid_json_line"}
    assert wait_for(lambda: final_state(outbox, "after"), 300, what="next file") == "completed"
    assert wait_for(lambda: final_state(outbox, "bystander"), 300, what="bystander") == \
        "completed"
    results = read_jsonl(outbox / "bystander.results.jsonl")
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in bystander]
    phases = [s.get("phase") for s in read_jsonl(outbox / "bystander.status.jsonl")]
    assert "waiting_to_run_alone" in phases  # it stepped aside after the shared death
    assert daemon.stop() == 0
