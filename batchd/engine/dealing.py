"""How engine replicas share one stream: which replica gets each request.

The requests come in prefix order, and all of one prefix family (the lines
sharing their first 256 characters of prefix text, ``lines.prefix_text``) go
to the replica that took the family's first request while it has room in its
window; a new family goes to the replica with the least outstanding work. A
family larger than a replica's window is cut only when another replica would
otherwise fall below its batch (``STARVED``). A dead replica's requests are
dealt again first, in the order they were dealt (``give_back``).
``replicas.py`` runs the replicas; this module only decides.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..lines import PREFIX_FAMILY_CHARS, Request, prefix_text
from . import HOLD, Engine, take

# A replica below this share of its window takes from another's family: the
# auto window is vLLM's batch and a quarter more, so 0.8 keeps every batch full
STARVED = 0.8
MAX_FAMILIES = 100_000  # families remembered at once (a file of unique prompts)


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


class Dealer:
    """The dealing of one replica set: families and their replicas, the requests
    to deal again first, and how many of a joining job's go past full windows."""

    def __init__(self, by_family: bool = True):
        self.by_family = by_family  # else each to the least busy replica
        self.families: dict[bytes, Replica] = {}
        self.redo: deque[Request] = deque()  # a dead replica's, dealt before anything new
        self.joining = 0  # requests of a job that joined, to start at once (more())

    def give_back(self, lost: list[Request]) -> None:
        """A replica's requests, lost with it: dealt again first, in their order."""
        self.redo.extendleft(reversed(lost))

    def forget(self, replica: Replica) -> None:
        """REPLICA died: its families find new homes."""
        for key in [k for k, r in self.families.items() if r is replica]:
            del self.families[key]

    def clear(self) -> None:
        """The stream ended: nothing left to deal, no family kept."""
        self.redo.clear()
        self.families.clear()
        self.joining = 0

    def deal(self, source: Iterator[Request | None], ahead: list[Request],
             exhausted: bool, per: int, live: list[Replica]) -> bool:
        """Top up the LIVE replicas' windows (PER requests each): a dead replica's
        requests first, then the source's (AHEAD: taken, not dealt yet), each
        family to its replica while it has room. Whether the source has ended."""
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
