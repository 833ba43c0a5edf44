"""Routing: which profile runs a job, in the contract's order.

1. the sidecar's ``profile``; 2. a ``PROFILE__`` file-name prefix naming a known
profile; 3. the lines' ``model`` when they all agree; 4. the default profile.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import first_error
from ..layout import INPUT
from ..jsonl import open_regular
from ..profiles import Profile, ProfileSet, SamplingDefaults


class JobRejected(Exception):
    """The whole file cannot run; ``code`` is the contract's error code."""

    def __init__(self, code: str, message: str, line: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.line = line


# A completion window: up to seven digits and a unit (s, m, h or d), as OpenAI's "24h".
WINDOW_PATTERN = r"^[0-9]{1,7}[smhd]$"
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str | None) -> timedelta | None:
    """A completion window such as "24h", "90m" or "2d"; None when TEXT is not one.
    The one parser of windows: sidecars and the HTTP API both use it."""
    if text is None or not re.fullmatch(WINDOW_PATTERN, text):
        return None
    return timedelta(seconds=int(text[:-1]) * WINDOW_UNITS[text[-1]])


class Sidecar(BaseModel):
    """``NAME.toml`` beside a dropped file: a profile, sampling defaults, a priority.

    Engine settings and model paths are refused: only profiles choose them.
    """

    model_config = ConfigDict(extra="forbid")

    profile: str | None = Field(None, min_length=1, max_length=200)
    priority: int = Field(0, ge=-1000, le=1000)
    sampling: SamplingDefaults = Field(default_factory=dict)
    order: Literal["prefix", "input"] | None = None  # None: the daemon's [engine] order
    # When unfinished lines give up (OpenAI's completion window): a duration from
    # the claim ("24h", "90m", "30s", "2d") or an absolute time (the HTTP API
    # writes the latter: the window of a batch counts from its creation).
    completion_window: str | None = Field(None, pattern=WINDOW_PATTERN)
    expires_at: datetime | None = None
    cache: bool = True  # false: this file's lines never use the result cache
    # written by `batchd retry`: the job whose failed lines (with these codes)
    # this one retries; it then publishes JOB.merged.jsonl (batchd/jobs/retry.py)
    retry_of: str | None = Field(None, pattern=r"^[A-Za-z0-9_+=@,][A-Za-z0-9._+=@,-]{0,199}$")
    retry_codes: list[str] = Field(default_factory=list, max_length=100)

    def deadline(self, claimed_at: datetime) -> datetime | None:
        """When the job expires, given when it was claimed; None: never."""
        if self.expires_at is not None:
            at = self.expires_at
            return at if at.tzinfo else at.replace(tzinfo=timezone.utc)
        window = parse_window(self.completion_window)
        return None if window is None else claimed_at + window



def read_sidecar(path: Path | None) -> Sidecar:
    if path is None:
        return Sidecar()
    try:
        with open_regular(path) as stream:  # never a symlink, FIFO or device
            raw = stream.read(65536 + 1)
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise JobRejected("invalid_sidecar", f"sidecar {path.name}: {exc}") from None
    try:
        return Sidecar(**data)
    except ValidationError as exc:
        key, msg = first_error(exc)
        raise JobRejected("invalid_sidecar", f"sidecar {path.name}: {key}: {msg}") from None


@dataclass
class ModelVote:
    """The ``model`` values seen in a job's lines."""

    models: dict[str, int] = field(default_factory=dict)  # model -> first line
    limit: int = 256
    over: int | None = None  # the first line naming a model past the limit

    def add(self, model: str | None, line: int) -> None:
        if model and model not in self.models:
            if len(self.models) < self.limit:
                self.models[model] = line
            elif self.over is None:
                self.over = line


@dataclass(frozen=True)
class Routes:
    """Where each line of a file whose lines name models runs (CONTRACT 3, per
    line): the profile its ``model`` names; a line without one runs with the
    file's first named profile; a model no profile knows is that line's
    ``model_not_found``. ``stages`` are the profiles with lines, first named first:
    the file runs on each in turn."""

    stages: tuple[Profile, ...]
    models: dict[str, str | None]  # model value -> profile name, None: unknown

    def of(self, model: str | None) -> str | None:
        return self.stages[0].name if not model else self.models.get(model)


def routes(reason: str, votes: ModelVote, profiles: ProfileSet) -> Routes | None:
    """Each line's profile when the lines' models chose (see Routes); None when
    one profile runs the whole file."""
    if not reason.startswith("lines' model"):
        return None
    models = {m: profiles.lookup(m) for m in votes.models}
    stages: dict[str, Profile] = {}
    for profile in models.values():
        if profile is not None:
            stages.setdefault(profile.name, profile)
    return Routes(tuple(stages.values()),
                  {m: p.name if p else None for m, p in models.items()})


def explain(models: list[str], profile: Profile, reason: str,
            found: Routes | None) -> list[str]:
    """For people (`batchd validate`): each model the lines name, and the profile
    that answers it, or model_not_found when the run gives its lines that error."""
    said = []
    for model in models:
        if found is not None:
            target = found.models.get(model)
            said.append(f"{model} \N{RIGHTWARDS ARROW} {target}" if target else
                        f"{model} \N{RIGHTWARDS ARROW} model_not_found (no profile serves it; "
                        f"its lines fail)")
        elif reason == "default":
            said.append(f"{model} \N{RIGHTWARDS ARROW} {profile.name} (default: no profile "
                        f"serves {model})")
        else:
            said.append(f"{model} \N{RIGHTWARDS ARROW} {profile.name} ({reason})")
    return said


def prefix_profile(job: str, profiles: ProfileSet) -> Profile | None:
    head, sep, _ = job.partition("__")
    return profiles.lookup(head) if sep and head else None


def route(job: str, sidecar: Sidecar, votes: ModelVote, profiles: ProfileSet,
          default: str) -> tuple[Profile, str]:
    """The profile for a job (for a file whose lines name several, the first
    named: ``routes`` gives each line's) and the reason; JobRejected if none."""
    if sidecar.profile is not None:
        profile = profiles.lookup(sidecar.profile)
        if profile is None:
            raise JobRejected("unknown_profile", f"sidecar names unknown profile "
                              f"{sidecar.profile!r}; known profiles: {profiles.known()}")
        return profile, "sidecar"
    profile = prefix_profile(job, profiles)
    if profile is not None:
        return profile, "filename prefix"
    if votes.over is not None:
        raise JobRejected("too_many_models", f"lines name more than {votes.limit} different "
                          "models", line=votes.over)
    known = [p for p in (profiles.lookup(m) for m in votes.models) if p is not None]
    if known:
        several = len({p.name for p in known}) > 1
        return known[0], "lines' models, per line" if several else "lines' model"
    # No line names a model a profile knows: the default profile runs them all
    # (as an OpenAI-compatible server with one model ignores `model`).
    profile = profiles.lookup(default)
    if profile is None:
        raise JobRejected("unknown_profile", f"default profile {default!r} is not known; "
                          f"known profiles: {profiles.known()}")
    return profile, "default"


def hint(path: Path, sidecar: Path, profiles: ProfileSet, default: str) -> str | None:
    """Where a waiting file will probably route, cheaply (its first line only):
    for scheduling, never for running. None when it cannot tell."""
    try:
        if sidecar.exists():
            named = read_sidecar(sidecar).profile
            if named:
                profile = profiles.lookup(named)
                return profile.name if profile else None
        job = path.name.removesuffix(INPUT)
        profile = prefix_profile(job, profiles)
        if profile is not None:
            return profile.name
        with open_regular(path) as stream:
            first = stream.readline(1 << 16)
        line = json.loads(first) if first.strip() else {}
        body = line["body"] if isinstance(line.get("body"), dict) else {}
        model = line.get("model") or body.get("model")
        profile = profiles.lookup(model) if isinstance(model, str) else None
        if profile is not None:
            return profile.name
    except (OSError, ValueError, AttributeError, RecursionError, JobRejected):
        return None  # a first line nested too deeply is the job's error, not the loop's
    profile = profiles.lookup(default)
    return profile.name if profile else None
