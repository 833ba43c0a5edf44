"""The files and counters of one job while it runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import Settings
from .order import PrefixOrder
from .outbox import StatusFile, utc_now
from .profiles import Profile


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

    def out(self, suffix: str) -> Path:
        return self.settings.outbox / f"{self.name}.{suffix}"
