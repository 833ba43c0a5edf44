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
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, Any, Callable, Generator, Iterable, Protocol

import structlog

from ..config import Settings
from ..lines import Request
from ..profiles import Profile
from . import Answer, Engine, EngineDead, take
from ..spool.watcher import Wakeup
from .places import replica_places
from .wire import Msg

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


def reap_engines(settings: Settings, starting: bool = True) -> None:
    """End engine processes left by a daemon of this host that died by kill -9.

    The engine process exits when it loses the daemon, but vLLM's engine core
    under it may not (it outlives a kill -9 of its parent), and would hold its
    memory (a whole GPU) forever. Under systemd the unit's cgroup is
    cleaned anyway; this covers daemons started by hand. A pid is only killed
    when its start time matches the record, so a reused pid is safe. STARTING:
    a record under this daemon's own pid is a dead predecessor's (a reused
    pid); later it is this daemon's own warm engine, never reaped.
    """
    import psutil

    host = socket.gethostname()
    for path, owner in settings.layout.engine_pidfiles(host):
        mine = owner == str(os.getpid())
        if mine and not starting:
            continue
        if owner.isdigit() and psutil.pid_exists(int(owner)) and not mine:
            continue
        for pid in kill_recorded(path):
            log.warning("engine_orphan_killed", pid=pid)
        path.unlink(missing_ok=True)


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
            self.conn.send((profile, models_dir, media or {}))
            reply = self._recv() or ()
        except (EngineDead, OSError) as exc:
            # Killed while loading (the OOM killer, a kill): an engine death, not
            # a model that cannot load; the daemon loads again after a backoff.
            self.close()
            raise EngineDead(f"engine process for {profile.name} died while loading: "
                             f"{exc}") from None
        if reply[0] == Msg.DEAD:  # vLLM's own processes killed while loading
            self.close()
            raise EngineDead(f"vLLM's engine died while loading {profile.name}: {reply[1]}")
        if reply[0] != Msg.READY:
            self.close()
            cause = self.process.cause()
            raise RuntimeError(reply[1] + (f" (engine log: {cause})" if cause else ""))
        line, problems = reply[2]
        self.max_num_seqs = reply[3] if len(reply) > 3 else None
        log.info("engine_process_started", pid=self.process.pid, profile=profile.name,
                 where=self.where, vllm_load_s=round(reply[1], 2), capabilities=line)
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


class LocalProcess:
    """``python -m batchd.engine.host FD``, a child of the daemon, over a socket pair."""

    where = None

    def __init__(self, env: dict[str, str] | None, pidfile: Path | None):
        self.pidfile = pidfile
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchd.engine.host", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            # its own process group: vLLM's engine core and workers join it, so
            # they end with it even when it was killed alone (the OOM killer,
            # mid-load), instead of holding the model's memory as orphans
            start_new_session=True, env={**os.environ, **(env or {})})
        theirs.close()
        self.pid = self.proc.pid
        if pidfile is not None:
            record_children(pidfile, self.pid)  # the engine process, from the start
        assert self.proc.stdout is not None
        self.output = Output(self.proc.stdout)
        self.conn = Connection(ours.detach())

    def loaded(self) -> None:
        if self.pidfile is not None:
            record_children(self.pidfile, self.pid)

    def poll(self) -> int | None:
        return self.proc.poll()

    def cause(self) -> str | None:
        return self.output.cause()

    def end(self, timeout: float) -> int | None:
        try:
            # the exit seen without reaping it: its group cannot be reused before
            # kill_group below (vLLM's core and workers, should they outlive it)
            psutil_wait(self.pid, timeout)
        except subprocess.TimeoutExpired:
            log.warning("engine_process_killed", pid=self.pid,
                        reason=f"still running {timeout:.0f}s after close")
        kill_group(self.pid)
        self.proc.kill()
        self.proc.wait()
        if self.pidfile is not None:
            kill_recorded(self.pidfile)
            self.pidfile.unlink(missing_ok=True)
        self.output.thread.join(5)  # its last lines
        return self.proc.returncode


class Output:
    """Passes the engine process's output (vLLM's log) through to ours, line by
    line, and keeps the last lines: a failed load's root cause is printed by
    vLLM's engine core, while the exception the engine process sees only says
    "see root cause above"."""

    ERROR = re.compile(r"\b([A-Za-z_.]*(?:Error|Exception)): (.+)$")

    def __init__(self, stream: IO[bytes]):
        self.lines: deque[str] = deque(maxlen=300)
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True,
                                       name="batchd-engine-output")
        self.thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        from ..logs import engine_output  # stdout (the journal), or a log file

        out = engine_output()
        for raw in iter(stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip())
            try:
                out.write(raw)
                out.flush()
            except (OSError, ValueError):
                pass  # our own output is gone; keep draining the pipe
        stream.close()

    def cause(self) -> str | None:
        """The last 'SomeError: message' line that is not vLLM's summary."""
        for line in reversed(self.lines):
            found = self.ERROR.search(line)
            if found and "initialization failed" not in found.group(2):
                return f"{found.group(1)}: {found.group(2)}"[:500]
        return None


def psutil_wait(pid: int, timeout: float) -> None:
    """Wait until PID has exited (a zombie counts), without reaping it;
    subprocess.TimeoutExpired after TIMEOUT seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(str(pid), timeout)
        time.sleep(0.05)


def kill_group(leader: int) -> None:
    """SIGKILL what is left of the process group the engine process LEADER led
    (a group outlives its leader while members are left; its id cannot be
    reused until they are gone)."""
    try:
        os.killpg(leader, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left


def record_children(pidfile: Path, host: int) -> None:
    """Write the engine process HOST and every process under it (pid and start
    time) to PIDFILE, so they can be ended for sure, even by a daemon started
    after a kill -9 of this one."""
    import psutil

    lines = []
    try:
        root = psutil.Process(host)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return  # it is gone already: nothing to record
    for p in tree:
        try:
            lines.append(f"{p.pid} {p.create_time()}")
        except psutil.Error:
            continue  # one of vLLM's short-lived helpers, gone
    pidfile.write_text("\n".join(lines) + "\n")


def kill_recorded(pidfile: Path) -> list[int]:
    """Kill the processes PIDFILE lists that still run; a pid is only killed when
    its start time matches the record, so a reused pid is safe."""
    import psutil

    killed: list[int] = []
    try:
        lines = pidfile.read_text().split("\n")
    except FileNotFoundError:
        return killed
    for line in lines:
        try:
            pid, started = line.split()
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(started)) < 0.01:
                if os.getpgid(proc.pid) == proc.pid:  # an engine process: its whole group
                    kill_group(proc.pid)
                proc.kill()
                killed.append(int(pid))
        except (ValueError, OSError, psutil.Error):
            continue
    return killed
