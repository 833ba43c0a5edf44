"""The raw-vLLM peer of the `overhead` and `gpu` scenarios: the same prompts
through vllm.LLM.chat directly, in one warm process. After loading it prints
"ready"; then every line on stdin runs one timed repeat and prints one JSON line.

python -m benchmarks.raw_vllm --model DIR --n 256 --max-tokens 32 [--natural]
python -m benchmarks.raw_vllm --model DIR --requests FILE.jsonl   (each line's
    messages and max_tokens; greedy, ignore_eos). A stdin line that names a
    file switches to that file's requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Tell me about request number {i}."}]
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--natural", action="store_true", help="stop at EOS, not a fixed length")
    parser.add_argument("--requests", help="a JSONL file of chat lines to run instead")
    parser.add_argument("--engine", default="{}", help="JSON of extra vllm.LLM arguments")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, **json.loads(args.engine))
    chats, params = load(args)
    warm = SamplingParams(max_tokens=4, temperature=0.0)
    llm.chat(chats[:8], warm, use_tqdm=False)  # warm-up, as batchd's engine is warm
    print("ready", flush=True)
    for command in sys.stdin:  # one repeat per line, so the caller can interleave
        if command.strip() not in ("", "run"):  # a path: run that file from now on
            args.requests = command.strip()
            chats, params = load(args)
        started = time.perf_counter()
        outputs = llm.chat(chats, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        prompt = sum(len(o.prompt_token_ids or []) for o in outputs)
        cached = sum(o.num_cached_tokens or 0 for o in outputs)
        print(json.dumps({"seconds": seconds, "completion_tokens": tokens,
                          "prompt_tokens": prompt, "cached_tokens": cached}), flush=True)


def load(args: argparse.Namespace) -> tuple[list, Any]:
    """The chats and sampling parameters of one repeat."""
    from vllm import SamplingParams

    if not args.requests:
        return prompts(args.n), SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                               seed=0, ignore_eos=not args.natural)
    with open(args.requests) as stream:
        lines = [json.loads(line) for line in stream if line.strip()]
    return ([line["messages"] for line in lines],
            [SamplingParams(max_tokens=line["max_tokens"], temperature=0.0, seed=0,
                            ignore_eos=True) for line in lines])


if __name__ == "__main__":
    main()
