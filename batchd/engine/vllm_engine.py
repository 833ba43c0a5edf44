"""The real engine: vLLM's OpenAI serving layer behind the session's ``stream``.

``batchd.serving`` holds vLLM's async engine client and serving objects; they
live on an event loop in a thread of their own, and this class feeds them from
the engine process's synchronous loop. At most ``window`` requests are in
flight; each finished one comes back through a queue as an ``Answer``. When
vLLM's engine core dies, ``EngineDead`` is raised and the session starts a fresh
engine. The daemon runs this class inside ``batchd.engine.host``, a process of
its own per loaded model.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Generator, Iterable

from ..lines import Request
from ..profiles import Profile
from . import Answer, EngineDead, sampling_of, take

# An empty list comes back this often when nothing finished, so the engine
# process sees a joining job's MORE within this long even mid-decode.
QUIET_SECONDS = 0.04


class VllmEngine:
    """The session's engine over vLLM's serving layer (``serving`` may be given:
    anything with ``async answer(request, sampling)``, ``dead``, ``client`` and
    ``async close()``, as the bridge's own tests do without vLLM)."""

    def __init__(self, profile: Profile, models_dir: Path, serving: Any = None,
                 media: dict[str, Any] | None = None):
        self.profile = profile
        self._refill: int | None = None  # a job joined: how many of its requests start now
        started = time.monotonic()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="batchd-serving")
        self._thread.start()
        try:
            if serving is None:
                os.environ.update(profile.environment)
                from .serving import Serving  # imports vLLM: not at module import

                serving = self._call(Serving(profile, models_dir, media).open())
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.serving = serving
        self.load_seconds = time.monotonic() - started

    @property
    def max_num_seqs(self) -> int | None:
        """vLLM's batch: the sequences its scheduler runs at once."""
        config = getattr(self.serving.client, "vllm_config", None)
        return getattr(getattr(config, "scheduler_config", None), "max_num_seqs", None)

    def refill(self, joining: int = 0) -> None:
        """A job joined: take from the running stream's source at its next pass,
        and its first JOINING requests (the next ones the source gives) go into
        running slots at once."""
        self._refill = max(joining, self._refill or 0)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stream(self, requests: Iterable[Request | None], sampling: dict[str, Any],
               window: int) -> Generator[list[Answer], None, None]:
        """Answers as they finish; closing the generator cancels what is in flight
        (cancelling a serving call aborts its request in the engine)."""
        done: queue.SimpleQueue[list[tuple[Request, asyncio.Task]]] = queue.SimpleQueue()
        tasks: dict[tuple[str, int], asyncio.Task] = {}  # touched only on the loop's thread
        finished: list[tuple[Request, asyncio.Task]] = []  # likewise
        source = iter(requests)
        inflight = 0
        exhausted = False
        # Refill when a sixteenth of the window is free, not after every answer:
        # each hand-over wakes the loop's thread, and on a small machine those
        # wake-ups take CPU from vLLM's engine core. A job that joins (refill())
        # gets its requests in at once, at the head of what waits for a slot.
        low = window - max(1, window // 16)
        self._refill = None
        sent: dict[tuple[str, int], Request] = {}  # the request of each task in flight
        preempted: set[asyncio.Task] = set()  # aborted to make room: their answers dropped

        def submit(batch: list[Request], joining: int = 0) -> None:  # runs on the loop
            """BATCH into vLLM; the first JOINING (a job that just joined) into running
            slots: vLLM's batch is full, and with requests of one length none frees
            before a whole decode ends, so the requests admitted last make way (they
            run again from the start, after; what they had decoded is recomputed)."""
            again = make_room(joining) if joining else []
            for request in batch + again:
                task = self.loop.create_task(
                    self.serving.answer(request, sampling_of(request, sampling)))
                tasks[request.key] = task
                sent[request.key] = request
                task.add_done_callback(functools.partial(finish, request))

        def make_room(n: int) -> list[Request]:  # runs on the loop
            seqs = self.max_num_seqs
            keys = [key for key, task in tasks.items() if not task.done()]
            if not seqs or len(keys) < seqs:
                return []  # a slot is free (or the batch is unknown): no one makes way
            waiting = len(keys) - seqs  # the last submitted have no slot yet
            again = []
            for key in keys[max(0, len(keys) - waiting - n):]:
                task = tasks.pop(key)
                preempted.add(task)
                task.cancel()
                again.append(sent.pop(key))
            return again

        def finish(request: Request, task: asyncio.Task) -> None:  # runs on the loop
            if tasks.get(request.key) is task:
                del tasks[request.key]
                sent.pop(request.key, None)
            if task.cancelled() or task in preempted:
                preempted.discard(task)
                return
            if not finished:  # one hand-over for all that finish in this loop pass
                self.loop.call_soon(flush)
            finished.append((request, task))

        def flush() -> None:  # runs on the loop
            done.put(finished[:])
            finished.clear()

        def cancel_all() -> None:  # runs on the loop
            for task in list(tasks.values()):
                task.cancel()

        try:
            while True:
                if (inflight <= low or self._refill is not None) and not exhausted:
                    room, joining = window - inflight, 0
                    if self._refill is not None:  # a job joined: its first requests now
                        joining = self._refill
                        room = max(room, window - low, joining)
                        self._refill = None
                    batch, exhausted = take(source, room)
                    if batch:
                        inflight += len(batch)
                        self.loop.call_soon_threadsafe(submit, batch, min(joining, len(batch)))
                if not inflight and exhausted:
                    return
                try:
                    ready = done.get(timeout=QUIET_SECONDS)
                except queue.Empty:
                    if self.serving.dead:
                        raise EngineDead(f"vLLM's engine died: {self._dead_error()}") from None
                    yield []
                    continue
                while True:
                    try:
                        ready += done.get_nowait()
                    except queue.Empty:
                        break
                inflight -= len(ready)
                yield [self._answer(request, task) for request, task in ready]
        finally:
            if inflight:
                self.loop.call_soon_threadsafe(cancel_all)

    def _answer(self, request: Request, task: asyncio.Task) -> Answer:
        exc = task.exception()
        if exc is not None:
            if self.serving.dead or isinstance(exc, self.serving.engine_dead):
                raise EngineDead(f"vLLM's engine died: {self._dead_error()}") from exc
            raise exc
        body, error = task.result()
        if error is not None and error.status_code >= 500 and self.serving.dead:
            # A server error while the engine is down is the engine's death, not
            # this line's fault: the line runs again on a fresh engine.
            raise EngineDead(f"vLLM's engine died: {self._dead_error()}")
        return Answer(request, body=body, error=error)

    def _dead_error(self) -> str:
        error = getattr(self.serving.client, "dead_error", None)
        return str(error) if error else "engine core gone"

    def close(self) -> None:
        serving = getattr(self, "serving", None)
        if serving is not None:
            try:
                asyncio.run_coroutine_threadsafe(serving.close(), self.loop).result(60)
            except Exception:  # noqa: BLE001 - best effort; the process exit frees the rest
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
