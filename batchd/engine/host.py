"""The engine process: ``python -m batchd.engine.host FD`` (a child of the
daemon, over a socket pair) or ``... --connect HOST:PORT`` (started on a Ray
node by engine/cluster.py: it dials the daemon and proves the shared secret in
``BATCHD_ENGINE_KEY``).

Loads one profile's model with ``VllmEngine`` and answers the daemon's streams
(messages in ``wire.py``; the daemon's side is ``hosted.py``) until told to
close or the daemon is gone. It ignores SIGINT and SIGTERM: the daemon decides
when it ends. On a Ray node it also ends, with vLLM's processes under it, when
the actor that started it is gone (``BATCHD_ENGINE_PARENT``).
"""

from __future__ import annotations

import gc
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Client, Connection
from typing import Any

from ..lines import Request
from . import HOLD, EngineDead
from .wire import WANT_BATCH, Load, LoadFailed, Msg, Ready

FLUSH_SECONDS = 0.1  # answers go back at most this often ...
QUIET_SECONDS = 0.25  # ... and something goes back at least this often


class _Aborted(Exception):
    pass


def serve(conn: Connection) -> int:
    """Load the profile's model, then answer streams until told to close."""
    from .vllm_engine import VllmEngine

    profile, models_dir, media = Load(*conn.recv())
    try:
        engine = VllmEngine(profile, models_dir, media=media)
    except Exception as exc:  # noqa: BLE001 - the daemon reports it as the job's error
        text = f"{type(exc).__name__}: {exc}"
        # vLLM's engine core killed (the OOM killer) is a death, not a model
        # that cannot load: the daemon loads again after a backoff
        conn.send(LoadFailed(text, killed_while_loading(str(exc))))
        return 1
    # What vLLM's own server does once started: the heap that loading built
    # (modules, the model's Python objects, the serving layer) leaves the
    # collector's view, so collections while serving walk only what requests
    # allocate, not hundreds of thousands of objects that never die.
    gc.collect()
    gc.freeze()
    # Every request allocates a few hundred container objects (request models,
    # tasks, output states) that reference counting frees; with Python's default
    # thresholds (700, 10, 10) the collector still ran ~360 young and ~33 middle
    # collections per 2,000 requests, each walking the objects of the ~1,000
    # requests in flight: 0.35-0.47 s of the engine process's ~3.7 CPU-s.
    # At 50,000 it runs twice (0.05 s), and resident memory stayed flat over
    # six such runs and from 1,000 to 100,000 lines (docs/BENCHMARKING.md).
    gc.set_threshold(50_000, 20, 20)
    conn.send(Ready(engine.load_seconds, *_capabilities(profile), engine.max_num_seqs))
    try:
        while True:
            message = conn.recv()
            if message[0] == Msg.CLOSE:
                break
            if message[0] == Msg.STREAM and not _stream(conn, engine, *message[1:]):
                return 1  # the engine died; this process cannot serve again
    except (EOFError, OSError):
        pass  # the daemon is gone
    finally:
        engine.close()
    return 0


KILLED = re.compile(r"Failed (?:core|frontend) proc\(s\): \{[^}]*:\s*-\d+")


def killed_while_loading(message: str) -> bool:
    """Whether vLLM's start-up failure says one of its processes was killed by a
    signal (its exit code negative: "Failed core proc(s): {'EngineCore': -9}")."""
    return KILLED.search(message) is not None


def _capabilities(profile: Any) -> tuple[str, list[str]]:
    """What the profile's server options give on this vLLM: one line and its problems."""
    from .capabilities import capabilities

    try:
        found = capabilities(profile)
    except Exception as exc:  # noqa: BLE001 - only a report; the model is loaded
        return f"not checked: {type(exc).__name__}: {exc}", []
    return found.line(), found.problems


class Feed:
    """The daemon's requests, asked for (WANT n) only as the engine has room
    for them (``want``, called by ``engine.take``): none waits here behind a
    request of a job that joined later, so a joining job's requests are the
    next ones in vLLM."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.buffer: deque[Request] = deque()
        self.ended = False

    def want(self, n: int) -> None:
        if self.ended or len(self.buffer) >= n:
            return
        self.conn.send((Msg.WANT, min(WANT_BATCH, n - len(self.buffer))))
        message = self.conn.recv()
        while message[0] == Msg.MORE:  # asking already
            message = self.conn.recv()
        if message[0] == Msg.ABORT:
            raise _Aborted
        if message[0] == Msg.REQUESTS:
            if message[1]:
                self.buffer.extend(message[1])
            else:
                self.ended = True

    def __iter__(self) -> "Feed":
        return self

    def __next__(self) -> Request | None:
        if self.buffer:
            return self.buffer.popleft()
        if self.ended:
            raise StopIteration
        return HOLD  # nothing asked for is left: ask again at the next refill


def _stream(conn: Connection, engine: Any, sampling: dict[str, Any], window: int) -> bool:
    """One stream; False when the engine died in it.

    Answers are sent in bunches, at most every FLUSH_SECONDS, and something is
    sent at least every QUIET_SECONDS (an empty bunch when nothing finished),
    so the daemon checkpoints, reports and acts on cancel and stop in time
    without waking up, and taking a core from the engine, after every step.
    An answer goes back as (key, body, error): the daemon has the request.
    """

    answers = engine.stream(Feed(conn), sampling, window)
    bunch: list[tuple] = []
    sent = time.monotonic()
    try:
        for batch in answers:
            bunch.extend((a.request.key, a.body, a.error) for a in batch)
            waited = time.monotonic() - sent
            if (bunch and waited >= FLUSH_SECONDS) or waited >= QUIET_SECONDS \
                    or len(bunch) >= WANT_BATCH:
                conn.send((Msg.ANSWERS, bunch))
                bunch, sent = [], time.monotonic()
            if conn.poll():
                message = conn.recv()
                if message[0] == Msg.ABORT:
                    bunch = []  # the daemon drops what is in flight; so do we
                    break
                if message[0] == Msg.MORE:  # a job joined: its requests now, not at the next refill
                    engine.refill(message[1])
    except _Aborted:
        bunch = []
    except EngineDead as exc:
        conn.send((Msg.ANSWERS, bunch))  # finished before the death: keep them
        conn.send((Msg.DEAD, str(exc)))
        return False
    finally:
        answers.close()  # aborts what is still in flight
    if bunch:
        conn.send((Msg.ANSWERS, bunch))
    conn.send((Msg.END,))
    return True


def _end_with(parent: int) -> None:
    """End this process group (this process and vLLM's under it) once PARENT,
    the Ray actor that started it, is gone: a killed actor or a lost node must
    not leave a model loaded on a GPU."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.killpg(0, signal.SIGKILL)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cpus = os.environ.pop("BATCHD_ENGINE_CPUS", "")
    if cpus:  # a replica's own cores (engine/replicas.py): vLLM's auto thread binding reads them
        os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    parent = os.environ.pop("BATCHD_ENGINE_PARENT", "")
    if parent:
        threading.Thread(target=_end_with, args=(int(parent),), daemon=True,
                         name="batchd-engine-parent").start()
    if sys.argv[1] == "--connect":  # on a Ray node: dial the daemon
        address, port = sys.argv[2].rsplit(":", 1)
        conn = Client((address, int(port)),
                      authkey=bytes.fromhex(os.environ.pop("BATCHD_ENGINE_KEY")))
    else:
        conn = Connection(int(sys.argv[1]))
    try:
        return serve(conn)
    except (EOFError, BrokenPipeError, ConnectionError):
        return 0  # the daemon is gone; nothing to report to
    finally:
        conn.close()


if __name__ == "__main__":
    code = main()
    # vLLM and torch leave native threads that can abort the interpreter's
    # teardown; everything is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
