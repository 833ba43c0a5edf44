"""Several engines of one profile behind the one ``Engine`` a session talks to.

``[engine] replicas`` asks for N engine processes of the loaded profile on
this host (each with its own GPUs, or on the CPU build its own cores). The
session still sees one stream: ``ReplicaSet.stream`` takes requests from the
session's source on the loop's thread and deals them to the replicas, each of
which runs its own engine stream on a thread of its own; their answers come
back merged, one list per turn, as from one engine.

Dealing keeps vLLM's prefix cache useful: the requests come in prefix order,
and all of one prefix family (the lines sharing their first 256 characters of
prefix text, ``jobs/order.py``) go to the replica that took the family's first
request while it has room in its window; a new family goes to the replica
with the least outstanding work. A family larger than a replica's window is
cut only when another replica would otherwise fall below its batch (``STARVED``).

A replica that dies (its engine process killed, its GPU lost) loses only what
it had in flight: those requests are dealt again to the live replicas, ahead
of anything new, and every answer is taken once (an answer is matched to the
request the replica still holds). The replica is loaded again after
``restart_backoff_seconds`` (doubling, up to a minute); it is given up after
``max_engine_failures`` deaths in a row (answers after a reload clear them),
and the stream dies (``EngineDead``, the session's usual path) when no
replica is left, or when one request was in flight at ``max_engine_failures``
deaths (at least two): a line that kills every engine it reaches goes to the session's own
isolation of the jobs an engine died with, not round every replica.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Iterator

import structlog

from ..lines import PREFIX_FAMILY_CHARS, Request, prefix_text
from ..profiles import Profile
from . import HOLD, Answer, Engine, EngineDead, Unplaced, take

log = structlog.get_logger()

POLL_SECONDS = 0.1  # how often an idle merged stream yields, so the loop gets its turn
# A replica below this share of its window takes from another's family: the
# auto window is vLLM's batch and a quarter more, so 0.8 keeps every batch full
STARVED = 0.8
HEALTHY = 100  # answers after a (re)load that clear a replica's past deaths
MAX_BACKOFF = 60.0  # seconds, as the session's own backoff
MAX_FAMILIES = 100_000  # families remembered at once (a file of unique prompts)
WAITING = ("dead", "unplaced")  # states that load again at restart_at
GROW_SECONDS = 10.0  # how often an "auto" set asks how many replicas the cluster holds


def family(request: Request) -> bytes:
    """The request's prefix family: a digest of its first 256 characters of
    prefix text (what vLLM's prefix cache can share between them)."""
    text = prefix_text(request.body)[:PREFIX_FAMILY_CHARS]
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


@dataclass(eq=False)
class Replica:
    """One engine of the set and what it holds."""

    index: int
    where: str  # the host and its GPUs or cores, as `batchd status` shows it
    engine: Engine | None = None
    # loading, ready, dead (loads again at restart_at), unplaced (no Ray node has
    # room: placed again at restart_at), gone (given up)
    state: str = "loading"
    deaths: int = 0
    restart_at: float = 0.0
    queue: deque[Request] = field(default_factory=deque)  # dealt, not yet taken
    sent: dict[tuple[str, int], Request] = field(default_factory=dict)  # taken, unanswered
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None
    stopping: bool = False
    joining: int | None = None  # a job joined: its requests at once (Engine.more)
    run: int = 0  # its current stream's number: events of an older one are stale
    answered_since_load: int = 0
    requests: int = 0  # answered, in all
    output_tokens: int = 0
    generation_s: float = 0.0
    streaming_since: float | None = None

    def outstanding(self) -> int:
        with self.lock:
            return len(self.queue) + len(self.sent)

    def source(self) -> Iterator[Request | None]:
        """The replica's own feed: what was dealt to it, HOLD when nothing is."""
        while not self.stopping:
            with self.lock:
                request = self.queue.popleft() if self.queue else None
                if request is not None:
                    self.sent[request.key] = request
            yield request if request is not None else HOLD

    def take_back(self) -> list[Request]:
        """Everything it held, sent or not (its engine died)."""
        with self.lock:
            lost = list(self.sent.values()) + list(self.queue)
            self.sent.clear()
            self.queue.clear()
        return lost

    def line(self, now: float) -> dict[str, Any]:
        """Its entry in the daemon's record and `batchd status` (seconds streaming
        counted up to NOW)."""
        streaming = now - self.streaming_since if self.streaming_since is not None else 0.0
        return {"replica": self.index, "where": self.where, "state": self.state,
                "requests": self.requests, "output_tokens": self.output_tokens,
                "generation_s": round(self.generation_s + streaming, 3), "deaths": self.deaths}


_DEAD = object()  # a replica's stream ended in a death
_END = object()  # a replica's stream ended (its source did)


class ReplicaSet:
    """N engines of PROFILE as one Engine; see the module text. LOAD(profile,
    replica) starts one replica's engine; WHERE(replica) says where it runs."""

    def __init__(self, profile: Profile, count: int,
                 load: Callable[[Profile, int], Engine], where: Callable[[int], str],
                 restart_backoff: float = 2.0, max_failures: int = 2,
                 clock: Callable[[], float] = time.monotonic, dealing: str = "prefix",
                 abort_load: Callable[[int], Any] | None = None,
                 wanted: Callable[[], int] | None = None):
        self.profile = profile
        self.where = where
        # on Ray with replicas = "auto": how many the cluster holds now (nodes join)
        self.wanted = wanted
        self.looked = clock()
        self.abort_load = abort_load  # ends a replica's load in progress (close())
        self.lost: dict[tuple[str, int], int] = {}  # deaths each request was in flight at
        self.by_family = dealing == "prefix"  # else each to the least busy replica
        self.load = load
        self.restart_backoff = restart_backoff
        self.max_failures = max_failures
        self.clock = clock
        self.replicas = [Replica(i, where(i)) for i in range(count)]
        # (replica, what, value, its stream's number or -1): answers, ends, deaths, loads
        self.events: queue.SimpleQueue[tuple[Replica, Any, Any, int]] = queue.SimpleQueue()
        self.families: dict[bytes, Replica] = {}
        self.redo: deque[Request] = deque()  # a dead replica's, dealt before anything new
        self.joining = 0  # requests of a job that joined, to start at once (more())
        self.streaming = False
        # each job's answers by replica: [requests, output tokens, first, last answer]
        self.by_job: dict[str, dict[int, list[float]]] = {}
        # all load at once; the set is up when every one has loaded or failed
        for replica in self.replicas:
            self._start_load(replica)
        errors = []
        for _ in self.replicas:
            replica, what, value, _run = self.events.get()
            if what == "load_failed":
                errors.append(value)
            self._handle(replica, what, value)
        if not self.live():
            dead = [e for e in errors if isinstance(e, EngineDead)]
            raise dead[0] if dead or not errors else errors[0]
        self.max_num_seqs: int | None = None
        self._batch()

    def _batch(self) -> None:
        """The batch of all replicas, up or not: the window is split evenly among them."""
        seqs = [s for s in (getattr(r.engine, "max_num_seqs", None) for r in self.live()) if s]
        if seqs:
            self.max_num_seqs = max(seqs) * len(self.replicas)

    def _grow(self) -> None:
        """More replicas when the cluster has room for more (nodes joined): asked
        every GROW_SECONDS. A node that left leaves its replica waiting for room."""
        if self.wanted is None or self.clock() - self.looked < GROW_SECONDS:
            return
        self.looked = self.clock()
        try:
            wanted = self.wanted()
        except Exception as exc:  # noqa: BLE001 - the cluster's answer is only advice
            log.warning("replicas_not_counted", error=str(exc))
            return
        for index in range(len(self.replicas), wanted):
            replica = Replica(index, self.where(index))
            self.replicas.append(replica)
            log.info("replica_added", profile=self.profile.name, replica=index)
            self._start_load(replica)

    # -- replicas ------------------------------------------------------------------

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "ready"]

    def _start_load(self, replica: Replica) -> None:
        replica.state = "loading"

        def load() -> None:
            try:
                self.events.put((replica, "loaded", self.load(self.profile, replica.index), -1))
            except Exception as exc:  # noqa: BLE001 - a death, or a model that cannot load
                self.events.put((replica, "load_failed", exc, -1))

        threading.Thread(target=load, daemon=True, name=f"batchd-replica-{replica.index}-load"
                         ).start()

    def _died(self, replica: Replica, error: BaseException) -> None:
        unplaced = isinstance(error, Unplaced)  # no room on the cluster: not a death
        if not unplaced:
            replica.deaths += 1
        replica.run += 1  # whatever its old stream still says is stale
        replica.thread = None
        lost = replica.take_back()
        self.redo.extendleft(reversed(lost))  # first again, in the order they were dealt
        for request in lost:
            self.lost[request.key] = self.lost.get(request.key, 0) + 1
        for key in [k for k, r in self.families.items() if r is replica]:
            del self.families[key]
        engine, replica.engine = replica.engine, None
        if engine is not None:  # off the loop's thread: a clean close may take 30 s
            threading.Thread(target=_close_quietly, args=(engine, replica.index), daemon=True,
                             name=f"batchd-replica-{replica.index}-close").start()
        if unplaced:
            replica.state = "unplaced"  # placed again once the cluster has room
            replica.restart_at = self.clock() + max(1.0, self.restart_backoff)
        elif replica.deaths >= self.max_failures or not isinstance(error, EngineDead):
            replica.state = "gone"  # given up, or a model that cannot load: no retry helps
        else:
            replica.state = "dead"
            replica.restart_at = self.clock() + min(
                MAX_BACKOFF, self.restart_backoff * 2 ** (replica.deaths - 1))
        log.warning("replica_died", profile=self.profile.name, replica=replica.index,
                    where=replica.where, error=str(error), requeued=len(lost),
                    state=replica.state)

    def _handle(self, replica: Replica, what: Any, value: Any, run: int = -1) -> list[Answer]:
        """One event of a replica's threads; the answers it brought. An event of
        a stream the replica no longer runs (RUN) is dropped."""
        if run >= 0 and run != replica.run:
            return []
        if what == "loaded":
            replica.engine, replica.state = value, "ready"
            self._batch()
            replica.where = getattr(value, "where", None) or replica.where  # a Ray node
            replica.answered_since_load = 0
            log.info("replica_ready", profile=self.profile.name, replica=replica.index,
                     where=replica.where)
        elif what == "load_failed":
            self._died(replica, value)
        elif what is _DEAD:
            self._stopped(replica)
            self._died(replica, value)
        elif what is _END:  # its feed ended: what it still held is dealt again
            self._stopped(replica)
            self.redo.extendleft(reversed(replica.take_back()))
        elif what == "answers":
            taken = []
            with replica.lock:
                for answer in value:
                    if replica.sent.pop(answer.request.key, None) is not None:
                        taken.append(answer)  # once: a request it still held
            replica.requests += len(taken)
            replica.answered_since_load += len(taken)
            if replica.deaths and replica.answered_since_load >= HEALTHY:
                replica.deaths = 0  # healthy again: an old death no longer counts
            now = self.clock()
            for answer in taken:
                usage = (answer.body or {}).get("usage") or {}
                tokens = usage.get("completion_tokens") or usage.get("output_tokens") or 0
                replica.output_tokens += tokens
                counts = self.by_job.setdefault(answer.request.job, {}).setdefault(
                    replica.index, [0, 0, now, now])
                counts[0] += 1
                counts[1] += tokens
                counts[3] = now
            return taken
        return []

    def _stopped(self, replica: Replica) -> None:
        replica.thread = None
        if replica.streaming_since is not None:
            replica.generation_s += self.clock() - replica.streaming_since
            replica.streaming_since = None

    # -- the stream ----------------------------------------------------------------

    def stream(self, requests: Iterable[Request | None], sampling: dict[str, Any],
               window: int) -> Generator[list[Answer], None, None]:
        source = iter(requests)
        per = max(1, -(-window // max(1, len(self.replicas))))  # each replica's window
        self.streaming = True
        self.lost.clear()
        ahead: list[Request] = []  # taken from the source, not dealt yet
        exhausted = False
        try:
            while True:
                self._grow()
                exhausted = self._deal(source, ahead, exhausted, per)
                for replica in self.replicas:
                    if replica.state in WAITING and self.clock() >= replica.restart_at:
                        self._start_load(replica)
                    if replica.state == "ready" and replica.thread is None and \
                            (replica.outstanding() or not exhausted):
                        self._run(replica, sampling, per)
                if not any(r.state != "gone" for r in self.replicas):
                    raise EngineDead(f"every replica of {self.profile.name} died "
                                     f"{self.max_failures} times")
                poison = max(2, self.max_failures)  # deaths one request may be in flight at
                if any(n >= poison for n in self.lost.values()):
                    raise EngineDead(f"a request was in flight at {poison} deaths "
                                     f"of {self.profile.name}'s replicas")
                if exhausted and not ahead and not self.redo and not any(
                        r.outstanding() for r in self.replicas):
                    return  # every request answered (the replicas' streams end below)
                answers: list[Answer] = []
                try:
                    answers += self._handle(*self.events.get(timeout=POLL_SECONDS))
                    while True:
                        answers += self._handle(*self.events.get_nowait())
                except queue.Empty:
                    pass
                for answer in answers:
                    self.lost.pop(answer.request.key, None)
                yield answers
        finally:
            self._stop_all()
            self.streaming = False

    def _deal(self, source: Iterator[Request | None], ahead: list[Request],
              exhausted: bool, per: int) -> bool:
        """Top up the live replicas' windows: a dead replica's requests first, then
        the source's, each family to its replica while it has room."""
        live = self.live()
        if not live:
            return exhausted
        while True:
            if self.redo:
                request = self.redo[0]
            elif ahead:
                request = ahead[0]
            elif exhausted:
                return True
            else:
                batch, exhausted = take(source, 1)
                if not batch:
                    return exhausted
                ahead.append(batch[0])
                request = batch[0]
            joining = self.joining > 0
            target = self._target(request, live, per + (1 << 30 if joining else 0))
            if target is None:
                return exhausted  # every window is full: the request waits here
            if self.redo and self.redo[0] is request:
                self.redo.popleft()
            else:
                ahead.pop(0)
            with target.lock:
                target.queue.append(request)
            if joining:  # a job that joined: its first requests start at once
                self.joining -= 1
                with target.lock:
                    target.joining = (target.joining or 0) + 1

    def _target(self, request: Request, live: list[Replica], per: int) -> Replica | None:
        if not self.by_family:
            free = [r for r in live if r.outstanding() < per]
            return min(free, key=Replica.outstanding) if free else None
        key = family(request)
        home = self.families.get(key)
        if home is not None and home.state == "ready":
            if home.outstanding() < per:
                return home
            starved = [r for r in live if r.outstanding() < per * STARVED]
            if not starved:
                return None  # its home will have room soon: keep the family together
            target = min(starved, key=Replica.outstanding)  # the family is cut
        else:
            free = [r for r in live if r.outstanding() < per]
            if not free:
                return None
            target = min(free, key=Replica.outstanding)
        if len(self.families) >= MAX_FAMILIES:
            self.families.clear()  # a file of unique prompts: nothing to keep together
        self.families[key] = target
        return target

    def _run(self, replica: Replica, sampling: dict[str, Any], window: int) -> None:
        """The replica's engine stream, on a thread of its own: its answers, its
        end or its death come back as events."""
        replica.stopping = False
        replica.streaming_since = self.clock()
        replica.run += 1
        run_id = replica.run
        engine = replica.engine
        assert engine is not None

        def run() -> None:
            stream = engine.stream(replica.source(), sampling, window)
            try:
                for answers in stream:
                    if answers:
                        self.events.put((replica, "answers", answers, run_id))
                    with replica.lock:
                        joining, replica.joining = replica.joining, None
                    if joining is not None:
                        engine.more(joining)
                    if replica.stopping:
                        break
            except Exception as exc:  # noqa: BLE001 - EngineDead, or the engine's own bug
                self.events.put((replica, _DEAD, exc, run_id))
                return
            finally:
                stream.close()
            self.events.put((replica, _END, None, run_id))

        replica.thread = threading.Thread(target=run, daemon=True,
                                          name=f"batchd-replica-{replica.index}")
        replica.thread.start()

    def _stop_all(self) -> None:
        """Close every replica's stream (what is in flight is aborted); what they
        held goes back to nobody: the session runs those lines again later."""
        running = [(r, r.thread) for r in self.replicas if r.thread is not None]
        for replica in self.replicas:
            replica.stopping = True
            wake = getattr(replica.engine, "wake", None)
            if wake is not None and hasattr(wake, "set"):
                wake.set()
        for replica, thread in running:
            thread.join(60)
            if thread.is_alive():  # its engine does not answer: end it as dead
                self._died(replica, EngineDead("its stream did not stop within 60 s"))
        while True:  # the threads' last events: answers are dropped with the stream
            try:
                replica, what, value, run = self.events.get_nowait()
            except queue.Empty:
                break
            if run >= 0 and run != replica.run:
                continue
            if what is _DEAD:
                self._stopped(replica)
                self._died(replica, value)
            elif what in ("loaded", "load_failed"):
                self._handle(replica, what, value)
            else:
                self._stopped(replica)
        for replica in self.replicas:
            replica.thread = None
            replica.take_back()
            wake = getattr(replica.engine, "wake", None)
            if wake is not None and hasattr(wake, "clear"):
                wake.clear()
        self.redo.clear()
        self.families.clear()
        self.joining = 0

    def more(self, joining: int = 0) -> None:
        """A job joined: its first JOINING requests are dealt past full windows
        and each replica that gets some makes room for them (Engine.more)."""
        self.joining = joining
        if not joining:  # take from their feeds now, not at their next refill
            for replica in self.live():
                with replica.lock:
                    replica.joining = replica.joining or 0

    def close(self) -> None:
        """End every replica's engine, and the loads in progress (their processes
        killed by their records: a late one must not keep a GPU)."""
        loading = [r for r in self.replicas if r.state == "loading"]
        for replica in loading:
            if self.abort_load is not None:
                self.abort_load(replica.index)
        deadline = time.monotonic() + 60
        while loading and time.monotonic() < deadline:
            try:
                replica, what, value, _run = self.events.get(timeout=1.0)
            except queue.Empty:
                continue
            if what == "loaded":
                _close_quietly(value, replica.index)
            if what in ("loaded", "load_failed") and replica in loading:
                loading.remove(replica)
        for replica in self.replicas:
            engine, replica.engine = replica.engine, None
            if engine is not None:
                engine.close()
            replica.state = "gone"

    def replica_lines(self) -> list[dict[str, Any]]:
        """Each replica as the daemon's record and `batchd status` show it (the
        loop asks once a second: between streams a dead replica is loaded
        again here, so it is back before the next job)."""
        if not self.streaming:
            self._tend()
        now = self.clock()
        return [r.line(now) for r in self.replicas]

    def _tend(self) -> None:
        """Between streams: the loads that ended, replicas whose engine process
        died while idle, the restarts that are due, and new replicas."""
        self._grow()
        while True:
            try:
                replica, what, value, _run = self.events.get_nowait()
            except queue.Empty:
                break
            if what in ("loaded", "load_failed"):
                self._handle(replica, what, value)
        for replica in self.live():
            process = getattr(replica.engine, "process", None)
            code = process.poll() if process is not None else None
            if code is not None:
                self._died(replica, EngineDead(f"engine process exited with code "
                                               f"{code} while idle"))
        for replica in self.replicas:
            if replica.state in WAITING and self.clock() >= replica.restart_at:
                self._start_load(replica)

    def take_job(self, job: str) -> list[dict[str, Any]]:
        """What each replica answered of JOB since last asked (the bench record's
        ``replicas``): requests, output tokens, and the seconds from its first
        answer of the job to its last."""
        counts = self.by_job.pop(job, {})
        return [{"replica": i, "where": self.replicas[i].where, "requests": int(c[0]),
                 "output_tokens": int(c[1]), "generation_s": round(c[3] - c[2], 3)}
                for i, c in sorted(counts.items())]


def _close_quietly(engine: Engine, index: int) -> None:
    try:
        engine.close()
    except Exception as exc:  # noqa: BLE001 - its processes may be gone already
        log.warning("replica_close_failed", replica=index, error=str(exc))
