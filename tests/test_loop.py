"""The loop on the fake engine: loads cut short by an engine death, a load that
fails by itself, cancels of waiting jobs, and what a turn claims. The same
load failures on real vLLM are in test_vllm_loads.py."""

import os
import signal

from batchd.engine import EngineDead
from batchd.engine.hosted import reap_engines
from batchd.layout import Phase
from batchd.testing import FakeEngine

from conftest import drop, final_state, in_process, one_pass, outputs, prompts, read_jsonl



def phases(outbox, job):
    return [s.get("phase") for s in read_jsonl(outbox / f"{job}.status.jsonl")]


def flaky(deaths):
    """A factory whose first DEATHS loads die (as a killed engine process does),
    the next one loads."""
    calls = []

    def factory(profile):
        calls.append(profile.name)
        if len(calls) <= deaths:
            raise EngineDead(f"engine process for {profile.name} died while loading")
        return FakeEngine(profile)

    return factory, calls


def run_until_idle(d, clock):
    for _ in range(10_000):
        if not d.run_once(now=clock[0]) and d.session is None:
            return
        clock[0] += 1.0  # past any backoff
    raise AssertionError("the daemon never went idle")


def test_a_load_killed_below_the_limit_waits_and_loads_again(settings):
    settings.watch.settle_seconds = 0
    settings.engine.max_engine_failures = 2
    factory, calls = flaky(1)
    clock = [0.0]
    d = in_process(settings, factory=factory, clock=lambda: clock[0])
    drop(settings.inbox, "a.jsonl", prompts("a", 30))
    assert d.run_once(now=0.0)  # claimed, and its load died
    assert phases(settings.outbox, "a")[-1] == Phase.ENGINE_DIED
    assert not d.run_once(now=0.5)  # the backoff (2 s): no load yet
    assert calls == ["tiny"]
    run_until_idle(d, clock)
    assert calls == ["tiny", "tiny"]
    assert final_state(settings.outbox, "a") == "completed"
    results, errors = outputs(settings.outbox, "a")
    assert len(results) == 30 and errors == []
    seen = phases(settings.outbox, "a")
    assert seen.index("engine_died") < seen.index("generating")


def test_an_engine_no_ray_node_has_room_for_waits_without_counting_deaths(settings):
    """On Ray, a load no node had room for (Unplaced) is tried again later,
    however often, and never fails a job (max_engine_failures = 1 here)."""
    from batchd.engine import Unplaced

    settings.watch.settle_seconds = 0
    settings.engine.max_engine_failures = 1
    calls = []

    def factory(profile):
        calls.append(profile.name)
        if len(calls) <= 3:
            raise Unplaced("no node of the Ray cluster had room for a replica")
        return FakeEngine(profile)

    clock = [0.0]
    d = in_process(settings, factory=factory, clock=lambda: clock[0])
    drop(settings.inbox, "a.jsonl", prompts("a", 10))
    run_until_idle(d, clock)
    assert calls == ["tiny"] * 4
    assert final_state(settings.outbox, "a") == "completed"
    assert "engine_died" not in phases(settings.outbox, "a")


def test_loads_killed_max_engine_failures_times_fail_the_job_naming_the_deaths(settings):
    settings.watch.settle_seconds = 0
    settings.engine.max_engine_failures = 2
    settings.engine.restart_backoff_seconds = 0
    factory, calls = flaky(2)
    d = in_process(settings, factory=factory)
    drop(settings.inbox, "a.jsonl", prompts("a", 5))
    drop(settings.inbox, "b.jsonl", prompts("b", 5))
    clock = [0.0]
    run_until_idle(d, clock)
    assert final_state(settings.outbox, "a") == "failed"
    last = read_jsonl(settings.outbox / "a.status.jsonl")[-1]
    assert "died 2 times loading the model" in last["errors"][0]["message"]
    _, errors = outputs(settings.outbox, "a")
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"engine_error"}
    assert final_state(settings.outbox, "b") == "completed"  # the third load worked


def test_a_load_that_fails_by_itself_fails_its_job_at_once_and_the_next_file_runs(settings):
    settings.watch.settle_seconds = 0
    (settings.routing.profiles_dir / "bad.toml").write_text('model = "org/bad"\n')

    def factory(profile):
        if profile.name == "bad":
            raise RuntimeError("ValueError: Model architectures ['Nope'] are not supported")
        return FakeEngine(profile)

    d = in_process(settings, factory=factory)
    drop(settings.inbox, "bad__x.jsonl", prompts("x", 3))
    assert one_pass(d, now=0.0)
    assert final_state(settings.outbox, "bad__x") == "failed"
    last = read_jsonl(settings.outbox / "bad__x.status.jsonl")[-1]
    assert "model failed to load" in last["errors"][0]["message"]
    assert "Nope" in last["errors"][0]["message"]
    drop(settings.inbox, "next.jsonl", prompts("n", 3))
    assert one_pass(d, now=1.0)
    assert final_state(settings.outbox, "next") == "completed"


def test_a_waiting_job_is_cancelled_without_waiting_for_its_turn(settings):
    """A job held for another profile's model ends when its cancel marker lands."""
    d = in_process(settings, settle=0,
                   factory=lambda p: FakeEngine(p, step_seconds=0.01, per_step=2))
    drop(settings.inbox, "long.jsonl", prompts("long", 400))
    assert d.run_once(now=0.0)  # long's session starts
    drop(settings.inbox, "sneaky.jsonl", [{"custom_id": "s0", "prompt": "x"},
                                          {"custom_id": "s1", "model": "other", "prompt": "y"}])
    for _ in range(50):
        d.run_once(now=0.0)
        if "sneaky" in d.admission.held:
            break
    assert "sneaky" in d.admission.held and d.session is not None
    (settings.inbox / "sneaky.cancel").touch()
    d.run_once(now=0.0)
    assert final_state(settings.outbox, "sneaky") == "cancelled"
    assert final_state(settings.outbox, "long") is None  # still running
    _, errors = outputs(settings.outbox, "sneaky")
    assert {e["response"]["body"]["error"]["code"] for e in errors} <= {"cancelled"}


def test_the_idle_reaper_spares_its_own_engine(settings):
    """A daemon's own engine record is reaped only at its start (a dead
    predecessor with its pid); later it is its warm engine."""
    settings.layout.work.mkdir(parents=True, exist_ok=True)
    import socket
    record = settings.layout.engine_pidfile(socket.gethostname(), os.getpid())
    child = os.fork()
    if child == 0:  # a stand-in for an engine process: sleeps until killed
        signal.pause()  # no handler for SIGKILL: it ends here
        os._exit(0)
    try:
        import psutil
        record.write_text(f"{child} {psutil.Process(child).create_time()}\n")
        reap_engines(settings, starting=False)
        assert psutil.pid_exists(child) and record.exists()
        reap_engines(settings)  # at start: a record under our pid is a predecessor's
        assert not record.exists()
        os.waitpid(child, 0)
    finally:
        try:
            os.kill(child, 9)
            os.waitpid(child, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_job_that_joins_has_its_first_requests_sent_next(settings):
    """On the auto window a job that joins a running stream gets its first
    requests (up to 1/32 of vLLM's batch) sent before any more of the bulk's."""
    taken: list = []  # every request the fake engine took, in order

    def fed():
        return [request.job for request in taken]

    d = in_process(settings, settle=0, factory=lambda p: FakeEngine(p, per_step=4, fed=taken))
    drop(settings.inbox, "bulk.jsonl", prompts("bulk", 2000))
    for _ in range(5):
        d.run_once(now=0.0)
    assert fed() and set(fed()) == {"bulk"}
    drop(settings.inbox, "small.jsonl", prompts("small", 5))
    while final_state(settings.outbox, "small") is None:
        d.run_once(now=0.0)
    first = fed().index("small")
    assert fed()[first:first + 5] == ["small"] * 5
    assert final_state(settings.outbox, "bulk") is None  # it ran beside the bulk
