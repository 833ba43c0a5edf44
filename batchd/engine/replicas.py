"""Several engines of one profile behind the one ``Engine`` a session talks to.

``[engine] replicas`` asks for N engine processes of the loaded profile on
this host (each with its own GPUs, or on the CPU build its own cores). The
session still sees one stream: ``ReplicaSet.stream`` takes requests from the
session's source on the loop's thread and deals them to the replicas, each of
which runs its own engine stream on a thread of its own; their answers come
back merged, one list per turn, as from one engine.

Dealing keeps vLLM's prefix cache useful: a prefix family's requests go to
one replica while it has room (``dealing.py`` decides; this module runs the
replicas, their threads and their deaths).

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

import queue
import threading
import time
from typing import Any, Callable, Generator, Iterable

import structlog

from ..lines import Request
from ..profiles import Profile
from . import Answer, Engine, EngineDead, Unplaced
from .dealing import Dealer, Replica

log = structlog.get_logger()

POLL_SECONDS = 0.1  # how often an idle merged stream yields, so the loop gets its turn
HEALTHY = 100  # answers after a (re)load that clear a replica's past deaths
MAX_BACKOFF = 60.0  # seconds, as the session's own backoff
WAITING = ("dead", "unplaced")  # states that load again at restart_at
GROW_SECONDS = 10.0  # how often an "auto" set asks how many replicas the cluster holds


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
        self.dealer = Dealer(by_family=dealing == "prefix")
        self.load = load
        self.restart_backoff = restart_backoff
        self.max_failures = max_failures
        self.clock = clock
        self.replicas = [Replica(i, where(i)) for i in range(count)]
        # (replica, what, value, its stream's number or -1): answers, ends, deaths, loads
        self.events: queue.SimpleQueue[tuple[Replica, Any, Any, int]] = queue.SimpleQueue()
        self.streaming = False
        self.closed = False
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
                engine = self.load(self.profile, replica.index)
            except Exception as exc:  # noqa: BLE001 - a death, or a model that cannot load
                self.events.put((replica, "load_failed", exc, -1))
                return
            if self.closed:  # the set was closed meanwhile: nobody will take it
                _close_quietly(engine, replica.index)
                self.events.put((replica, "load_failed", EngineDead("closed while loading"), -1))
                return
            self.events.put((replica, "loaded", engine, -1))

        threading.Thread(target=load, daemon=True, name=f"batchd-replica-{replica.index}-load"
                         ).start()

    def _died(self, replica: Replica, error: BaseException) -> None:
        unplaced = isinstance(error, Unplaced)  # no room on the cluster: not a death
        if not unplaced:
            replica.deaths += 1
        replica.run += 1  # whatever its old stream still says is stale
        replica.thread = None
        lost = replica.take_back()
        self.dealer.give_back(lost)  # first again, in the order they were dealt
        for request in lost:
            self.lost[request.key] = self.lost.get(request.key, 0) + 1
        self.dealer.forget(replica)
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
            self.dealer.give_back(replica.take_back())
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
                exhausted = self.dealer.deal(source, ahead, exhausted, per, self.live())
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
                if exhausted and not ahead and not self.dealer.redo and not any(
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
        self.dealer.clear()

    def more(self, joining: int = 0) -> None:
        """A job joined: its first JOINING requests are dealt past full windows
        and each replica that gets some makes room for them (Engine.more)."""
        self.dealer.joining = joining
        if not joining:  # take from their feeds now, not at their next refill
            for replica in self.live():
                with replica.lock:
                    replica.joining = replica.joining or 0

    def close(self) -> None:
        """End every replica's engine, and the loads in progress (their processes
        killed by their records: a late one must not keep a GPU)."""
        self.closed = True  # a load that ends from now on closes its own engine
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
