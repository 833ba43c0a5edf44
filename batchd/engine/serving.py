"""vLLM's own OpenAI serving layer, opened for one profile.

The engine process answers every request the way ``vllm serve`` and vLLM's
batch runner do: an async engine client plus the serving objects that the API
server builds (``init_app_state``), with the server's command-line options
taken from the profile. A response body is the serving object's response,
dumped as the server's router dumps it; an error is the server's
``ErrorResponse``. Nothing here builds a body by hand.

vLLM moved these entry points between releases; ``endpoints._first`` finds
each one under the names of the releases batchd supports (docs/ARCHITECTURE.md);
``endpoints.py`` maps each URL to its serving object and request model.
Only engine/ imports vLLM: this module, ``endpoints`` and ``vllm_engine`` in the
engine process, and ``capabilities`` (registries only) for ``batchd profiles check``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, cast

from ..lines import (
    LineError,
    Request,
)
from ..profiles import Profile
from .endpoints import Endpoint, _first, endpoints

_LAUNCH = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")
_CLI = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")


def server_args(profile: Profile, models_dir: Path, media: dict[str, Any] | None = None
                ) -> Any:
    """The argparse Namespace ``vllm serve`` would build for this profile.

    The server's own flags (tool and reasoning parsers, chat template) are
    parsed from a command line; the profile's [engine] table is set on the
    result as the keyword arguments ``vllm.LLM`` takes, so dict values need no
    command-line spelling. A key vLLM's engine does not know is an error here,
    not something silently ignored. MEDIA is the spool's: ``root``, the one
    folder local images are read from (the running jobs' media folders, unless
    the profile names its own ``local_folder``), and ``domains``, the hosts
    http(s) images may be fetched from.
    """
    parser_cls = _first(("vllm.utils.argparse_utils", "vllm.utils"), "FlexibleArgumentParser")
    make_parser = _first(_CLI, "make_arg_parser")
    engine_args_cls = _first(("vllm.engine.arg_utils",), "AsyncEngineArgs")
    chat = profile.chat
    argv = ["--model", profile.model_location(models_dir),
            "--served-model-name", profile.model, "--disable-log-stats",
            # usage.prompt_tokens_details.cached_tokens, as OpenAI reports it: the
            # prefix cache's hits, summed into the bench record
            "--enable-prompt-tokens-details"]
    if chat.tool_call_parser:
        argv += ["--tool-call-parser", chat.tool_call_parser]
    if chat.enable_auto_tool_choice:
        argv += ["--enable-auto-tool-choice"]
    if chat.reasoning_parser:
        argv += ["--reasoning-parser", chat.reasoning_parser]
    if chat.chat_template:
        argv += ["--chat-template", chat.template_argument(profile.source)]
    if chat.template_kwargs:
        argv += ["--default-chat-template-kwargs", json.dumps(chat.template_kwargs)]
    spool_media, options = media or {}, profile.media
    local = str(Path(options.local_folder).expanduser()) if options.local_folder \
        else spool_media.get("root")
    if local:
        argv += ["--allowed-local-media-path", local]
    # batchd refuses per line the hosts it does not allow (jobs/images.py); vLLM
    # gets the same list, a second fence (none: only a reserved name that never
    # resolves, as vLLM without the flag would fetch from any host)
    domains = [*spool_media.get("domains", ()),
               *(options.allowed_domains if options.allow_remote else ())]
    if not (options.allow_remote and not options.allowed_domains):
        argv += ["--allowed-media-domains", *(domains or ["nothing.invalid"])]
    lora = profile.lora
    if lora.adapters:
        adapters = lora.paths(profile.source)
        for name, path in adapters.items():
            if not (Path(path) / "adapter_config.json").is_file():
                raise ValueError(f"profile {profile.name}: LoRA adapter {name!r}: {path} has "
                                 "no adapter_config.json (a PEFT adapter folder)")
        argv += ["--enable-lora", "--max-lora-rank", str(lora.max_lora_rank),
                 "--max-loras", str(lora.max_loras), "--lora-modules",
                 *(f"{name}={path}" for name, path in adapters.items())]
    args = make_parser(parser_cls()).parse_args(argv)
    known = {f.name for f in dataclasses.fields(engine_args_cls)}
    for key, value in profile.engine.items():
        if key not in known:
            raise ValueError(f"profile {profile.name}: engine key {key!r} is not an "
                             "engine argument of this vLLM release")
        current = getattr(args, key, None)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = cast(Any, type(current))(**value)  # what the parser makes of the JSON flag
        setattr(args, key, value)
    return args


class Serving:
    """The engine client and serving objects of one loaded profile (async side)."""

    def __init__(self, profile: Profile, models_dir: Path,
                 media: dict[str, Any] | None = None):
        self.profile = profile
        self.args = server_args(profile, models_dir, media)
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None
        self.endpoints: dict[str, Endpoint] = {}

    async def open(self) -> "Serving":
        from starlette.datastructures import State

        build_client = _first(_LAUNCH, "build_async_engine_client")
        init_app_state = _first(("vllm.entrypoints.launchers.api_server.app_state",
                                 *_LAUNCH), "init_app_state")
        # vLLM sizes its default batch (max_num_seqs, max_num_batched_tokens) by
        # usage context; a batch spool wants vllm.LLM's offline defaults (on the
        # CPU build 256 sequences and 4096 tokens, against 128 and 2048 for the
        # batch runner). A profile's own values win.
        usage = _first(("vllm.usage.usage_lib",), "UsageContext").LLM_CLASS
        self.client = await self._stack.enter_async_context(
            build_client(self.args, usage_context=usage))
        tasks = await self.client.get_supported_tasks()
        state = State()
        await init_app_state(self.client, state, self.args, tasks)
        self.endpoints = endpoints(state, tasks)
        # Looked up once here, not on every failing request.
        # vLLM's own type for a dead engine core, found like the other entry points.
        self.engine_dead: type[BaseException] = _first(
            ("vllm.v1.engine.exceptions", "vllm.engine.exceptions"), "EngineDeadError")
        self._error_response = _first(
            ("vllm.entrypoints.serve.exception_handling.error_response",
             "vllm.entrypoints.serve.utils.error_response", "vllm.entrypoints.serve"),
            "create_error_response")
        # vLLM reads its VLLM_* settings from os.environ on every access
        # (several per request on the serving path) until a process calls
        # enable_envs_cache(), as its engine core and workers do once started.
        # The engine process's environment is final by now (the profile's
        # [environment] was applied before loading), so cache it here too.
        enable_cache = getattr(importlib.import_module("vllm.envs"), "enable_envs_cache", None)
        if enable_cache is not None:
            enable_cache()
        return self

    @property
    def dead(self) -> bool:
        return bool(getattr(self.client, "errored", False))

    async def answer(self, request: Request, sampling: dict[str, Any]
                     ) -> tuple[dict[str, Any] | None, LineError | None]:
        """(body, None) or (None, error) for one request, as the server answers it."""
        endpoint = self.endpoints.get(request.url)
        if endpoint is None:
            return None, _error(request, "unsupported_url", f"profile {self.profile.name} "
                                f"({self.profile.model}) does not serve {request.url}", "url")
        body = dict(request.body)
        unknown = sorted(set(body) - endpoint.fields)
        if unknown:
            return None, _error(request, "invalid_request", f"field {unknown[0]!r} is not "
                                f"supported for {request.url} by this vLLM release",
                                unknown[0])
        if endpoint.sampling:
            body = {**{k: v for k, v in sampling.items() if k in endpoint.fields}, **body}
        # routing already chose the model; an adapter's name selects the adapter
        body["model"] = request.model if request.model in self.profile.lora.adapters \
            else self.profile.model
        try:
            parsed = endpoint.parse(body)
        except Exception as exc:  # a pydantic ValidationError, or vLLM's own checks
            return None, _validation_error(request, exc)
        try:
            response = await endpoint.call(parsed)
        except Exception as exc:  # the server turns these into its ErrorResponse too
            response = self._error_response(exc)
        return _outcome(request, response, endpoint.exclude_none)

    async def close(self) -> None:
        await self._stack.aclose()


# -- responses and errors --------------------------------------------------------

def _outcome(request: Request, response: Any, exclude_none: bool = False
             ) -> tuple[dict[str, Any] | None, LineError | None]:
    """The server's answer as a body or a line error."""
    if hasattr(response, "body") and hasattr(response, "status_code"):  # a starlette Response
        payload = json.loads(bytes(response.body))
        if response.status_code >= 400 or set(payload) == {"error"}:
            return None, _server_error(request, payload.get("error") or {}, response.status_code)
        return payload, None
    if hasattr(response, "model_dump"):
        payload = response.model_dump(mode="json", exclude_none=exclude_none)
        if set(payload) == {"error"}:  # ErrorResponse
            error = payload["error"]
            return None, _server_error(request, error, int(error.get("code") or 400))
        return payload, None
    return None, _error(request, "invalid_request", "streaming is not available in a batch",
                        "stream")


_CONTEXT = ("maximum context length", "context length", "maximum model length",
            "longer than the maximum", "is too long")


def _server_error(request: Request, error: dict[str, Any], status: int) -> LineError:
    message = str(error.get("message") or "request failed")
    param = error.get("param")
    if status >= 500:
        return LineError(request.line, request.custom_id, "engine_error", message[:2000],
                         param, 500, "server_error")
    code = "context_length_exceeded" if any(t in message for t in _CONTEXT) \
        else "invalid_request"
    return LineError(request.line, request.custom_id, code, message[:2000], param, 400)


def _error(request: Request, code: str, message: str, param: str | None) -> LineError:
    return LineError(request.line, request.custom_id, code, message, param, 400)


def _validation_error(request: Request, exc: Exception) -> LineError:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
        except Exception:  # not a pydantic error after all
            first = None
        if first:
            loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith("function-")]
            param = ".".join(loc) or None
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
            return _error(request, "invalid_request", message, param)
    text = str(exc).strip() or type(exc).__name__
    return _error(request, "invalid_request", text.splitlines()[0][:2000],
                  getattr(exc, "parameter", None))
