"""Model profiles: ``profiles/NAME.toml`` says which model a job runs and how.

Only profiles choose engines and models; a dropped sidecar can pick a profile
and sampling defaults, nothing else. A profile that does not validate is
reported with its file and key, and the others keep working.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .config import first_error

# Keyword arguments of vllm.LLM (its EngineArgs) that a profile may set. A
# static list keeps `batchd profiles` and validation free of the slow vLLM
# import; it holds only keys every supported release takes, and a vllm-marked
# test (tests/test_vllm_contract.py) checks it against the installed release.
# The engine process checks again at load (engine/serving.py, server_args), so
# a key a release dropped fails the load by name, never silently.
ENGINE_KEYS = frozenset(
    """
    tokenizer tokenizer_mode skip_tokenizer_init trust_remote_code revision
    tokenizer_revision code_revision download_dir load_format dtype kv_cache_dtype
    seed max_model_len quantization enforce_eager max_num_seqs
    max_num_batched_tokens enable_chunked_prefill enable_prefix_caching
    gpu_memory_utilization kv_cache_memory_bytes cpu_offload_gb
    block_size tensor_parallel_size pipeline_parallel_size data_parallel_size
    distributed_executor_backend disable_custom_all_reduce
    limit_mm_per_prompt mm_processor_kwargs hf_overrides generation_config
    override_generation_config compilation_config max_logprobs runner convert
    served_model_name enable_lora max_lora_rank max_loras
    pooler_config disable_log_stats num_gpu_blocks_override speculative_config
    model_impl async_scheduling structured_outputs_config logprobs_mode
    mm_processor_cache_gb scheduling_policy
    """.split()
)

SAMPLING_KEYS = frozenset(
    """
    temperature top_p top_k min_p max_tokens max_completion_tokens seed stop
    presence_penalty frequency_penalty repetition_penalty n logprobs top_logprobs
    ignore_eos min_tokens skip_special_tokens stop_token_ids
    """.split()
)


def _only(allowed: frozenset[str], what: str) -> AfterValidator:
    """A validator for a table whose keys must all be in ALLOWED."""

    def check(value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"unknown {what} key {unknown[0]!r}")
        return value

    return AfterValidator(check)


FIT_KEYS = frozenset({"params_b", "weight_bits", "weight_bytes", "layers", "kv_heads",
                      "head_size", "vision_params_b", "image_tokens"})
EngineArgs = Annotated[dict[str, Any], _only(ENGINE_KEYS, "engine")]
FitFacts = Annotated[dict[str, float], _only(FIT_KEYS, "fit")]
SamplingDefaults = Annotated[dict[str, Any], _only(SAMPLING_KEYS, "sampling")]


class ProfileError(Exception):
    """A profile file that cannot be used; the message names the file and key."""


class ChatOptions(BaseModel):
    """What ``vllm serve`` takes on its command line for chat features."""

    model_config = ConfigDict(extra="forbid")
    tool_call_parser: str | None = None  # --tool-call-parser (hermes, llama3_json, ...)
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice
    reasoning_parser: str | None = None  # --reasoning-parser (qwen3, deepseek_r1, ...)
    chat_template: str | None = None  # a file (relative to the profile) or the template
    template_kwargs: dict[str, Any] = Field(default_factory=dict)  # a line's own win

    def template_argument(self, source: Path | None) -> str:
        """--chat-template: an inline template as it is, a file as an absolute path."""
        template = self.chat_template or ""
        if "{" in template or "\n" in template:
            return template
        path = Path(template).expanduser()
        if not path.is_absolute() and source is not None:
            path = source.parent / path
        return str(path)


MEDIA_KEYS = frozenset({"url", "image_url", "audio_url", "video_url", "file_url"})
# Tables that describe the answer, not the input: never media.
NOT_MEDIA = frozenset({"tools", "tool_choice", "response_format", "structured_outputs",
                       "text", "metadata"})


class MediaOptions(BaseModel):
    """Where images and audio in a request may come from.

    ``data:`` URLs always work. Remote ``http(s)`` URLs are a line's error
    unless ``allow_remote`` is set: the engine would fetch them for whoever can
    write to the inbox. ``file://`` URLs work only under ``local_folder``."""

    model_config = ConfigDict(extra="forbid")
    allow_remote: bool = False
    allowed_domains: list[str] = Field(default_factory=list)  # empty: any, when allowed
    local_folder: str = ""

    def violation(self, body: dict[str, Any], allowed: list[str] | tuple[str, ...] = ()
                  ) -> tuple[str, str] | None:
        """(field path, message) for the first remote URL this profile refuses
        (ALLOWED: hosts config's [media] allows for every profile)."""
        for path, url in _media_urls(body, ""):
            if not url[:8].lower().startswith(("http://", "https://")):
                continue
            host = urlsplit(url).hostname or ""
            if host.lower() in allowed:
                continue
            if not self.allow_remote:
                return path, (f"{path}: remote media URLs are not fetched by this profile; "
                              "send the data as a data: URL")
            if self.allowed_domains and host not in self.allowed_domains:
                return path, f"{path}: {host} is not in this profile's allowed_domains"
        return None


def _media_urls(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if path == "" and key in NOT_MEDIA:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key in MEDIA_KEYS and isinstance(item, str):
                yield where, item
            else:
                yield from _media_urls(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _media_urls(item, f"{path}.{i}")


class LoraOptions(BaseModel):
    """LoRA adapters served on this profile's base model (vLLM's --enable-lora and
    --lora-modules). A line whose ``model`` names an adapter runs with it."""

    model_config = ConfigDict(extra="forbid")
    adapters: dict[str, str] = Field(default_factory=dict)  # name -> folder (PEFT format)
    max_lora_rank: int = Field(16, ge=1)  # the largest rank among the adapters
    max_loras: int = Field(1, ge=1)  # adapters in one batch at once

    def paths(self, source: Path | None) -> dict[str, str]:
        """Adapter name -> absolute folder (relative ones are beside the profile file)."""
        found = {}
        for name, folder in self.adapters.items():
            path = Path(folder).expanduser()
            if not path.is_absolute() and source is not None:
                path = source.parent / path
            found[name] = str(path)
        return found


class RequestLimits(BaseModel):
    """Caps on what one request may ask of the engine; over a cap is a line error."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(65536, ge=1)
    n: int = Field(16, ge=1)
    logprobs: int = Field(20, ge=0)

    def violation(self, body: dict[str, Any]) -> tuple[str, str] | None:
        """(field, message) for the first cap BODY exceeds, or None."""
        for key, cap in (("max_tokens", self.max_tokens), ("max_completion_tokens",
                                                           self.max_tokens),
                         ("n", self.n), ("top_logprobs", self.logprobs)):
            value = body.get(key)
            if isinstance(value, int) and value > cap:
                return key, f"{key} {value} is over this profile's limit of {cap}"
        value = body.get("logprobs")  # completions: an int; chat: a bool
        if isinstance(value, int) and not isinstance(value, bool) and value > self.logprobs:
            return "logprobs", f"logprobs {value} is over this profile's limit of {self.logprobs}"
        return None


class Profile(BaseModel):
    """One validated profile. ``name`` comes from the file name."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    model: str
    path: str | None = None  # local folder to load instead of the hub id
    recipe: str | None = None  # `batchd models prepare RECIPE` builds the folder
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    environment: dict[str, str] = Field(default_factory=dict)  # set before vLLM loads
    engine: EngineArgs = Field(default_factory=dict)
    sampling: SamplingDefaults = Field(default_factory=dict)
    chat: ChatOptions = Field(default_factory=ChatOptions)
    media: MediaOptions = Field(default_factory=MediaOptions)
    fit: FitFacts = Field(default_factory=dict)  # model shape for `batchd profiles check`
    limits: RequestLimits = Field(default_factory=RequestLimits)
    lora: LoraOptions = Field(default_factory=LoraOptions)
    source: Path | None = None

    @property
    def images(self) -> int:
        """Images one prompt may carry: ``[engine] limit_mm_per_prompt``'s ``image``
        (vLLM's own limit); 0 for a profile that does not say (text models)."""
        limits = self.engine.get("limit_mm_per_prompt") or {}
        value = limits.get("image", 0) if isinstance(limits, dict) else 0
        return value if isinstance(value, int) else int(value.get("count", 0) or 0) \
            if isinstance(value, dict) else 0

    def names(self) -> set[str]:
        """Every name a job may use to ask for this profile (its adapters' too)."""
        return {self.name, self.model, *self.aliases, *self.lora.adapters}

    def model_location(self, models_dir: Path) -> str:
        """What vLLM loads: a local folder when the profile has one, else the hub id."""
        if self.path:
            path = Path(self.path).expanduser()
            return str(path if path.is_absolute() else models_dir / path)
        if self.recipe:
            return str(models_dir / self.recipe)
        return self.model

    def engine_args(self, models_dir: Path) -> dict[str, Any]:
        """Keyword arguments for vllm.LLM, exactly as the profile gives them."""
        return {"model": self.model_location(models_dir), **self.engine}

    @property
    def priority_scheduling(self) -> bool:
        """vLLM schedules by request priority (``scheduling_policy = "priority"``):
        a job's sidecar priority then reaches each of its requests."""
        return self.engine.get("scheduling_policy") == "priority"


DEFAULT_SHIPPED = "smollm2-135m.toml"  # the CPU default: every install ships it


def shipped_profiles() -> Path | None:
    """The profiles batchd ships: the package ``batchd.shipped_profiles`` of an
    installed wheel (the top-level profiles/ folder, packaged), else profiles/ of a
    source tree run without installing; None when neither is there."""
    try:
        from importlib.resources import files

        # a folder without __init__.py: on Python 3.11 files() of it is a
        # MultiplexedPath, whose joinpath gives a real path
        folder = Path(str(files("batchd.shipped_profiles").joinpath(DEFAULT_SHIPPED))).parent
    except (ImportError, TypeError):
        folder = Path(__file__).resolve().parent.parent / "profiles"
    return folder if folder.is_dir() and any(folder.glob("*.toml")) else None


def load_profile(path: Path) -> Profile:
    """Read one profile file; raise ProfileError naming the file and key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path.name}: {exc}") from None
    try:
        return Profile(**data, name=path.stem, source=path)
    except ValidationError as exc:
        key, msg = first_error(exc)
        raise ProfileError(f"{path.name}: {key}: {msg}") from None


@dataclass
class ProfileSet:
    """All profiles of a folder, plus the files that failed to load."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, folder: Path) -> "ProfileSet":
        found = cls()
        for path in sorted(folder.glob("*.toml")):
            try:
                profile = load_profile(path)
            except ProfileError as exc:
                found.errors.append(str(exc))
            else:
                found.profiles[profile.name] = profile
        if not folder.is_dir():
            found.errors.append(f"profiles folder not found: {folder}")
        return found

    def lookup(self, name: str) -> Profile | None:
        """The profile a name, alias or model id stands for (exact, then case-blind)."""
        if name in self.profiles:
            return self.profiles[name]
        for profile in self.profiles.values():
            if name in profile.names():
                return profile
        lowered = name.lower()
        for profile in self.profiles.values():
            if lowered in {n.lower() for n in profile.names()}:
                return profile
        return None

    def known(self) -> str:
        return ", ".join(sorted(self.profiles)) or "(none)"
