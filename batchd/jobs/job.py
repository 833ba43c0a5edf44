"""One job while it runs: its files, checkpoint, log and counters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import structlog

from ..config import Settings
from ..layout import Layout
from ..profiles import Profile
from ..spool.cache import ResultCache
from ..spool.checkpoint import Checkpoint, LineSet, Tally
from ..clock import Wall, utc_now, wall
from ..spool.outbox import StatusFile, anthropic_line
from .order import PrefixOrder
from .router import Routes


@dataclass
class Job:
    """One job while it runs: its files, status, checkpoint, log and counters.
    The runner passes this one object through every step."""

    name: str
    settings: Settings
    status: StatusFile = field(init=False)
    ckpt: Checkpoint = field(init=False)
    log: Any = field(init=False)  # structlog's logger, bound to the job (and its profile)
    profile: Profile | None = None
    order: PrefixOrder | None = None  # None: requests go to the engine in input order
    total: int = 0
    waited: float = 0.0  # seconds in the inbox before the claim
    wall: Wall = wall  # the daemon's wall clock: its completion window is checked on it
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=utc_now)
    # seconds spent, for the bench record
    queued_s: float = 0.0  # in the inbox and until generation could start
    load_s: float = 0.0  # loading models (0 on a warm engine)
    gen_s: float = 0.0  # stepping the engine
    first_result_s: float | None = None  # from the claim to the first answer
    deadline: datetime | None = None  # its completion window's end (sidecar), if any
    # set when routed: the sidecar's sampling defaults and priority (higher first)
    sidecar_sampling: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    # a file whose lines name several profiles runs in stages, one per profile
    # (router.Routes); ``profile`` is the stage running or next, ``stages`` the
    # profiles still to run, that one first
    routes: Routes | None = None
    stages: list[Profile] = field(default_factory=list)
    # engine deaths while it ran (in this daemon): a job with any runs alone
    # from then on, so a file that kills the engine fails itself, not its neighbours
    deaths: int = 0
    # what it shared the engine with while it ran (batchd/jobs/session.py)
    overlapped: set[str] = field(default_factory=set)
    engine_tokens: list[int] = field(default_factory=lambda: [0, 0])  # prompt, completion
    # what each engine replica answered of it (engine/replicas.py), by where it runs
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)
    anthropic: LineSet = field(default_factory=LineSet)  # lines in Anthropic's batch format
    retry_of: str | None = None  # a retry publishes a merged file (jobs/retry.py)
    retry_codes: list[str] = field(default_factory=list)
    # the result cache, unless off (config or sidecar); lines sent to the engine
    # whose answers are to be stored: line -> key
    cache: ResultCache | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    cache_pending: dict[int, str] = field(default_factory=dict)
    images: int = 0  # in its valid lines, for the bench record (jobs/images.py)

    def __post_init__(self) -> None:
        self.status = StatusFile(self.layout.status(self.name), self.name)
        self.log = structlog.get_logger().bind(job=self.name)

    def open_checkpoint(self) -> Checkpoint:
        """Read (or start) the checkpoint; answered lines are never asked again."""
        engine = self.settings.engine
        self.ckpt = Checkpoint(self.checkpoint, engine.checkpoint_every,
                               engine.checkpoint_seconds)
        return self.ckpt

    @property
    def layout(self) -> Layout:
        return self.settings.layout

    @property
    def input(self) -> Path:
        return self.layout.input(self.name)

    @property
    def checkpoint(self) -> Path:
        return self.layout.checkpoint(self.name)

    @cached_property
    def media(self) -> Path | None:
        """work/media/JOB/, the job's media folder, when one came with the file
        (looked up once: after validation has moved it in, for every request)."""
        path = self.layout.media(self.name)
        return path if path.is_dir() else None

    @property
    def sidecar(self) -> Path | None:
        path = self.layout.sidecar(self.name)
        return path if path.exists() or path.is_symlink() else None

    @property
    def answered(self) -> int:
        return self.ckpt.tally.completed + self.ckpt.tally.failed

    @property
    def order_name(self) -> str:
        return "input" if self.order is None else "prefix"

    def progress(self, done_now: int = 0, seconds: float = 0.0,
                 pace: float | None = None) -> dict[str, Any]:
        """The counting fields of a status line: DONE_NOW answers in SECONDS give
        the rates; the time left comes from PACE (its recent rate) once it has one."""
        tally: Tally = self.ckpt.tally
        rate = done_now / seconds if seconds > 0 else 0.0
        remaining = self.total - tally.completed - tally.failed
        ahead = pace if pace else rate
        return {
            "profile": self.profile.name if self.profile else None,
            "model": self.profile.model if self.profile else None,
            "request_counts": {"total": self.total, "completed": tally.completed,
                               "failed": tally.failed},
            "tokens": {"prompt": tally.prompt_tokens, "completion": tally.completion_tokens,
                       "cached": tally.cached_tokens},
            "order": self.order_name,
            "throughput": {"requests_per_s": round(rate, 3),
                           "output_tokens_per_s": round(
                               tally.completion_tokens / seconds if seconds > 0 else 0.0, 3)},
            "eta_s": round(remaining / ahead, 1) if ahead > 0 else None,
            **({"cache": self.cache_counts()} if self.cache is not None else {}),
        }

    def record(self, line: int, kind: str, out: dict[str, Any]) -> None:
        """LINE's answer into the checkpoint ("result" or "error"), in its line's
        format: an Anthropic line's in Anthropic's result shape."""
        if line in self.anthropic:
            kind, out = anthropic_line(kind, out)
        self.ckpt.add(line, kind, out)

    def remember(self, line: int, body: dict[str, Any] | None) -> None:
        """An answer came for LINE: store it when the line was a cache miss."""
        key = self.cache_pending.pop(line, None)
        if key is not None and body is not None and self.cache is not None:
            self.cache.add(key, body)

    def cache_counts(self) -> dict[str, int] | None:
        return None if self.cache is None else {"hits": self.cache_hits,
                                                "misses": self.cache_misses}

    def out(self, kind: str) -> Path:
        return self.layout.out(self.name, kind)

    @property
    def sampling(self) -> dict[str, Any]:
        """The defaults under each line's own fields: the profile's, then the sidecar's."""
        assert self.profile is not None
        return {**self.profile.sampling, **self.sidecar_sampling}

    def profile_of(self, request: Any) -> str | None:
        """The profile a request runs on; None: its model is no profile's."""
        assert self.profile is not None
        return self.profile.name if self.routes is None else self.routes.of(request.model)

    def prefer(self, profile: Profile) -> bool:
        """Run PROFILE's lines first when it has some (it is loaded); whether it has."""
        for i, stage in enumerate(self.stages):
            if stage == profile:
                if i:
                    self.stages.insert(0, self.stages.pop(i))
                    self.profile = profile
                    self.log = self.log.bind(profile=profile.name)
                return True
        return False

    def next_stage(self) -> bool:
        """Done with the current profile's lines: move to the next stage, if any."""
        self.stages = self.stages[1:]
        if not self.stages:
            return False
        self.profile = self.stages[0]
        self.log = self.log.bind(profile=self.profile.name)
        return True

    def count_replicas(self, lines: list[dict[str, Any]]) -> None:
        """Add a stream's account by replica (ReplicaSet.take_job) to the job's."""
        for line in lines:
            mine = self.replicas.setdefault(line["where"], {
                "where": line["where"], "requests": 0, "output_tokens": 0, "generation_s": 0.0})
            mine["requests"] += line["requests"]
            mine["output_tokens"] += line["output_tokens"]
            mine["generation_s"] = round(mine["generation_s"] + line["generation_s"], 3)

    def concurrency(self) -> dict[str, Any]:
        """The bench record's account of a shared engine: the jobs that ran beside
        this one, and every token the engine answered while this one ran (its own
        included), so its throughput reads as a share, not as the engine's."""
        tally = self.ckpt.tally
        prompt, completion = self.engine_tokens
        return {"overlapped_jobs": sorted(self.overlapped),
                "engine_tokens": {"prompt": prompt, "completion": completion},
                "share_of_completion_tokens": round(tally.completion_tokens / completion, 4)
                if completion else None}
