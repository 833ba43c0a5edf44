"""Scenario `chunked`: batchd's streaming window against fixed chunks.

The same mixed-length workload (output lengths 8 to 256 tokens, ignore_eos)
runs through one warm engine twice per repeat: once streamed with batchd's
window (refilled at every engine step), once in chunks of 100 that each wait
for their slowest request before the next chunk starts (a web server that
checkpoints every 100 requests). Reported: the throughput ratio.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from .common import MODELS, ROOT, ensure_tiny, summary, write_record

QUICK = {"n": 60, "repeats": 1}


def child(n: int, repeats: int, chunk: int, window: int) -> None:
    """Runs inside a subprocess: vLLM needs a __main__ guard for its engine core."""
    import time

    from batchd.lines import CHAT, Request
    from batchd.profiles import Profile
    from batchd.engine.vllm_engine import VllmEngine

    profile = Profile(name="tiny", model="batchd/tiny-llama", recipe="tiny-llama",
                      engine={"dtype": "float32", "max_model_len": 512, "enforce_eager": True})
    engine = VllmEngine(profile, MODELS)
    rng = random.Random(0)
    lengths = [rng.choice([8, 16, 32, 64, 128, 256]) for _ in range(n)]
    requests = [Request(i + 1, f"r{i}", CHAT, {
        "messages": [{"role": "user", "content": f"Request {i}"}],
        "max_tokens": lengths[i], "ignore_eos": True, "temperature": 0.0}) for i in range(n)]

    def timed(batches):
        started = time.perf_counter()
        tokens = 0
        for batch in batches:
            for answers in engine.stream(batch, {}, window):
                tokens += sum(a.body["usage"]["completion_tokens"] for a in answers if a.body)
        return time.perf_counter() - started, tokens

    list(engine.stream(requests[:8], {}, window))  # warm-up
    for _ in range(repeats):
        for mode in ("streamed", "chunked"):
            batches = [requests] if mode == "streamed" else \
                [requests[i:i + chunk] for i in range(0, n, chunk)]
            seconds, tokens = timed(batches)
            print(json.dumps({"mode": mode, "seconds": seconds, "tokens": tokens}), flush=True)
    engine.close()


def run(repeats: int = 3, n: int = 600, chunk: int = 100, window: int = 1024,
        quick: bool = False) -> Path:
    ensure_tiny()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.chunked", str(n), str(repeats),
                          str(chunk), str(window)], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True)
    runs = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    rates = {mode: summary([r["tokens"] / r["seconds"] for r in runs if r["mode"] == mode])
             for mode in ("streamed", "chunked")}
    ratio = round(rates["streamed"]["median"] / rates["chunked"]["median"], 4)
    print("streamed/chunked throughput:", ratio, flush=True)
    return write_record("chunked", {
        "settings": {"n": n, "chunk": chunk, "window": window, "repeats": repeats,
                     "quick": quick, "model": "tiny-llama", "lengths": "8..256, ignore_eos"},
        "runs": runs, "output_tokens_per_s": rates, "ratios": {"streamed_over_chunked": ratio}})


if __name__ == "__main__":
    child(*(int(a) for a in sys.argv[1:5]))
