"""The engine processes of this host: started as children of the daemon over a
socket pair (``LocalProcess``), their output relayed line by line (``Output``),
and ended for sure: each leads its own process group, and its pids are
recorded with their start times, so a daemon started after a kill -9 of this
one ends what it left (``reap_engines``) and never a reused pid.
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
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO

import structlog

from ..config import Settings

log = structlog.get_logger()


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
