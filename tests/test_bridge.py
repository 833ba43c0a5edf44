"""The bridge from the runner's synchronous stream() to an async serving layer,
with a fake serving object in place of vLLM's (the real one runs in
test_fidelity.py and the daemon tests)."""

from __future__ import annotations

import asyncio
import random

import pytest
from conftest import wait_for

from batchd.engine import EngineDead
from batchd.lines import CHAT, LineError, Request
from batchd.profiles import Profile
from batchd.engine.vllm_engine import VllmEngine


class FakeServing:
    def __init__(self, fail_at: int | None = None):
        self.running = 0
        self.peak = 0
        self.started: list[int] = []
        self.cancelled = 0
        self.dead = False
        self.client = None
        self.fail_at = fail_at

    async def answer(self, request, sampling):
        self.started.append(request.line)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(random.uniform(0, 0.003))
            if request.line == self.fail_at:
                self.dead = True
                return None, LineError(request.line, request.custom_id, "engine_error",
                                       "engine core gone", None, 500, "server_error")
            if request.line % 7 == 0:
                return None, LineError(request.line, request.custom_id, "invalid_request",
                                       "bad", "x")
            return {"line": request.line, **sampling}, None
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    async def close(self):
        pass


def requests(n):
    return [Request(i, f"r{i}", CHAT, {"messages": []}) for i in range(1, n + 1)]


@pytest.fixture
def engine():
    made = []

    def make(serving):
        made.append(VllmEngine(Profile(model="m", name="p"), None, serving=serving))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.mark.parametrize("window", [1, 3, 64])
def test_every_request_answered_once_within_the_window(engine, window):
    serving = FakeServing()
    answers = [a for batch in engine(serving).stream(requests(500), {"seed": 1}, window)
               for a in batch]
    assert sorted(a.request.line for a in answers) == list(range(1, 501))
    assert serving.peak <= window
    errors = {a.request.line for a in answers if a.error is not None}
    assert errors == {i for i in range(1, 501) if i % 7 == 0}
    assert all(a.body == {"line": a.request.line, "seed": 1} for a in answers if a.body)


class Unanswered(FakeServing):
    """Answers the first ANSWERED requests; the others run until cancelled."""

    def __init__(self, answered: int):
        super().__init__()
        self.answered = answered

    async def answer(self, request, sampling):
        if request.line <= self.answered:
            return await super().answer(request, sampling)
        self.started.append(request.line)
        self.running += 1
        try:
            await asyncio.Event().wait()  # never set: in flight until the stream closes
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


def test_closing_the_stream_cancels_what_is_in_flight(engine):
    """The first 100 answered; what is in flight when the stream closes (the
    requests after them, still running however slow the machine) is
    cancelled, and the rest never reach the serving layer."""
    serving = Unanswered(100)
    e = engine(serving)
    stream = e.stream(requests(1000), {}, 50)
    got = 0
    for batch in stream:  # an empty batch when nothing came for a moment
        got += len(batch)
        if got >= 100 and serving.running:
            break
    stream.close()
    # The cancellations run on the engine's loop: wait for them, not for a fixed time.
    wait_for(lambda: serving.running == 0, 30, 0.005, what="in-flight requests cancelled")
    assert got == 100 and serving.cancelled == len(serving.started) - 100 > 0
    assert len(serving.started) <= 150  # the rest never reached the serving layer


def test_a_server_error_from_a_dead_engine_is_engine_death_not_a_line_error(engine):
    serving = FakeServing(fail_at=40)
    seen = []
    with pytest.raises(EngineDead):
        for batch in engine(serving).stream(requests(200), {}, 16):
            seen += [a.request.line for a in batch]
    assert 40 not in seen


class FullBatch(FakeServing):
    """A vLLM whose batch (max_num_seqs) is 4 and full: requests run until told,
    a cancelled one answers as vLLM's server does ("Client disconnected")."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace
        self.client = SimpleNamespace(vllm_config=SimpleNamespace(
            scheduler_config=SimpleNamespace(max_num_seqs=4)))
        self.release = asyncio.Event()

    async def answer(self, request, sampling):
        self.started.append(request.line)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            return None, LineError(request.line, request.custom_id, "internal_error",
                                   "Client disconnected", None, 500, "server_error")
        return {"line": request.line}, None


def test_a_joining_job_takes_running_slots_and_nothing_is_answered_twice(engine):
    """With vLLM's batch full, refill(2): the next two requests (a joining job's)
    go in at once; the last admitted make way, run again after them, and every
    request is answered exactly once (a cancelled one's 'Client disconnected' is
    dropped, never an answer)."""
    serving = FullBatch()
    e = engine(serving)
    bulk = requests(6)  # window 6: four running, two waiting
    joiner = [Request(i, f"j{i}", CHAT, {"messages": []}, job="j") for i in (1, 2)]
    source_items: list = list(bulk)

    def source():
        while True:
            if source_items:
                yield source_items.pop(0)
            else:
                yield None

    stream = e.stream(source(), {}, 6)
    assert next(stream) == []
    wait_for(lambda: len(serving.started) == 6, 10, what="the first six in")
    source_items[:0] = joiner + requests(8)[6:]  # the joiner's two, then more bulk
    e.refill(2)
    next(stream)
    wait_for(lambda: serving.cancelled == 4, 10, what="two waiting and two running made way")
    started = serving.started[6:]
    assert [r for r in started[:2]] == [1, 2] and e.max_num_seqs == 4
    e.loop.call_soon_threadsafe(serving.release.set)
    answers = []
    while len(answers) < 10:
        answers += next(stream)
    keys = sorted((a.request.job, a.request.line) for a in answers)
    assert keys == sorted([("", i) for i in range(1, 9)] + [("j", 1), ("j", 2)])
    assert all(a.error is None for a in answers)
    stream.close()
