"""The result cache: answers of deterministic lines, reused when the same
request reaches the same model and engine settings again.

A line is cacheable when its answer is determined by its input: an embedding
or score, or a generation at temperature 0 (or top_k 1) or with a ``seed``,
and no ``n > 1`` sampling at a temperature above 0. Its key is a SHA-256 over
the url, the request body with the job's sampling defaults under it, and the
profile's identity (``identity``): the model and its files, the engine
arguments that can change an answer, the chat options and template, and the
vLLM release. The store is diskcache (SQLite), shared by every daemon of the
spool, with a size limit and least-recently-used eviction.

The first answer stored for a key stays (``add``, not ``set``): vLLM's answers
at temperature 0 can differ with batch composition, and a cache that kept the
last would make re-runs flicker. A store that fails (corrupt, unreadable, a
full disk) is bypassed with one warning: lines then go to the engine, a job
never fails for its cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from ..bench import versions
from ..lines import COMPLETIONS, CHAT, RESPONSES
from ..profiles import Profile

log = structlog.get_logger()

GENERATIVE = (CHAT, COMPLETIONS, RESPONSES)
# Engine keys that never change an answer: memory, scheduling and logging.
# Everything else (dtype, quantization, max_model_len, ...) is in the key.
NEUTRAL_ENGINE_KEYS = frozenset({"gpu_memory_utilization", "scheduling_policy",
                                 "disable_log_stats", "swap_space", "kv_cache_memory_bytes",
                                 "max_num_seqs", "max_num_batched_tokens",
                                 "enable_prefix_caching", "enable_chunked_prefill"})


def cacheable(url: str, request: dict[str, Any]) -> bool:
    """Whether REQUEST (the line's body over its sampling defaults) always gets
    the same answer."""
    if url not in GENERATIVE:
        return True  # embeddings, scores, reranks: no sampling
    temperature = request.get("temperature")
    greedy = temperature == 0 or request.get("top_k") == 1
    n = request.get("n") or 1
    if n > 1 and not greedy:
        return False
    return greedy or request.get("seed") is not None


def _files_fingerprint(location: str) -> list[Any]:
    """Names, sizes and modification times of a local model's files: the same
    path with new weights is another model."""
    path = Path(location)
    try:
        if path.is_file():
            st = path.stat()
            return [[path.name, st.st_size, st.st_mtime_ns]]
        if path.is_dir():
            return sorted([entry.name, entry.stat().st_size, entry.stat().st_mtime_ns]
                          for entry in os.scandir(path) if entry.is_file())
    except OSError:
        pass
    return []  # a hub id: the name is all there is


def identity(profile: Profile, models_dir: Path) -> str:
    """What an answer depends on besides the request, as one hash."""
    args = profile.engine_args(models_dir)
    location = args.pop("model")
    chat = profile.chat.model_dump(exclude_none=True)
    if profile.chat.chat_template:
        template = profile.chat.template_argument(profile.source)
        try:  # a file: its text, so an edited template is another key
            template = Path(template).read_text() if Path(template).is_file() else template
        except (OSError, ValueError):
            pass
        chat["chat_template"] = template
    doc = {"model": location, "files": _files_fingerprint(location),
           "engine": {k: v for k, v in args.items() if k not in NEUTRAL_ENGINE_KEYS},
           "chat": chat, "sampling_defaults": profile.sampling,
           "lora": {name: [path, _files_fingerprint(path)]  # an adapter is part of the model
                    for name, path in profile.lora.paths(profile.source).items()},
           "vllm": versions().get("vllm")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def key(identity: str, url: str, request: dict[str, Any]) -> str:
    body = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{identity}\n{url}\n{body}".encode()).hexdigest()


def fresh(body: dict[str, Any]) -> dict[str, Any]:
    """A stored body as a new server answer would have it: a fresh id and time."""
    body = dict(body)
    old = body.get("id")
    if isinstance(old, str):  # chatcmpl-..., cmpl-..., msg_...: the same kind of id
        cut = min((i for i in (old.find("-"), old.find("_")) if i >= 0), default=-1)
        body["id"] = f"{old[:cut + 1]}{uuid.uuid4().hex}"
    if "created" in body:
        body["created"] = int(time.time())
    if "created_at" in body:
        body["created_at"] = int(time.time())
    return body


class ResultCache:
    """The spool's store of answers. Every failure bypasses the cache for the
    rest of this process's life, after one warning; nothing here raises."""

    def __init__(self, folder: Path, size_limit: int):
        self.folder = folder
        self.size_limit = size_limit
        self._store: Any = None
        self.broken: str | None = None

    def _open(self) -> Any:
        if self._store is None and self.broken is None:
            try:
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                st = os.lstat(self.folder)
                if not stat.S_ISDIR(st.st_mode):  # a symlink: never followed
                    raise OSError(f"{self.folder} is not a plain folder (a symlink?)")
                import diskcache

                self._store = diskcache.Cache(str(self.folder), size_limit=self.size_limit,
                                              eviction_policy="least-recently-used")
            except Exception as exc:  # noqa: BLE001 - any failure means: no cache
                self._bypass(exc)
        return self._store

    def _bypass(self, exc: BaseException) -> None:
        self.broken = str(exc) or type(exc).__name__
        log.warning("cache_bypassed", folder=str(self.folder), error=self.broken)
        self.close()

    def get(self, key: str) -> dict[str, Any] | None:
        store = self._open()
        if store is None:
            return None
        try:
            value = store.get(key)
        except (sqlite3.Error, OSError, ValueError, EOFError, TypeError) as exc:
            self._bypass(exc)
            return None
        return value if isinstance(value, dict) else None

    def add(self, key: str, body: dict[str, Any]) -> None:
        """Store BODY under KEY unless an answer is there already."""
        store = self._open()
        if store is None:
            return
        try:
            store.add(key, body)
        except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
            self._bypass(exc)

    def close(self) -> None:
        if self._store is not None:
            try:
                self._store.close()
            except Exception:  # noqa: BLE001 - closing a broken store
                pass
        self._store = None
