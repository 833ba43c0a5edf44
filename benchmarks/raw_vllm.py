"""The peer of the `overhead` scenario: the same prompts through vllm.LLM.chat
directly, in one warm process. After loading it prints "ready"; then every line
on stdin runs one timed repeat and prints one JSON line.

python -m benchmarks.raw_vllm --model DIR --n 256 --max-tokens 32 [--natural]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Tell me about request number {i}."}]
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--natural", action="store_true", help="stop at EOS, not a fixed length")
    parser.add_argument("--engine", default="{}", help="JSON of extra vllm.LLM arguments")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, **json.loads(args.engine))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, seed=0,
                            ignore_eos=not args.natural)
    llm.chat(prompts(8), params, use_tqdm=False)  # warm-up, as batchd's engine is warm
    print("ready", flush=True)
    for _ in sys.stdin:  # one repeat per line, so the caller can interleave with batchd
        started = time.perf_counter()
        outputs = llm.chat(prompts(args.n), params, use_tqdm=False)
        seconds = time.perf_counter() - started
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        print(json.dumps({"seconds": seconds, "completion_tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
