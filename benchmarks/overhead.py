"""Scenario `overhead`: batchd against vLLM itself on the same prompts.

The peer is `vllm.LLM.chat` on the whole list in one process (the fastest way
vLLM offers). batchd is a warm daemon: a file is renamed into its inbox and
timed to its final status line (end to end), and its bench record gives the
generation time. Same model, same engine arguments, same sampling (greedy,
fixed output length with ignore_eos, or natural stops). Reported: the ratio
of medians, batchd / raw, for generation and end-to-end time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BATCHD, MODELS, ensure_tiny, make_spool, summary, write_record

QUICK = {"n": 16, "max_tokens": 4, "repeats": 1}
# model -> (folder under models/, vllm.LLM arguments, profile TOML for the daemon)
MODELS_RUN = {
    "tiny-llama": ("tiny-llama", {"dtype": "float32", "max_model_len": 512,
                                  "enforce_eager": True}, None),
    "smollm2-135m": ("smollm2-135m", {"dtype": "float32", "max_model_len": 2048},
                     'model = "HuggingFaceTB/SmolLM2-135M-Instruct"\nrecipe = "smollm2-135m"\n'
                     '[environment]\nVLLM_CPU_KVCACHE_SPACE = "1"\n'
                     '[engine]\ndtype = "float32"\nmax_model_len = 2048\n'),
}


def raw_runs(model: str, n: int, max_tokens: int, repeats: int, natural: bool) -> list[dict]:
    folder, engine, _ = MODELS_RUN[model]
    cmd = [sys.executable, "-m", "benchmarks.raw_vllm", "--model", str(MODELS / folder),
           "--n", str(n), "--max-tokens", str(max_tokens), "--repeats", str(repeats),
           "--engine", json.dumps(engine)] + (["--natural"] if natural else [])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def batchd_runs(model: str, n: int, max_tokens: int, repeats: int, natural: bool
                ) -> list[dict]:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        config = make_spool(Path(tmp))
        if MODELS_RUN[model][2]:  # the daemon's default profile "tiny" becomes this model
            (Path(tmp) / "profiles" / "tiny.toml").write_text(MODELS_RUN[model][2])
        inbox, outbox = Path(tmp) / "spool" / "inbox", Path(tmp) / "spool" / "outbox"
        inbox.mkdir(parents=True)
        daemon = subprocess.Popen([BATCHD, "run", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            for r in range(repeats + 1):  # the first run warms the engine, like the peer's
                job = f"run{r}"
                body = {"max_tokens": max_tokens if r else 4, "temperature": 0.0, "seed": 0,
                        "ignore_eos": not natural}
                lines = [json.dumps({"custom_id": f"{job}-{i}", **body, "messages": [
                    {"role": "user", "content": f"Tell me about request number {i}."}]})
                    for i in range(n if r else 8)]
                tmpfile = inbox / f".{job}.part"
                tmpfile.write_text("\n".join(lines) + "\n")
                started = time.perf_counter()
                os.rename(tmpfile, inbox / f"{job}.jsonl")
                status = outbox / f"{job}.status.jsonl"
                while not (status.exists() and '"state": "completed"' in status.read_text()):
                    if daemon.poll() is not None:
                        raise RuntimeError("the daemon exited")
                    time.sleep(0.005)
                end_to_end = time.perf_counter() - started
                bench = json.loads((outbox / f"{job}.bench.json").read_text())
                if r:
                    runs.append({"end_to_end_s": end_to_end,
                                 "generation_s": bench["timing_s"]["generation"],
                                 "completion_tokens": bench["tokens"]["completion"]})
        finally:
            daemon.terminate()
            daemon.wait(120)
    return runs


def run(repeats: int = 3, n: int = 512, max_tokens: int = 64, quick: bool = False,
        model: str = "tiny-llama") -> Path:
    ensure_tiny()
    cases = {}
    for natural in (False, True):
        name = "natural_stops" if natural else "fixed_length"
        raw = raw_runs(model, n, max_tokens, repeats, natural)
        ours = batchd_runs(model, n, max_tokens, repeats, natural)
        raw_s = summary([r["seconds"] for r in raw])
        gen_s = summary([r["generation_s"] for r in ours])
        e2e_s = summary([r["end_to_end_s"] for r in ours])
        cases[name] = {
            "raw": raw, "batchd": ours,
            "raw_generation_s": raw_s, "batchd_generation_s": gen_s, "batchd_end_to_end_s": e2e_s,
            "generation_ratio": round(gen_s["median"] / raw_s["median"], 4),
            "end_to_end_ratio": round(e2e_s["median"] / raw_s["median"], 4),
        }
        print(name, json.dumps({k: cases[name][k] for k in ("generation_ratio",
                                                            "end_to_end_ratio")}), flush=True)
    return write_record("overhead", {
        "settings": {"n": n, "max_tokens": max_tokens, "repeats": repeats, "quick": quick,
                     "model": model, "engine": MODELS_RUN[model][1],
                     "sampling": "greedy, seed 0"},
        "cases": cases,
        "ratios": {k: {"generation": v["generation_ratio"], "end_to_end": v["end_to_end_ratio"]}
                   for k, v in cases.items()},
        "goal": "batchd / raw <= 1.03 on generation time"})
