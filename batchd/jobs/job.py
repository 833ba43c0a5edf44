"""The files and counters of one job while it runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..spool.checkpoint import Tally
from ..config import Settings
from .order import PrefixOrder
from ..spool.outbox import StatusFile, utc_now
from ..profiles import Profile


@dataclass
class Job:
    """The files and counters of one job while it runs."""

    name: str
    settings: Settings
    status: StatusFile = field(init=False)
    profile: Profile | None = None
    order: PrefixOrder | None = None  # None: requests go to the engine in input order
    total: int = 0
    waited: float = 0.0  # seconds in the inbox before the claim
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=utc_now)
    # seconds spent, for the bench record
    queued_s: float = 0.0  # in the inbox and until generation could start
    load_s: float = 0.0  # loading models (0 on a warm engine)
    gen_s: float = 0.0  # stepping the engine
    first_result_s: float | None = None  # from the claim to the first answer
    deadline: datetime | None = None  # its completion window's end (sidecar), if any

    def __post_init__(self) -> None:
        self.status = StatusFile(self.settings.outbox / f"{self.name}.status.jsonl", self.name)

    @property
    def input(self) -> Path:
        return self.settings.work / f"{self.name}.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.settings.work / f"{self.name}.ckpt.jsonl"

    @property
    def sidecar(self) -> Path | None:
        path = self.settings.work / f"{self.name}.toml"
        return path if path.exists() or path.is_symlink() else None

    @property
    def order_name(self) -> str:
        return "input" if self.order is None else "prefix"

    def progress(self, tally: Tally, done_now: int, seconds: float) -> dict[str, Any]:
        """The counting fields of a status line: DONE_NOW answers in SECONDS give
        the rates and the time left."""
        rate = done_now / seconds if seconds > 0 else 0.0
        remaining = self.total - tally.completed - tally.failed
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
            "eta_s": round(remaining / rate, 1) if rate > 0 else None,
        }

    def out(self, suffix: str) -> Path:
        return self.settings.outbox / f"{self.name}.{suffix}"
