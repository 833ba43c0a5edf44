"""Scenario `overhead`: batchd against vLLM itself on the same prompts.

The peer is `vllm.LLM.chat` on the whole list in one process (the fastest way
vLLM offers). batchd is a warm daemon: a file is renamed into its inbox and
timed to its final status line (end to end), and its bench record gives the
generation time. Both are loaded at once and their repeats alternate, so the
drift of a shared machine falls on both sides alike. Same model, same engine
arguments, same sampling (greedy,
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

from .common import (BATCHD, MODELS, ensure_tiny, make_spool, summary, wait_final,
                     write_record)

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


class Raw:
    """The peer: a warm `vllm.LLM` process that runs one repeat per request."""

    def __init__(self, args: list[str], env: dict[str, str | None] | None = None,
                 log: Path | None = None):
        """Start the peer with these `benchmarks.raw_vllm` arguments (ENV: extra
        variables, None to unset one; LOG: where vLLM's log goes); `ready()` waits
        for its load, so a caller can load something else meanwhile."""
        merged = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                  **(env or {})}
        env = {k: v for k, v in merged.items() if v is not None}
        self.log = open(log, "w") if log else None
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.raw_vllm", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log or subprocess.DEVNULL, text=True,
                                     env=env, cwd=Path(__file__).resolve().parent.parent)

    @classmethod
    def for_model(cls, model: str, n: int, max_tokens: int, natural: bool) -> Raw:
        folder, engine, _ = MODELS_RUN[model]
        raw = cls(["--model", str(MODELS / folder), "--n", str(n),
                   "--max-tokens", str(max_tokens), "--engine", json.dumps(engine)]
                  + (["--natural"] if natural else []))
        return raw.ready()

    def ready(self) -> Raw:
        while self.proc.stdout.readline().strip() != "ready":
            if self.proc.poll() is not None:
                raise RuntimeError("the raw vLLM peer exited while loading")
        return self

    def once(self, requests: Path | None = None) -> dict:
        """One timed repeat (of the REQUESTS file, from now on, when given)."""
        self.proc.stdin.write(f"{requests or 'run'}\n")
        self.proc.stdin.flush()
        while not (line := self.proc.stdout.readline()).startswith("{"):
            if not line:
                raise RuntimeError("the raw vLLM peer exited")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)
        if self.log:
            self.log.close()


class Batchd:
    """A warm batchd daemon; one repeat is one file dropped and timed to its end."""

    def __init__(self, model: str, n: int, max_tokens: int, natural: bool, tmp: Path):
        self.n, self.max_tokens, self.natural, self.count = n, max_tokens, natural, 0
        config = make_spool(tmp)
        if MODELS_RUN[model][2]:  # the daemon's default profile "tiny" becomes this model
            (tmp / "profiles" / "tiny.toml").write_text(MODELS_RUN[model][2])
        self.inbox, self.outbox = tmp / "spool" / "inbox", tmp / "spool" / "outbox"
        self.inbox.mkdir(parents=True)
        self.daemon = subprocess.Popen([BATCHD, "run", "--config", str(config)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.once(n=8, max_tokens=4)  # loads and warms the engine, like the peer's warm-up

    def once(self, n: int | None = None, max_tokens: int | None = None) -> dict:
        self.count += 1
        job = f"run{self.count}"
        body = {"max_tokens": max_tokens or self.max_tokens, "temperature": 0.0, "seed": 0,
                "ignore_eos": not self.natural}
        lines = [json.dumps({"custom_id": f"{job}-{i}", **body, "messages": [
            {"role": "user", "content": f"Tell me about request number {i}."}]})
            for i in range(n or self.n)]
        tmpfile = self.inbox / f".{job}.part"
        tmpfile.write_text("\n".join(lines) + "\n")
        started = time.perf_counter()
        os.rename(tmpfile, self.inbox / f"{job}.jsonl")
        status = self.outbox / f"{job}.status.jsonl"
        if wait_final(status, self.daemon) != "completed":
            raise RuntimeError(f"{job} failed")
        end_to_end = time.perf_counter() - started
        bench = json.loads((self.outbox / f"{job}.bench.json").read_text())
        return {"end_to_end_s": end_to_end, "generation_s": bench["timing_s"]["generation"],
                "completion_tokens": bench["tokens"]["completion"]}

    def close(self) -> None:
        self.daemon.terminate()
        self.daemon.wait(120)


def interleaved(model: str, n: int, max_tokens: int, repeats: int, natural: bool
                ) -> tuple[list[dict], list[dict]]:
    """Both sides warm at once, repeats alternating (raw first on even repeats,
    batchd first on odd ones), so machine drift hits both alike."""
    raw_runs, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Raw.for_model(model, n, max_tokens, natural)
        try:
            batchd = Batchd(model, n, max_tokens, natural, Path(tmp))
            try:
                for r in range(repeats):
                    if r % 2 == 0:
                        raw_runs.append(raw.once())
                        ours.append(batchd.once())
                    else:
                        ours.append(batchd.once())
                        raw_runs.append(raw.once())
            finally:
                batchd.close()
        finally:
            raw.close()
    return raw_runs, ours


def run(repeats: int = 3, n: int = 512, max_tokens: int = 64, quick: bool = False,
        model: str = "tiny-llama") -> Path:
    ensure_tiny()
    cases = {}
    for natural in (False, True):
        name = "natural_stops" if natural else "fixed_length"
        raw, ours = interleaved(model, n, max_tokens, repeats, natural)
        raw_s = summary([r["seconds"] for r in raw])
        gen_s = summary([r["generation_s"] for r in ours])
        e2e_s = summary([r["end_to_end_s"] for r in ours])
        cases[name] = {
            "raw": raw, "batchd": ours,
            "raw_generation_s": raw_s, "batchd_generation_s": gen_s, "batchd_end_to_end_s": e2e_s,
            "generation_ratio": round(gen_s["median"] / raw_s["median"], 4),
            # repeat i of each side ran back to back: the ratio of each pair
            "paired_generation_ratio": summary([b["generation_s"] / a["seconds"]
                                                for a, b in zip(raw, ours)]),
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
