"""The engine in its own process, so that switching profiles frees everything.

vLLM does not reliably give back GPU memory when a model is dropped inside a
living process (CUDA context, allocator caches, compiled graphs, its own
worker processes). The only release that is guaranteed is a process exit. So
every loaded model lives in a child, ``python -m batchd.enginehost``, which runs
``VllmEngine`` and nothing else; ``HostedEngine`` is its stand-in in the daemon.
Closing it ends the child and the vLLM processes under it, and the daemon
itself never imports vLLM or torch.

The two talk over a socket pair with multiprocessing's message framing:

    daemon -> host   (profile, models_dir)            once, at start
    host -> daemon   ("ready", load_seconds) | ("error", text)
    daemon -> host   ("stream", sampling, window)     one job's requests follow
    host -> daemon   ("want", n)                      send up to n more requests
    daemon -> host   ("requests", [Request, ...])     an empty list: no more
    host -> daemon   ("answers", [(line, body, error), ...])  every 0.1-0.25 s
    daemon -> host   ("abort",)                       stop this stream early
    host -> daemon   ("end",) | ("dead", text)        the stream is over
    daemon -> host   ("close",) or end of file        exit

The host ignores SIGINT and SIGTERM: the daemon decides when it ends (a Ctrl-C
in a terminal reaches the whole process group, and the drain still needs the
engine for its last step). If the daemon dies, the host reads end of file or a
broken pipe and exits, taking vLLM's engine core with it.
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
from itertools import islice
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, Generator, Iterable, Iterator

import structlog

from .engine import Answer, EngineDead
from .lines import Request
from .profiles import Profile

log = structlog.get_logger()

WANT = 256  # requests per round trip: few messages, little read ahead
FLUSH_SECONDS = 0.1  # answers go back at most this often ...
QUIET_SECONDS = 0.25  # ... and something goes back at least this often
CLOSE_SECONDS = 30.0  # a clean vLLM shutdown; after this the host is killed


class HostedEngine:
    """An engine whose model lives in a child process; see the module text."""

    def __init__(self, profile: Profile, models_dir: Path, pidfile: Path | None = None):
        self.profile = profile
        self.pidfile = pidfile
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchd.enginehost", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        theirs.close()
        assert self.proc.stdout is not None
        self.output = Output(self.proc.stdout)
        self.conn = Connection(ours.detach())
        try:
            self.conn.send((profile, models_dir))
            reply = self._recv()
        except EngineDead as exc:
            reply = ("error", f"engine process for {profile.name} ended while loading: {exc}")
        if reply[0] != "ready":
            self.close()
            cause = self.output.cause()
            raise RuntimeError(reply[1] + (f" (engine log: {cause})" if cause else ""))
        log.info("engine_process_started", pid=self.proc.pid, profile=profile.name,
                 vllm_load_s=round(reply[1], 2))
        if pidfile is not None:
            record_children(pidfile)

    def _recv(self) -> tuple:
        """The next message; EngineDead when the host is gone."""
        try:
            while not self.conn.poll(0.5):
                # vLLM's engine core, forked from the host, may hold our socket
                # open after the host died: do not wait for end of file alone.
                if self.proc.poll() is not None:
                    raise EngineDead(f"engine process exited with code {self.proc.returncode}")
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineDead(f"engine process lost: {exc or type(exc).__name__}") from None

    def stream(self, requests: Iterable[Request], sampling: dict[str, Any], window: int
               ) -> Generator[list[Answer], None, None]:
        source = iter(requests)
        inflight: dict[int, Request] = {}  # line -> request, sent and not answered
        over = False
        try:
            self.conn.send(("stream", sampling, window))
            while True:
                message = self._recv()
                if message[0] == "want":
                    batch = list(islice(source, message[1]))
                    inflight.update((r.line, r) for r in batch)
                    self.conn.send(("requests", batch))
                elif message[0] == "answers":
                    yield [Answer(inflight.pop(line), body, error)
                           for line, body, error in message[1]]
                else:
                    over = True
                    if message[0] == "dead":
                        raise EngineDead(message[1])
                    return
        except (BrokenPipeError, ConnectionError) as exc:
            over = True
            raise EngineDead(f"engine process lost: {exc}") from None
        finally:
            if not over:
                self._abort()

    def _abort(self) -> None:
        """Stop a stream early: the host aborts what is in flight; answers still
        on their way are dropped (their lines run again in a later stream)."""
        try:
            self.conn.send(("abort",))
            while self._recv()[0] not in ("end", "dead"):
                pass
        except (EngineDead, OSError):
            pass  # a dead host has nothing in flight

    def close(self) -> None:
        """End the host and every process under it."""
        try:
            self.conn.send(("close",))
        except OSError:
            pass
        try:
            self.proc.wait(CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("engine_process_killed", pid=self.proc.pid,
                        reason=f"still running {CLOSE_SECONDS:.0f}s after close")
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        if self.pidfile is not None:
            kill_recorded(self.pidfile)  # vLLM's core, should it outlive the host
            self.pidfile.unlink(missing_ok=True)
        self.output.thread.join(5)  # its last lines
        log.info("engine_process_ended", pid=self.proc.pid, code=self.proc.returncode)


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
        out = sys.stdout.buffer
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


def record_children(pidfile: Path) -> None:
    """Write every process under this one (pid and start time) to PIDFILE, so the
    engine's processes can be ended for sure, even by a daemon started after a
    kill -9 of this one."""
    import psutil

    me = psutil.Process()
    lines = [f"{p.pid} {p.create_time()}" for p in me.children(recursive=True)]
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
                proc.kill()
                killed.append(int(pid))
        except (ValueError, psutil.Error):
            continue
    return killed


# -- the child ------------------------------------------------------------------

class _Aborted(Exception):
    pass


def serve(conn: Connection) -> int:
    """Load the profile's model, then answer streams until told to close."""
    from .vllm_engine import VllmEngine

    profile, models_dir = conn.recv()
    try:
        engine = VllmEngine(profile, models_dir)
    except Exception as exc:  # noqa: BLE001 - the daemon reports it as the job's error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return 1
    conn.send(("ready", engine.load_seconds))
    try:
        while True:
            message = conn.recv()
            if message[0] == "close":
                break
            if message[0] == "stream" and not _stream(conn, engine, *message[1:]):
                return 1  # the engine died; this process cannot serve again
    except (EOFError, OSError):
        pass  # the daemon is gone
    finally:
        engine.close()
    return 0


def _stream(conn: Connection, engine: Any, sampling: dict[str, Any], window: int) -> bool:
    """One stream; False when the engine died in it.

    Answers are sent in bunches, at most every FLUSH_SECONDS, and something is
    sent at least every QUIET_SECONDS (an empty bunch when nothing finished),
    so the daemon checkpoints, reports and acts on cancel and stop in time
    without waking up, and taking a core from the engine, after every step.
    An answer goes back as (line, body, error): the daemon has the request.
    """

    def requests() -> Iterator[Request]:
        while True:
            conn.send(("want", min(WANT, window)))
            message = conn.recv()
            if message[0] == "abort":
                raise _Aborted
            if not message[1]:
                return
            yield from message[1]

    answers = engine.stream(requests(), sampling, window)
    bunch: list[tuple] = []
    sent = time.monotonic()
    try:
        for batch in answers:
            bunch.extend((a.request.line, a.body, a.error) for a in batch)
            waited = time.monotonic() - sent
            if (bunch and waited >= FLUSH_SECONDS) or waited >= QUIET_SECONDS \
                    or len(bunch) >= WANT:
                conn.send(("answers", bunch))
                bunch, sent = [], time.monotonic()
            if conn.poll() and conn.recv()[0] == "abort":
                bunch = []  # the daemon drops what is in flight; so do we
                break
    except _Aborted:
        bunch = []
    except EngineDead as exc:
        conn.send(("answers", bunch))  # finished before the death: keep them
        conn.send(("dead", str(exc)))
        return False
    finally:
        answers.close()  # aborts what is still in flight
    if bunch:
        conn.send(("answers", bunch))
    conn.send(("end",))
    return True


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
