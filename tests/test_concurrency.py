"""Many jobs at once on one engine, on the fake engine (the plumbing, exactly):
the shared window's fair share and its priority weights, jobs joining a running
session, a yield to another profile, cancel of one of several. The same events
on real vLLM are in test_vllm_concurrency.py."""

import json
from collections import Counter

from batchd.testing import FakeClock, FakeEngine
from batchd.jobs.share import weight
from conftest import drop, final_state, in_process, one_pass, outputs, prompts, read_jsonl, turns


def jobs(fed):
    """The job of every request the fake engines took, in order."""
    return [request.job for request in fed]



def daemon_for(settings, window=4):
    settings.watch.settle_seconds = 0  # every file is ready when first seen
    settings.engine.window = window
    fed: list = []
    d = in_process(settings, factory=lambda profile: FakeEngine(profile, per_step=2, fed=fed))
    return d, fed


def test_weights():
    assert [weight(p) for p in (0, 3, -1, -3)] == [1.0, 4.0, 0.5, 0.25]


def test_jobs_share_the_window_by_priority_and_each_answers_every_line(settings):
    """b (priority 3) is claimed first; bulk, a and c join it at the first check,
    within one refill of the window, which they share: b gets four requests for
    each one of the others'. Every line once, in input order."""
    d, fed = daemon_for(settings)
    drop(settings.inbox, "bulk.jsonl", prompts("bulk", 200))
    drop(settings.inbox, "a.jsonl", prompts("a", 40))
    (settings.inbox / "b.toml").write_text("priority = 3\n")
    drop(settings.inbox, "b.jsonl", prompts("b", 100))
    drop(settings.inbox, "c.jsonl", prompts("c", 40))
    assert one_pass(d, now=1.0)  # b first (priority), the others join it
    fed = jobs(fed)
    assert fed[0] == "b" and set(fed) == {"bulk", "a", "b", "c"}
    joined = max(fed.index(j) for j in ("a", "c", "bulk"))
    assert joined <= 4 + 3  # within one refill of the window (4)
    # while all four had requests to send: b four times each other's share
    share = Counter(fed[joined + 1:joined + 1 + 56])
    assert share["b"] == 4 * share["a"] == 4 * share["c"] == 4 * share["bulk"]
    for job, n in (("bulk", 200), ("a", 40), ("b", 100), ("c", 40)):
        assert final_state(settings.outbox, job) == "completed"
        results, errors = outputs(settings.outbox, job)
        assert [r["custom_id"] for r in results] == [f"{job}{i}" for i in range(n)]
        assert errors == []
    bench = json.loads((settings.outbox / "a.bench.json").read_text())
    assert bench["concurrency"]["overlapped_jobs"] == ["b", "bulk", "c"]
    engine = bench["concurrency"]["engine_tokens"]["completion"]
    assert engine > bench["tokens"]["completion"] > 0
    assert 0 < bench["concurrency"]["share_of_completion_tokens"] < 1
    # the status files overlap in time: a started generating before bulk ended
    a_gen = next(s["ts"] for s in read_jsonl(settings.outbox / "a.status.jsonl")
                 if s.get("phase") == "generating")
    assert a_gen < read_jsonl(settings.outbox / "bulk.status.jsonl")[-1]["ts"]


def test_running_jobs_are_capped(settings):
    settings.scheduling.max_running_jobs = 2
    d, fed = daemon_for(settings)
    for name in ("a", "b", "c"):
        drop(settings.inbox, f"{name}.jsonl", prompts(name, 30))
    assert one_pass(d, now=1.0)
    fed = jobs(fed)
    last = {j: len(fed) - 1 - fed[::-1].index(j) for j in "ab"}
    assert fed.index("b") < last["a"]  # a and b ran at once ...
    assert fed.index("c") > min(last.values())  # ... c only once one of them had left
    assert all(final_state(settings.outbox, j) == "completed" for j in "abc")


def slow_daemon(settings, max_wait=600.0):
    """An in-process daemon whose fake engine takes 10 ms a step, on a
    FakeClock (its own clock): drive it with conftest.turns."""
    settings.watch.settle_seconds = 0
    settings.engine.window = 4
    settings.scheduling.max_wait_seconds = max_wait
    fed: list = []
    clock = FakeClock()
    d = in_process(settings, factory=lambda p: FakeEngine(p, step_seconds=0.01, per_step=2,
                                                      sleep=clock.sleep, fed=fed), clock=clock)
    return d, clock, fed


def phases(outbox, job):
    return [s.get("phase") for s in read_jsonl(outbox / f"{job}.status.jsonl")]


def test_cancel_one_of_several(settings):
    d, clock, fed = slow_daemon(settings)
    outbox = settings.outbox
    drop(settings.inbox, "keep.jsonl", prompts("keep", 200))
    drop(settings.inbox, "doomed.jsonl", prompts("doomed", 200))
    turns(d, clock, lambda: jobs(fed).count("doomed") > 10)
    (settings.inbox / "doomed.cancel").touch()
    turns(d, clock, lambda: final_state(outbox, "keep"))
    assert final_state(outbox, "doomed") == "cancelled"
    assert final_state(outbox, "keep") == "completed"
    results, errors = outputs(outbox, "keep")
    assert [r["custom_id"] for r in results] == [f"keep{i}" for i in range(200)]
    assert errors == []
    results, errors = outputs(outbox, "doomed")
    assert 0 < len(results) < 200 and len(results) + len(errors) == 200
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"cancelled"}
    ids = sorted(r["custom_id"] for r in results + errors)
    assert ids == sorted(f"doomed{i}" for i in range(200))


def test_an_overdue_file_of_another_profile_makes_the_running_jobs_yield(settings):
    """A file for 'other' waits 0.3 s (max_wait_seconds) during a long tiny job:
    the job yields, 'other' runs, then the job resumes from its checkpoint."""
    d, clock, fed = slow_daemon(settings, max_wait=0.3)
    outbox = settings.outbox
    drop(settings.inbox, "bulk.jsonl", prompts("bulk", 300))
    turns(d, clock, lambda: jobs(fed).count("bulk") > 10)
    drop(settings.inbox, "other__x.jsonl", prompts("x", 3))
    turns(d, clock, lambda: final_state(outbox, "bulk"))
    assert final_state(outbox, "other__x") == "completed"
    assert "yielded" in phases(outbox, "bulk")
    x_done = read_jsonl(outbox / "other__x.status.jsonl")[-1]["ts"]
    assert x_done < read_jsonl(outbox / "bulk.status.jsonl")[-1]["ts"]
    results, errors = outputs(outbox, "bulk")
    assert [r["custom_id"] for r in results] == [f"bulk{i}" for i in range(300)]
    assert errors == []
    assert jobs(fed).count("bulk") <= 300 + 4  # resumed, not restarted
    bench = json.loads((outbox / "bulk.bench.json").read_text())
    assert bench["timing_s"]["model_load"] >= 0 and bench["requests"]["succeeded"] == 300


def test_sidecar_priority_reaches_vllm_only_where_the_profile_schedules_by_priority(
        settings, tmp_path):
    """On a profile with scheduling_policy = "priority" a job's sidecar priority
    goes with each request as vLLM's priority (negated: vLLM runs lower first);
    a line's own priority field is left as it is and wins; elsewhere nothing is
    added (vLLM would refuse a non-zero priority there)."""
    tiny = tmp_path / "profiles" / "tiny.toml"
    tiny.write_text(tiny.read_text().replace("[engine]\n",
                                             '[engine]\nscheduling_policy = "priority"\n'))
    seen = {}

    class Sampling(FakeEngine):
        def stream(self, requests, sampling, window):
            def record():
                for request in requests:
                    if request is not None:
                        seen[request.custom_id] = (request.sampling, request.body)
                    yield request
            return super().stream(record(), sampling, window)

    d = in_process(settings, settle=0, factory=Sampling)
    (settings.inbox / "urgent.toml").write_text("priority = 7\n[sampling]\nmax_tokens = 3\n")
    drop(settings.inbox, "urgent.jsonl", [{"custom_id": "u", "prompt": "x"},
                                          {"custom_id": "own", "prompt": "x", "priority": 2}])
    drop(settings.inbox, "plain.jsonl", [{"custom_id": "p", "prompt": "x"}])
    (settings.inbox / "other__o.toml").write_text("priority = 7\n")
    drop(settings.inbox, "other__o.jsonl", [{"custom_id": "o", "prompt": "x"}])
    while one_pass(d, now=1.0):
        pass
    assert seen["u"][0] == {"max_tokens": 3, "priority": -7}
    assert seen["own"][0]["priority"] == -7 and seen["own"][1]["priority"] == 2  # the line's wins
    assert "priority" not in seen["p"][0]  # priority 0: vLLM's default
    assert "priority" not in seen["o"][0]  # 'other' does not schedule by priority


def test_a_file_that_kills_the_engine_fails_alone(settings):
    """The engine dies while two jobs share it: both count the death, then they
    run one at a time; the poison file dies again alone and fails; the other
    completes every line."""
    from batchd.engine import EngineDead

    class Poisoned(FakeEngine):
        def stream(self, requests, sampling, window):
            for answers in super().stream(requests, sampling, window):
                if any("poison" in str(a.request.body) for a in answers):
                    raise EngineDead("killed by a poison line")
                yield answers

    settings.watch.settle_seconds = 0
    settings.engine.window = 4
    settings.engine.restart_backoff_seconds = 0
    d = in_process(settings, factory=lambda p: Poisoned(p, per_step=2))
    drop(settings.inbox, "bad.jsonl", prompts("bad", 10) + [{"custom_id": "p", "prompt": "poison"}]
         + prompts("late", 10))
    drop(settings.inbox, "good.jsonl", prompts("good", 30))
    while one_pass(d, now=1.0):
        pass
    assert final_state(settings.outbox, "good") == "completed"
    results, errors = outputs(settings.outbox, "good")
    assert len(results) == 30 and errors == []
    assert final_state(settings.outbox, "bad") == "failed"
    results, errors = outputs(settings.outbox, "bad")
    assert len(results) + len(errors) == 21
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"engine_error"}
    phases = [s.get("phase") for s in read_jsonl(settings.outbox / "good.status.jsonl")]
    assert "waiting_to_run_alone" in phases or "waiting_to_run_alone" in [
        s.get("phase") for s in read_jsonl(settings.outbox / "bad.status.jsonl")]


def test_a_claimed_file_that_routes_elsewhere_waits_for_its_model(settings):
    """Its first line names no model (so it looked like the loaded profile's), its
    others name 'other': claimed beside tiny's job, it waits, then runs on other."""
    d, _ = daemon_for(settings)
    drop(settings.inbox, "a.jsonl", prompts("a", 40))
    drop(settings.inbox, "sneaky.jsonl", [{"custom_id": "s0", "prompt": "x"},
                                          {"custom_id": "s1", "model": "other", "prompt": "y"}])
    while one_pass(d, now=1.0):
        pass
    assert final_state(settings.outbox, "a") == "completed"
    assert final_state(settings.outbox, "sneaky") == "completed"
    results, _ = outputs(settings.outbox, "sneaky")
    assert {r["response"]["body"]["model"] for r in results} == {"org/other-model"}
    assert "waiting_for_model" in phases(settings.outbox, "sneaky")


def test_turns_make_progress_when_loads_outlast_max_wait(settings):
    """Loads of 0.3 s, max_wait 0.2 s: the jobs made to wait are overdue before
    the next engine is even loaded. Each session still runs max_wait before it
    makes way, so both profiles' files finish; without that floor each turn ran
    one engine step (2 lines) and the swapping went on for minutes. The loads
    and steps take their time on a FakeClock, so this holds at any speed."""
    settings.watch.settle_seconds = 0
    settings.engine.window = 4
    settings.scheduling.max_wait_seconds = 0.2
    fed: list = []
    clock = FakeClock()
    loads = []

    def slow_load(profile):
        loads.append(profile.name)
        clock.sleep(0.3)
        return FakeEngine(profile, step_seconds=0.01, per_step=2, sleep=clock.sleep, fed=fed)

    d = in_process(settings, factory=slow_load, clock=clock)
    outbox = settings.outbox
    drop(settings.inbox, "bulk.jsonl", prompts("bulk", 400))
    turns(d, clock, lambda: jobs(fed).count("bulk") > 10)
    drop(settings.inbox, "other__x.jsonl", prompts("x", 30))
    turns(d, clock, lambda: final_state(outbox, "bulk") and final_state(outbox, "other__x"))
    assert final_state(outbox, "bulk") == final_state(outbox, "other__x") == "completed"
    assert len(outputs(outbox, "bulk")[0]) == 400 and len(outputs(outbox, "other__x")[0]) == 30
    assert loads == ["tiny", "other", "tiny"]  # one turn each way, not a swap per step


def test_the_eta_follows_the_recent_pace_not_the_slow_start():
    """Answers come in waves: none for the first 90 s (the first batch generating),
    then 79 at once, then steadily. The time left comes from the last 30 s."""
    from batchd.jobs.share import Running

    r = Running(job=None, level=0.0)  # type: ignore[arg-type]
    assert r.recent_rate(0.0, 0) is None  # one look: no pace yet
    for t in range(2, 90, 2):
        assert r.recent_rate(float(t), 0) == 0.0
    rate = r.recent_rate(90.0, 79)
    assert rate is not None and 79 / 32 <= rate <= 79 / 30  # not 79 / 90
    assert 321 / rate < 130  # the time left: ~2 minutes, as it then took (not 445 s)
