"""Engine replicas on the fake engine (the dealing, exactly): families kept on
one replica, balance, a dead replica's requests dealt again and answered once,
a set that gives up only when every replica has. Real vLLM replicas are in
test_vllm_replicas.py."""

import pytest
from conftest import wait_for

from batchd.engine import EngineDead, Unplaced
from batchd.engine.places import cpu_slices
from batchd.engine.dealing import family
from batchd.engine.replicas import GROW_SECONDS, ReplicaSet
from batchd.lines import CHAT, Request
from batchd.profiles import Profile
from batchd.testing import FakeEngine

PROFILE = Profile(model="m", name="p")


class Replica(FakeEngine):
    """A fake engine that remembers which replica answered what, and dies
    (EngineDead) after DIE_AFTER answers of its life."""

    def __init__(self, profile, index, answered_by, die_after=None):
        super().__init__(profile, step_seconds=0.002, per_step=2)
        self.index, self.answered_by, self.die_after = index, answered_by, die_after

    def stream(self, requests, sampling, window):
        for answers in super().stream(requests, sampling, window):
            for answer in answers:
                if self.die_after is not None and self.answered >= self.die_after:
                    raise EngineDead(f"replica {self.index} killed")
                self.answered_by.setdefault(answer.request.key, []).append(self.index)
            yield answers


def chat(i, system):
    return Request(i, f"r{i}", CHAT, {"messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": f"q{i}"}]})


def run(replicas, requests, window=8):
    answers = [a for batch in replicas.stream(iter(requests), {}, window) for a in batch]
    replicas.close()
    return answers


def make(count=2, die=None, backoff=0.0, max_failures=2):
    answered_by: dict = {}
    deaths = dict(die or {})

    def load(profile, index):
        return Replica(profile, index, answered_by, deaths.pop(index, None))

    replicas = ReplicaSet(PROFILE, count, load, lambda i: f"test cpu {i}",
                          restart_backoff=backoff, max_failures=max_failures)
    return replicas, answered_by


def deal_all(replicas, requests, per):
    """Deal REQUESTS as the stream does, on this thread: top up the windows,
    then each replica answers everything it holds, until all are dealt.
    Which replica got each request (by line), in dealing order."""
    source, ahead, exhausted, got = iter(requests), [], False, {}
    while not exhausted or ahead:
        exhausted = replicas.dealer.deal(source, ahead, exhausted, per, replicas.live())
        for replica in replicas.replicas:
            for request in replica.queue:
                got[request.line] = replica.index
            replica.queue.clear()  # answered
    return got


def test_families_stay_on_one_replica_and_the_work_is_shared():
    """Forty families of six, in prefix order, on two replicas of window 16: a
    family goes where its first request went, a new one to the replica with
    the least outstanding work."""
    heads = [f"Rubric {g}: " + "grade fairly. " * 30 for g in range(40)]
    requests = [chat(g * 6 + q, heads[g]) for g in range(40) for q in range(6)]
    replicas, _ = make()
    got = deal_all(replicas, requests, 16)
    homes: dict = {}
    for request in requests:
        homes.setdefault(family(request), set()).add(got[request.line])
    # cut only where a replica would have fallen below its batch (0.8 of its window)
    assert len(homes) == 40 and sum(len(h) == 1 for h in homes.values()) >= 30
    assert min(list(got.values()).count(i) for i in (0, 1)) >= 110
    replicas.close()


def test_a_family_is_cut_only_when_another_replica_would_starve():
    """Below 0.8 of its window (the auto window is vLLM's batch and a quarter
    more: below that its batch is not full) a replica takes from a family whose
    home is full; above it, the family waits for its home."""
    one = [chat(i, "one long shared rubric " * 20) for i in range(100)]
    replicas, _ = make()
    a, b = replicas.replicas
    source, ahead = iter(one), []
    # the family fills its home, then the other
    replicas.dealer.deal(source, ahead, False, 20, replicas.live())
    assert [len(a.queue), len(b.queue)] == [20, 20]
    for _ in range(4):
        a.queue.pop()  # a answered four: its batch is still full, its home (b) is full
    replicas.dealer.deal(source, ahead, False, 20, replicas.live())
    assert [len(a.queue), len(b.queue)] == [16, 20]
    a.queue.pop()  # below 0.8: the family is cut to it
    replicas.dealer.deal(source, ahead, False, 20, replicas.live())
    assert [len(a.queue), len(b.queue)] == [20, 20]
    replicas.close()


def test_lines_sharing_nothing_are_balanced():
    requests = [chat(i, f"unique system prompt number {i}") for i in range(300)]
    replicas, _ = make(count=3)
    got = deal_all(replicas, requests, 4)
    assert [list(got.values()).count(i) for i in range(3)] == [100, 100, 100]
    replicas.close()


def test_every_request_is_answered_once_by_running_replicas():
    requests = [chat(i, f"prompt {i % 9}") for i in range(300)]
    replicas, answered_by = make()
    answers = run(replicas, requests, window=16)
    assert sorted(a.request.line for a in answers) == list(range(300))
    assert all(len(by) == 1 for by in answered_by.values())
    assert sum(line["requests"] for line in replicas.replica_lines()) == 300


def test_a_dead_replica_loses_only_its_in_flight_requests():
    """Replica 1 dies after 30 answers: what it held is dealt again, every
    request is answered exactly once, and it is loaded again (backoff 0)."""
    import structlog
    requests = [chat(i, f"prompt {i % 7}") for i in range(400)]
    replicas, answered_by = make(die={1: 30})
    with structlog.testing.capture_logs() as logs:
        answers = run(replicas, requests)
    assert sorted(a.request.line for a in answers) == list(range(400))
    assert all(len(by) == 1 for by in answered_by.values())
    died = [e for e in logs if e["event"] == "replica_died"]
    assert [(e["replica"], e["state"]) for e in died] == [(1, "dead")]


def test_a_dead_replicas_requests_go_first_to_the_others_and_it_loads_again_later():
    now = [100.0]
    replicas = ReplicaSet(PROFILE, 2, lambda p, i: FakeEngine(p), lambda i: f"cpu {i}",
                          restart_backoff=2.0, clock=lambda: now[0])
    a, b = replicas.replicas
    requests = [chat(i, f"family {i % 2}") for i in range(8)]
    source, ahead = iter(requests), []
    replicas.dealer.deal(source, ahead, False, 4, replicas.live())
    b.sent = {r.key: r for r in list(b.queue)[:2]}  # two taken by its engine, two queued
    held = list(b.sent.values()) + list(b.queue)[2:]
    b.queue = type(b.queue)(list(b.queue)[2:])
    replicas._died(b, EngineDead("killed"))
    assert b.state == "dead" and b.restart_at == 102.0 and b.engine is None
    assert list(replicas.dealer.redo) == held  # dealt again before anything new
    a.queue.clear()
    replicas.dealer.deal(source, ahead, False, 4, replicas.live())
    assert list(a.queue) == held and not replicas.dealer.redo
    now[0] = 102.0  # between streams, the daemon's once-a-second look loads it again
    replicas.replica_lines()
    assert b.state == "loading"
    wait_for(lambda: replicas.replica_lines()[1]["state"] == "ready", 10, what="b loaded")
    replicas._died(b, EngineDead("killed again"))  # the second death of two allowed
    assert b.state == "gone"
    replicas.close()


def test_a_replica_no_node_has_room_for_waits_without_dying():
    """On Ray: a replica whose node was lost and that no other node has room for
    is placed again later, however often, and never counts as a death; its
    place is named once it is loaded ("where" of the engine)."""
    now = [100.0]
    placed = iter([Unplaced("no room"), Unplaced("no room"), None])

    def load(profile, index):
        if index == 1:
            refusal = next(placed)
            if refusal is not None:
                raise refusal
        engine = FakeEngine(profile)
        engine.where = f"node{index}"
        return engine

    replicas = ReplicaSet(PROFILE, 2, load, lambda i: "ray (placing)",
                          restart_backoff=2.0, max_failures=1, clock=lambda: now[0])
    a, b = replicas.replicas
    assert a.state == "ready" and a.where == "node0"
    assert b.state == "unplaced" and b.deaths == 0 and b.where == "ray (placing)"
    for _ in range(2):
        now[0] += 2.0
        replicas.replica_lines()  # tried again: refused once more, then placed
        wait_for(lambda: replicas.replica_lines()[1]["state"] != "loading", 10, what="b tried")
    assert b.state == "ready" and b.deaths == 0 and b.where == "node1"
    replicas.close()


def test_an_auto_set_grows_when_the_cluster_has_room_for_more():
    now, holds = [100.0], [2]

    def load(profile, index):
        engine = FakeEngine(profile)
        engine.max_num_seqs = 4  # vLLM's batch of each
        return engine

    replicas = ReplicaSet(PROFILE, 2, load, lambda i: f"node {i}",
                          clock=lambda: now[0], wanted=lambda: holds[0])
    assert replicas.max_num_seqs == 8
    holds[0] = 3  # a node joined
    replicas.replica_lines()
    assert len(replicas.replicas) == 2  # asked at most every GROW_SECONDS
    now[0] += GROW_SECONDS
    wait_for(lambda: [r["state"] for r in replicas.replica_lines()] == ["ready"] * 3, 10,
             what="a third replica")
    assert replicas.max_num_seqs == 12
    answers = run(replicas, [chat(i, f"p{i % 6}") for i in range(60)])
    assert sorted(a.request.line for a in answers) == list(range(60))


class Poisoned(FakeEngine):
    """An engine that dies as soon as it takes line 7."""

    def stream(self, requests, sampling, window):
        def watch():
            for request in requests:
                if request is not None and request.line == 7:
                    raise EngineDead("line 7 killed the engine")
                yield request
        return super().stream(watch(), sampling, window)


def test_a_request_in_flight_at_every_death_goes_to_the_session_not_round_every_replica():
    """Line 7 kills each replica it reaches: at the second death it was in
    flight at, the set dies (the session isolates the jobs it had), instead of
    reloading every replica max_engine_failures times first."""
    replicas = ReplicaSet(PROFILE, 3, lambda p, i: Poisoned(p), lambda i: f"cpu {i}",
                          restart_backoff=60.0, max_failures=2)
    with pytest.raises(EngineDead, match="in flight at 2 deaths"):
        run(replicas, [chat(i, f"p{i}") for i in range(40)], window=3)
    assert sorted(r.deaths for r in replicas.replicas) == [0, 1, 1]


def test_the_set_dies_only_when_every_replica_has_given_up():
    requests = [chat(i, "same") for i in range(200)]
    replicas, _ = make(die={0: 5, 1: 5}, max_failures=1)
    with pytest.raises(EngineDead, match="every replica"):
        run(replicas, requests)


def test_closing_the_stream_stops_every_replica():
    requests = [chat(i, f"p{i % 3}") for i in range(100_000)]
    replicas, answered_by = make()
    stream = replicas.stream(iter(requests), {}, 8)
    got = 0
    for batch in stream:
        got += len(batch)
        if got >= 50:
            break
    stream.close()
    assert all(r.thread is None for r in replicas.replicas)
    assert len(answered_by) < 1000
    replicas.close()


def test_replicas_places_on_a_host_without_gpus(monkeypatch):
    from batchd.engine.places import core_range, replica_places
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert replica_places(PROFILE, "auto")[0] == 1  # one replica without GPUs
    count, places = replica_places(PROFILE, 2)
    assert count == 2 and [env for _, env in places] == [
        {"BATCHD_ENGINE_CPUS": "0,1"}, {"BATCHD_ENGINE_CPUS": "2,3"}]
    assert places[0][0].endswith(" cores 0-1") and core_range([0, 2, 5]) == "0,2,5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    tp2 = Profile(model="m", name="p", engine={"tensor_parallel_size": 2})
    count, places = replica_places(tp2, "auto")
    assert count == 2 and [env for _, env in places] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert places[1][0].endswith(" GPU2,3")


def test_each_replica_in_the_metrics_textfile(tmp_path):
    from batchd.metrics import Metrics

    metrics = Metrics(tmp_path / "batchd.prom")
    replicas = ReplicaSet(PROFILE, 2, lambda p, i: FakeEngine(p), lambda i: f"host cores {i}")
    run(replicas, [chat(i, f"p{i % 4}") for i in range(40)])
    lines = replicas.replica_lines()
    metrics.replicas(lines)
    text = (tmp_path / "batchd.prom").read_text()
    for line in lines:
        labels = f'replica="{line["replica"]}",where="{line["where"]}"'
        assert f"batchd_replica_requests{{{labels}}} {float(line['requests'])}" in text
        assert f"batchd_replica_up{{{labels}}} 0.0" in text  # closed: given up by now
    assert sum(line["requests"] for line in lines) == 40


def test_cpu_slices():
    assert cpu_slices(2, [0, 1]) == [[0], [1]]
    assert cpu_slices(2, range(5)) == [[0, 1, 2], [3, 4]]
    assert cpu_slices(3, [4]) == [[4], [4], [4]]


def test_the_dashboard_lists_each_live_daemons_replicas(tmp_path):
    from fastapi.testclient import TestClient

    from batchd.api.app import create_app
    from batchd.config import Settings, SpoolConfig
    from batchd.spool import inbox
    from batchd.spool.daemons import Registry

    settings = Settings(spool=SpoolConfig(root=tmp_path / "spool"))
    inbox.ensure_dirs(settings)
    replicas = ReplicaSet(PROFILE, 2, lambda p, i: FakeEngine(p), lambda i: f"host cores {i}")
    run(replicas, [chat(i, f"p{i % 4}") for i in range(10)])
    registry = Registry(settings.layout, 60.0)
    registry.beat(100.0, "p", [], 8, replicas.replica_lines())
    shown = TestClient(create_app(settings)).get("/dashboard/replicas").json()
    assert [(r["daemon"], r["replica"], r["where"]) for r in shown] == [
        (registry.me, 0, "host cores 0"), (registry.me, 1, "host cores 1")]
    assert sum(r["requests"] for r in shown) == 10
    page = TestClient(create_app(settings)).get("/").text
    assert 'id="replicas"' in page and "/dashboard/replicas" in page
