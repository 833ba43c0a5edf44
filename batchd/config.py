"""Configuration: one TOML file plus ``BATCHD_<SECTION>__<KEY>`` overrides.

Every default lives here, in one place. The file is found in this order:
``--config F``, ``$BATCHD_CONFIG``, ``./config.toml``, ``/etc/batchd/config.toml``;
with none of them, the defaults apply and relative paths are relative to the
current directory. Relative paths in a file are relative to that file's folder.
"""

from __future__ import annotations

import functools

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (BaseModel, ByteSize, ConfigDict, Field, HttpUrl, ValidationError,
                      field_validator, model_validator)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .config_problems import config_problem
from .layout import Layout

SEARCH_PATH = (Path("config.toml"), Path("/etc/batchd/config.toml"))

# Keys an older batchd read that a config may still name: accepted so it starts,
# and the daemon warns at start with what replaced each (Settings.retired).
RETIRED = {
    "scheduling.part_lines": "a daemon now drives every GPU of its host itself, "
                             "see [engine] replicas (jobs are no longer cut in parts)",
}



@functools.lru_cache(maxsize=16)
def _layout(root: Path) -> Layout:
    """One Layout a spool root: asked for on every turn of the loop."""
    return Layout(root)

class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpoolConfig(_Section):
    root: Path = Path("spool")
    umask: int = 0o027  # outputs are not world-readable by default


class WatchConfig(_Section):
    mode: Literal["auto", "inotify", "poll"] = "auto"
    poll_interval: float = Field(1.0, gt=0)
    settle_seconds: float = Field(1.0, ge=0)
    require_ready_marker: bool = False


class RoutingConfig(_Section):
    profiles_dir: Path = Path("profiles")
    default_profile: str = "smollm2-135m"
    models_dir: Path = Path("models")  # where `batchd models prepare` builds models


class LimitsConfig(_Section):
    # Sizes take a number of bytes or a string such as "10GiB" (pydantic's ByteSize).
    max_file_bytes: ByteSize = Field(ByteSize(10 * 1024**3), gt=0)
    max_line_bytes: ByteSize = Field(ByteSize(8 * 1024**2), gt=0)
    max_requests: int = Field(1_000_000, gt=0)


class EngineConfig(_Section):
    # Requests in flight inside vLLM at once. 0 (auto): vLLM's max_num_seqs and a
    # quarter more, so its batch stays full while its own queue stays short (a job
    # that joins waits behind few requests); a number fixes it.
    window: int = Field(0, ge=0)
    checkpoint_every: int = Field(64, ge=1)  # fsync the checkpoint after this many answers ...
    checkpoint_seconds: float = Field(1.0, gt=0)  # ... or after this long, whichever first
    max_engine_failures: int = Field(2, ge=1)
    # After an engine death (while loading too) the next load waits this long,
    # doubled with each death of the same jobs, up to a minute.
    restart_backoff_seconds: float = Field(2.0, ge=0)
    # Free the model after this many seconds without work (0: keep it loaded), so
    # a GPU shared with other users is given back; the next job loads it again.
    idle_unload_seconds: float = Field(0.0, ge=0)
    # The order a file's requests reach the engine: "prefix" groups those sharing a
    # prompt prefix for vLLM's prefix cache (batchd/jobs/order.py); "input" is file order.
    # Results are published in input order either way; a sidecar may choose.
    order: Literal["prefix", "input"] = "prefix"
    # Engine processes of the loaded profile on this host, dealt one stream by
    # prefix family (batchd/engine/replicas.py): a number, or "auto" = one per
    # tensor_parallel_size x pipeline_parallel_size visible GPUs (1 without GPUs).
    # On the CPU build each replica runs on its own share of the cores.
    replicas: int | Literal["auto"] = "auto"
    # How requests are dealt to replicas: "prefix" keeps a prefix family on one
    # replica while it has room (its prompt prefix is computed once there);
    # "least_loaded" sends each to the least busy replica (for comparison).
    replica_dealing: Literal["prefix", "least_loaded"] = "prefix"

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("replicas must be 1 or more, or \"auto\"")
        return value


class ClusterConfig(_Section):
    # A Ray cluster to place the replicas on (batchd/engine/cluster.py; needs
    # `pip install 'batchd[ray]'`): "auto" (the cluster `ray start` made on this
    # host) or "HOST:PORT" of its head. Unset: every replica runs on this host.
    ray_address: str | None = None
    # What one replica asks Ray for on nodes without GPUs (with GPUs it asks for
    # tensor_parallel_size x pipeline_parallel_size of them).
    cpus_per_replica: float = Field(1.0, gt=0)
    # How long a replica waits for a node with room before it counts as not
    # placed (it is tried again after the restart backoff; no line fails for it).
    place_timeout_seconds: float = Field(120.0, gt=0)


class SchedulingConfig(_Section):
    # A job in work/ whose owner on another host has not refreshed its lease for
    # this long is taken over (same-host owners are checked by pid at once).
    lease_seconds: float = Field(60.0, gt=0)
    # A file waiting longer than this runs next even if another profile is loaded:
    # the running jobs make way (yield) and resume after it.
    max_wait_seconds: float = Field(600.0, ge=0)
    # Jobs for the loaded profile that run at once in its engine, sharing its window.
    max_running_jobs: int = Field(8, ge=1)
    # Retired (RETIRED above): read by nothing, accepted so an old config starts.
    part_lines: int | None = Field(None, ge=0)


class CacheConfig(_Section):
    # Reuse the answers of deterministic lines (temperature 0 or a seed) when the
    # same request reaches the same model and engine settings (batchd/spool/cache.py).
    enabled: bool = False
    folder: Path | None = None  # default: the spool's cache/ folder
    size_limit: ByteSize = Field(ByteSize(1024**3), gt=0)  # least recently used go first


class MediaConfig(_Section):
    # Images in lines (batchd/jobs/images.py): a job's media folder, inbox/NAME.media/,
    # is kept as outbox/JOB.media/ at the end (false: removed). http(s) image URLs
    # are fetched only from these hosts (vLLM's allowed_media_domains); none by default.
    keep: bool = True
    allowed_domains: list[str] = Field(default_factory=list)


class HooksConfig(_Section):
    # A command run once per job final state: an argv list, no shell. Its
    # environment names the job, its state, counts and outbox files (docs/FORMATS.md).
    on_final: list[str] = Field(default_factory=list)
    on_final_timeout: float = Field(60.0, gt=0)  # then its process group is killed
    # An OpenAI-shaped event (batch.completed, ...) POSTed per job final state,
    # signed the Standard Webhooks way with the whsec_ secret in the file; retried
    # with backoff (doubling from webhook_backoff_seconds, at most an hour apart),
    # across restarts, until a 2xx or webhook_deadline_seconds after the job ended.
    webhook_url: HttpUrl | None = None
    webhook_secret_file: Path | None = None
    webhook_timeout: float = Field(10.0, gt=0)
    webhook_backoff_seconds: float = Field(5.0, gt=0)
    webhook_deadline_seconds: float = Field(86400.0, gt=0)

    @model_validator(mode="after")
    def _secret_with_url(self) -> HooksConfig:
        if self.webhook_url is not None and self.webhook_secret_file is None:
            raise ValueError("webhook_url needs webhook_secret_file (a whsec_ secret)")
        return self

    @property
    def any(self) -> bool:
        return bool(self.on_final) or self.webhook_url is not None


class StatusConfig(_Section):
    interval: float = Field(2.0, gt=0)


class MetricsConfig(_Section):
    textfile: Path | None = None


class ApiConfig(_Section):
    # `batchd api`: where it listens (--listen wins) and the file of bearer keys
    # (one a line). Without keys it refuses any address but localhost.
    listen: str = "127.0.0.1:8080"
    keys_file: Path | None = None


class LogConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseSettings):
    """The whole configuration of one daemon."""

    model_config = SettingsConfigDict(
        env_prefix="BATCHD_", env_nested_delimiter="__", extra="forbid"
    )

    spool: SpoolConfig = SpoolConfig()
    watch: WatchConfig = WatchConfig()
    routing: RoutingConfig = RoutingConfig()
    limits: LimitsConfig = LimitsConfig()
    engine: EngineConfig = EngineConfig()
    cluster: ClusterConfig = ClusterConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    cache: CacheConfig = CacheConfig()
    media: MediaConfig = MediaConfig()
    hooks: HooksConfig = HooksConfig()
    status: StatusConfig = StatusConfig()
    metrics: MetricsConfig = MetricsConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()

    source: Path | None = None  # the file these settings came from

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment wins over them.
        return env_settings, init_settings

    @property
    def layout(self) -> Layout:
        """Every path of this spool and of its jobs (batchd/layout.py)."""
        return _layout(self.spool.root)

    @property
    def inbox(self) -> Path:
        return self.layout.inbox

    def retired(self) -> dict[str, str]:
        """The retired keys this configuration names (file or environment), each
        with what replaced it."""
        named = {}
        for key, instead in RETIRED.items():
            section, name = key.split(".")
            if getattr(getattr(self, section), name) is not None:
                named[key] = instead
        return named

    @property
    def work(self) -> Path:
        return self.layout.work

    @property
    def outbox(self) -> Path:
        return self.layout.outbox

    @property
    def failed(self) -> Path:
        return self.layout.failed


def find_config(explicit: str | os.PathLike | None = None) -> Path | None:
    """The config file to read, or None when there is none anywhere."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    env = os.environ.get("BATCHD_CONFIG")
    if env:
        if not Path(env).is_file():
            raise ConfigError(f"config file not found: {env} (from $BATCHD_CONFIG)")
        return Path(env)
    return next((p for p in SEARCH_PATH if p.is_file()), None)


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(dotted key, message) of a pydantic error's first problem: what batchd
    reports for a bad config, profile, sidecar or request line."""
    err = exc.errors()[0]
    return ".".join(str(p) for p in err["loc"]), err["msg"]


def load_settings(explicit: str | os.PathLike | None = None) -> Settings:
    """Read, validate and resolve the configuration; raise ConfigError on any problem."""
    path = find_config(explicit)
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(config_problem(exc.errors()[0], path, Settings, RETIRED)) from None
    base = path.resolve().parent if path else Path.cwd()
    settings.source = path.resolve() if path else None
    settings.spool.root = _resolve(base, settings.spool.root)
    settings.routing.profiles_dir = _resolve(base, settings.routing.profiles_dir)
    settings.routing.models_dir = _resolve(base, settings.routing.models_dir)
    if settings.metrics.textfile is not None:
        settings.metrics.textfile = _resolve(base, settings.metrics.textfile)
    if settings.cache.folder is not None:
        settings.cache.folder = _resolve(base, settings.cache.folder)
    if settings.hooks.webhook_secret_file is not None:
        settings.hooks.webhook_secret_file = _resolve(base, settings.hooks.webhook_secret_file)
    if settings.api.keys_file is not None:
        settings.api.keys_file = _resolve(base, settings.api.keys_file)
    return settings


def _resolve(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path)
