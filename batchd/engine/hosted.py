"""The daemon's side of the engine process: start it, stream through it, end it.

vLLM does not reliably give back GPU memory when a model is dropped inside a
living process (CUDA context, allocator caches, compiled graphs, its own
worker processes). The only release that is guaranteed is a process exit. So
every loaded model lives in a child, ``python -m batchd.engine.host``, which runs
``VllmEngine`` and nothing else; ``HostedEngine`` is its stand-in in the daemon.
Closing it ends the child and the vLLM processes under it, and the daemon
itself never imports vLLM or torch. The messages are in ``wire.py``.

The host ignores SIGINT and SIGTERM: the daemon decides when it ends (a Ctrl-C
in a terminal reaches the whole process group, and the drain still needs the
engine for its last step). If the daemon dies, the host reads end of file or a
broken pipe and exits, taking vLLM's engine core with it; should vLLM's core
outlive it, ``reap_engines`` ends it at the next daemon start.
"""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Protocol

import structlog

from ..config import Settings
from ..lines import Request
from ..profiles import Profile
from . import Answer, Engine, EngineDead, take
from ..spool.watcher import Wakeup
from .places import replica_places
from .processes import LocalProcess, kill_recorded, reap_engines

__all__ = ["HostedEngine", "engine_factory", "reap_engines"]
from .wire import Load, LoadFailed, Msg, Ready

log = structlog.get_logger()

class Waker(Protocol):
    """What wakes a stream early (spool/watcher.Wakeup): selectable, and set or not."""

    def fileno(self) -> int: ...

    def is_set(self) -> bool: ...


CLOSE_SECONDS = 30.0  # a clean vLLM shutdown; after this the host is killed


def engine_factory(settings: Settings, wake: Waker | None = None
                   ) -> Callable[[Profile], Engine]:
    """How the daemon loads a profile: an engine process. WAKE (the watcher's)
    makes a stream yield at once, so the loop claims a new file without waiting
    for the engine's next answers."""
    pidfile = settings.layout.engine_pidfile(socket.gethostname(), os.getpid())

    # where vLLM may read local images (the running jobs' media folders) and the
    # hosts it may fetch them from: fixed for the engine's life (jobs/images.py)
    settings.layout.media_root.mkdir(parents=True, exist_ok=True)
    media = {"root": os.path.realpath(settings.layout.media_root),
             "domains": list(settings.media.allowed_domains)}

    def load(profile: Profile) -> Engine:
        if settings.cluster.ray_address:  # placed by Ray on the cluster's nodes
            from .cluster import ray_replicas
            return ray_replicas(profile, settings, media)
        count, places = replica_places(profile, settings.engine.replicas)  # places.py
        if count == 1:
            return HostedEngine(profile, settings.routing.models_dir, pidfile, wake, media)
        from .replicas import ReplicaSet

        def own(replica: int) -> Path:
            return settings.layout.engine_pidfile(socket.gethostname(), os.getpid(), replica)

        def start(profile: Profile, replica: int) -> Engine:
            return HostedEngine(profile, settings.routing.models_dir, own(replica), Wakeup(),
                                media, env=places[replica][1], owns_wake=True)

        return ReplicaSet(profile, count, start, lambda replica: places[replica][0],
                          settings.engine.restart_backoff_seconds,
                          settings.engine.max_engine_failures,
                          dealing=settings.engine.replica_dealing,
                          abort_load=lambda replica: kill_recorded(own(replica)))

    return load


class HostedEngine:
    """An engine whose model lives in a child process; see the module text."""

    def __init__(self, profile: Profile, models_dir: Path, pidfile: Path | None = None,
                 wake: Waker | None = None, media: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, owns_wake: bool = False,
                 process: "EngineProcess | None" = None):
        self.profile = profile
        self.wake = wake
        self.owns_wake = owns_wake  # a replica's own wake: closed with the engine
        self.max_num_seqs: int | None = None  # vLLM's batch, once loaded
        self.streaming = False
        # on this host, or started on a Ray node by engine/cluster.py
        self.process = process if process is not None else LocalProcess(env, pidfile)
        self.where = self.process.where  # a Ray node's name; None here
        self.conn = self.process.conn
        try:
            self.conn.send(Load(profile, models_dir, media or {}))
            reply = self._recv() or ()
        except (EngineDead, OSError) as exc:
            # Killed while loading (the OOM killer, a kill): an engine death, not
            # a model that cannot load; the daemon loads again after a backoff.
            self.close()
            raise EngineDead(f"engine process for {profile.name} died while loading: "
                             f"{exc}") from None
        except BaseException:  # anything else (a message it could not read): end it too
            self.close()
            raise
        if isinstance(reply, LoadFailed) and reply.killed:  # vLLM's processes killed mid-load
            self.close()
            raise EngineDead(f"vLLM's engine died while loading {profile.name}: {reply.text}")
        if not isinstance(reply, Ready):
            self.close()
            cause = self.process.cause()
            text = reply.text if isinstance(reply, LoadFailed) else f"unexpected {reply!r}"
            raise RuntimeError(text + (f" (engine log: {cause})" if cause else ""))
        line, problems = reply.capabilities, reply.problems
        self.max_num_seqs = reply.max_num_seqs
        log.info("engine_process_started", pid=self.process.pid, profile=profile.name,
                 where=self.where, vllm_load_s=round(reply.load_seconds, 2), capabilities=line)
        for problem in problems:
            log.warning("profile_problem", profile=profile.name, problem=problem)
        self.process.loaded()

    def _recv(self, wake: Waker | None = None) -> tuple | None:
        """The next message; None when WAKE was set first; EngineDead when the
        host is gone."""
        waiting: list[Any] = [self.conn] if wake is None else [self.conn, wake]
        try:
            while True:
                ready = wait(waiting, 0.5)
                if self.conn in ready:
                    return self.conn.recv()
                if ready:
                    return None
                # vLLM's engine core, forked from the host, may hold our socket
                # open after the host died: do not wait for end of file alone.
                code = self.process.poll()
                if code is not None:
                    raise EngineDead(f"engine process exited with code {code}")
        except (EOFError, OSError) as exc:
            raise EngineDead(f"engine process lost: {exc or type(exc).__name__}") from None

    def stream(self, requests: Iterable[Request | None], sampling: dict[str, Any],
               window: int) -> Generator[list[Answer], None, None]:
        source = iter(requests)
        inflight: dict[tuple[str, int], Request] = {}  # sent and not answered
        over = False
        self.streaming = True
        try:
            self.conn.send((Msg.STREAM, sampling, window))
            while True:
                message = self._recv(self.wake if self.wake is not None
                                     and not self.wake.is_set() else None)
                if message is None:
                    yield []  # the loop has something to do first (a new file)
                    continue
                if message[0] == Msg.WANT:
                    batch, ended = take(source, message[1])
                    inflight.update((r.key, r) for r in batch)
                    self.conn.send((Msg.REQUESTS, batch) if batch or ended else (Msg.HOLD,))
                elif message[0] == Msg.ANSWERS:
                    yield [Answer(inflight.pop(key), body, error)
                           for key, body, error in message[1]]
                else:
                    over = True
                    if message[0] == Msg.DEAD:
                        raise EngineDead(message[1])
                    return
        except (BrokenPipeError, ConnectionError) as exc:
            over = True
            raise EngineDead(f"engine process lost: {exc or type(exc).__name__}") from None
        finally:
            self.streaming = False
            if not over:
                self._abort()

    def more(self, joining: int = 0) -> None:
        if self.streaming:
            try:
                self.conn.send((Msg.MORE, joining))
            except OSError:
                pass  # a dead host: the stream finds out and says so

    def _abort(self) -> None:
        """Stop a stream early: the host aborts what is in flight; answers still
        on their way are dropped (their lines run again in a later stream)."""
        try:
            self.conn.send((Msg.ABORT,))
            while (self._recv() or (Msg.END,))[0] not in (Msg.END, Msg.DEAD):
                pass
        except (EngineDead, OSError):
            pass  # a dead host has nothing in flight

    def close(self) -> None:
        """End the host and every process under it."""
        try:
            self.conn.send((Msg.CLOSE,))
        except OSError:
            pass
        code = self.process.end(CLOSE_SECONDS)
        self.conn.close()
        close_wake = getattr(self.wake, "close", None)
        if self.owns_wake and close_wake is not None:
            close_wake()
        log.info("engine_process_ended", pid=self.process.pid, code=code)


class EngineProcess(Protocol):
    """Where an engine process runs and how it ends: ``LocalProcess`` (a child
    of the daemon) or ``cluster.RayProcess`` (started on a Ray node)."""

    pid: int
    where: str | None  # a name for `batchd status` when not this host
    conn: Connection  # the wire to it (wire.py)

    def loaded(self) -> None: ...  # its model is loaded (vLLM's processes exist now)

    def poll(self) -> int | None: ...  # its exit code once it has exited

    def cause(self) -> str | None: ...  # a failed load's root cause, from its log

    def end(self, timeout: float) -> int | None: ...  # wait for its exit, then kill all
