"""Engine replicas on the nodes of a Ray cluster (``[cluster] ray_address``).

Ray does what Ray is for: it places each replica on a node with the resources
one replica needs (``num_gpus`` = tensor x pipeline parallel, or ``num_cpus`` =
``cpus_per_replica`` on nodes without GPUs), spreads them over the nodes, and
says when an actor or its node is gone. batchd keeps what is its own: the one
stream dealt by prefix family (``replicas.py``), the checkpoint, the
publication. vLLM's own Ray executor is not used (the CPU build refuses it, and
one engine per replica needs none).

A replica is a small Ray actor, ``EngineHostActor``, that starts the usual
engine process on its node (``python -m batchd.engine.host --connect
HOST:PORT``). That process dials the daemon, proves a per-replica secret (32
random bytes, multiprocessing's HMAC challenge both ways) and speaks the same
wire as a local one (``wire.py``), so nothing above ``HostedEngine`` tells a
remote replica from a local one. The wire stays ours rather than Ray calls
because it is a stream with back-pressure (the engine asks for requests as it
has room, answers come in bunches) that already survives deaths, and a Ray
object per bunch would add a copy through Ray's object store for nothing.

Deaths: the engine process ends with its actor (it watches its parent); the
daemon sees the wire close, or Ray reports the actor or its node gone, and the
replica set deals its in-flight requests again. A replica that no node has
room for within ``place_timeout_seconds`` is ``Unplaced``: tried again later,
not a death.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import structlog

from ..config import ConfigError, Settings
from ..profiles import Profile
from ..spool.watcher import Wakeup
from . import Engine, EngineDead, Unplaced
from .hosted import HostedEngine
from .processes import Output, kill_group, psutil_wait
from .places import gpus_per_replica

log = structlog.get_logger()

RAY_MISSING = ("[cluster] ray_address is set, but Ray is not installed here: "
               "pip install 'batchd[ray]'")
CONNECT_SECONDS = 120.0  # from the actor's start to the engine process dialling back
HANDSHAKE_TIMEOUT = struct.pack("ll", 10, 0)  # seconds, microseconds: the secret's exchange
NO_TIMEOUT = struct.pack("ll", 0, 0)


def require_ray() -> None:
    """ConfigError naming the extra when Ray is not installed."""
    try:
        import ray  # noqa: F401 - only whether it imports
    except ImportError:
        raise ConfigError(RAY_MISSING) from None


def connect(address: str) -> Any:
    """Ray, joined to the cluster at ADDRESS as this daemon's driver (once). A
    cluster on 127.0.0.1 keeps the driver on the loopback address too."""
    loopback = address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost")
    if loopback:  # else Ray swaps 127.0.0.1 for the host's address and dials that
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    if not ray.is_initialized():
        extra: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if loopback else {}
        ray.init(address=address, namespace="batchd", log_to_driver=True,
                 logging_level=logging.WARNING, **extra)
        log.info("ray_connected", address=address, nodes=len(ray.nodes()),
                 resources=ray.cluster_resources())
    return ray


def replica_ask(ray: Any, profile: Profile, replicas: int | str,
                cpus_per_replica: float) -> tuple[int, dict[str, float]]:
    """How many replicas of PROFILE ("auto": as many as the cluster's resources
    hold now) and what each asks Ray for."""
    total = ray.cluster_resources()
    width = gpus_per_replica(profile)
    if total.get("GPU", 0) > 0:
        ask = {"num_gpus": float(width), "num_cpus": 0.0}
        fits = int(total["GPU"] // width)
    else:
        ask = {"num_cpus": float(cpus_per_replica)}
        fits = int(total.get("CPU", 0) // cpus_per_replica)
    return (max(1, fits) if replicas == "auto" else int(replicas)), ask


def ray_replicas(profile: Profile, settings: Settings, media: dict[str, Any]) -> Engine:
    """PROFILE's replicas placed by Ray, as one engine (a ReplicaSet)."""
    from .replicas import ReplicaSet

    ray = connect(settings.cluster.ray_address or "auto")
    count, ask = replica_ask(ray, profile, settings.engine.replicas,
                             settings.cluster.cpus_per_replica)
    starting: dict[int, RayProcess] = {}  # a load in progress, to end on close

    def start(profile: Profile, replica: int) -> Engine:
        process = RayProcess(ray, ask, settings.cluster.place_timeout_seconds,
                             lambda p: starting.__setitem__(replica, p))
        try:
            return HostedEngine(profile, settings.routing.models_dir, wake=Wakeup(),
                                media=media, owns_wake=True, process=process)
        finally:
            starting.pop(replica, None)

    def abort(replica: int) -> None:
        process = starting.get(replica)
        if process is not None:
            process.kill()

    def wanted() -> int:  # "auto": as many as the cluster holds now
        return replica_ask(ray, profile, "auto", settings.cluster.cpus_per_replica)[0]

    return ReplicaSet(profile, count, start, lambda replica: "ray (placing)",
                      settings.engine.restart_backoff_seconds,
                      settings.engine.max_engine_failures,
                      dealing=settings.engine.replica_dealing, abort_load=abort,
                      wanted=wanted if settings.engine.replicas == "auto" else None)


class RayProcess:
    """An engine process started on a Ray node by an ``EngineHostActor`` (the
    ``EngineProcess`` of hosted.py): placed, dialled back, watched."""

    def __init__(self, ray: Any, ask: dict[str, float], place_timeout: float,
                 started: Any = None):
        self.ray = ray
        self.code: int | None = None
        self.last_cause: str | None = None
        address = ray.util.get_node_ip_address()
        secret = os.urandom(32)
        listener = socket.create_server((address, 0))
        try:
            actor_class = ray.remote(EngineHostActor)
            self.actor = actor_class.options(
                **ask, scheduling_strategy="SPREAD", max_concurrency=4, max_restarts=0
            ).remote()
            if started is not None:
                started(self)  # close() may end it from here on
            pending = self.actor.start.remote(address, listener.getsockname()[1],
                                              secret.hex())
            ready, _ = ray.wait([pending], timeout=place_timeout)
            if not ready:
                raise Unplaced(f"no node of the Ray cluster had room for a replica "
                               f"({ask}) within {place_timeout:.0f}s")
            try:
                info = ray.get(pending)
            except Exception as exc:  # noqa: BLE001 - the actor or its node died
                raise EngineDead(f"replica's Ray actor lost while starting: {exc}") from None
            self.pid = int(info["pid"])
            self.where: str | None = str(info["where"])
            self.watch = self.actor.wait.remote()  # ready when its engine process exits
            self.conn = self._accept(listener, secret)
        except BaseException:
            self.kill()
            raise
        finally:
            listener.close()

    def _accept(self, listener: socket.socket, secret: bytes) -> Connection:
        """The engine process dialling back with the secret; anyone else is turned away."""
        deadline = time.monotonic() + CONNECT_SECONDS
        while time.monotonic() < deadline:
            if select.select([listener], [], [], 0.5)[0]:
                sock, _ = listener.accept()
                # a peer that says nothing must not hold the handshake forever: a
                # receive timeout in the kernel (settimeout would make the socket
                # non-blocking, which Connection's reads do not expect)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, HANDSHAKE_TIMEOUT)
                conn = Connection(sock.detach())
                try:
                    deliver_challenge(conn, secret)
                    answer_challenge(conn, secret)
                    clear = socket.socket(fileno=os.dup(conn.fileno()))
                    clear.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, NO_TIMEOUT)
                    clear.close()
                    return conn
                except (AuthenticationError, OSError, EOFError) as exc:
                    log.warning("engine_connect_refused", error=str(exc))
                    conn.close()
                    continue
            code = self.poll()
            if code is not None:
                raise EngineDead(f"engine process on {self.where} exited with code {code} "
                                 f"before it connected (Ray's worker log has its output)")
        raise EngineDead(f"engine process on {self.where} did not connect within "
                         f"{CONNECT_SECONDS:.0f}s")

    def loaded(self) -> None:
        pass  # its node's processes end with the actor (host.py's parent watch)

    def poll(self) -> int | None:
        if self.code is None:
            ready, _ = self.ray.wait([self.watch], timeout=0)
            if ready:
                try:
                    self.code = int(self.ray.get(self.watch))
                except Exception:  # noqa: BLE001 - the actor or its node is gone
                    self.code = -9
        return self.code

    def cause(self) -> str | None:
        if self.last_cause is None and self.code is None:
            try:
                self.last_cause = self.ray.get(self.actor.cause.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - gone: nothing to read
                pass
        return self.last_cause

    def end(self, timeout: float) -> int | None:
        self.cause()  # read before the actor goes
        try:
            self.code = int(self.ray.get(self.actor.stop.remote(timeout), timeout=timeout + 15))
        except Exception:  # noqa: BLE001 - the actor or its node is gone already
            pass
        self.kill()
        return self.code

    def kill(self) -> None:
        actor = getattr(self, "actor", None)
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - gone already
                pass


class EngineHostActor:
    """The Ray actor of one replica: starts the engine process on its node and
    reports it ending. Its output (vLLM's log) goes to the actor's own log, which
    Ray passes on to the daemon's."""

    def start(self, address: str, port: int, key: str) -> dict[str, Any]:
        import ray

        env = {**os.environ, "BATCHD_ENGINE_KEY": key, "BATCHD_ENGINE_PARENT": str(os.getpid())}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchd.engine.host", "--connect", f"{address}:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env=env)
        assert self.proc.stdout is not None
        self.output = Output(self.proc.stdout)
        context = ray.get_runtime_context()
        gpus = ray.get_gpu_ids()
        cores = os.environ.get("BATCHD_ENGINE_CPUS")
        where = f"{socket.gethostname()} ray:{context.get_node_id()[:8]}"
        if gpus:
            where += f" GPU{','.join(map(str, gpus))}"
        elif cores:
            where += f" cores {cores}"
        return {"pid": self.proc.pid, "where": where}

    def wait(self) -> int:
        psutil_wait(self.proc.pid, 10.0 ** 9)  # its exit, not reaped yet ...
        kill_group(self.proc.pid)  # ... so its group (vLLM's processes) goes first
        return self.proc.wait()

    def cause(self) -> str | None:
        return self.output.cause()

    def stop(self, timeout: float) -> int:
        try:
            psutil_wait(self.proc.pid, timeout)
        except subprocess.TimeoutExpired:
            pass
        kill_group(self.proc.pid)
        self.proc.kill()
        return self.proc.wait()
