"""Scenario `rerun`: what a re-run costs with the result cache.

One warm daemon with ``[cache] enabled``; in each repeat, a file of N
temperature-0 requests new to the cache (first run), then the same file with 1 %
of its lines changed (re-run): drop to results for each, and the cache's hits
and misses from the bench records. Interleaved repeats, medians compared.

Goal (docs/BENCHMARKING.md): the re-run takes <= 5 % of the first run's time.
``--quick`` runs the same timeline on the fake engine (a check of the harness).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .common import (BATCHD, FAKE_BATCHD, ensure_tiny, make_spool, summary, wait_final,
                     write_record)

QUICK = {"n": 200, "fake": True}


def lines(rep: int, n: int, tokens: int, changed: int = 0) -> str:
    """N requests new to the cache in repeat REP; the first CHANGED of every 100
    ask for one token less (another request: a miss)."""
    out = []
    for i in range(n):
        edit = i % 100 < changed
        out.append(json.dumps({
            "custom_id": f"r{rep}-{i}", "temperature": 0.0, "ignore_eos": True,
            "max_tokens": tokens - 1 if edit else tokens,
            "messages": [{"role": "user", "content": f"repeat {rep} request {i}"}]}))
    return "\n".join(out) + "\n"


def run(repeats: int = 3, n: int = 4000, tokens: int = 64, fake: bool = False,
        quick: bool = False) -> Path:
    if not fake:
        ensure_tiny()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = make_spool(base, "[engine]\nwindow = 256\n[cache]\nenabled = true\n")
        inbox, outbox = base / "spool" / "inbox", base / "spool" / "outbox"
        inbox.mkdir(parents=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if fake:
            env["BATCHD_FAKE_STEP_SECONDS"] = "0.02"
        command = FAKE_BATCHD if fake else [BATCHD]
        daemon = subprocess.Popen([*command, "run", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

        def timed(job: str, text: str) -> tuple[float, dict]:
            part = inbox / f".{job}.part"
            part.write_text(text)
            start = time.perf_counter()
            os.rename(part, inbox / f"{job}.jsonl")
            if wait_final(outbox / f"{job}.status.jsonl", daemon, 3600) != "completed":
                raise RuntimeError(f"{job} failed")
            seconds = time.perf_counter() - start
            return seconds, json.loads((outbox / f"{job}.bench.json").read_text())

        try:
            timed("warmup", lines(-1, 2, 4))
            for rep in range(repeats):
                first_s, first = timed(f"first{rep}", lines(rep, n, tokens))
                again_s, again = timed(f"again{rep}", lines(rep, n, tokens, changed=1))
                runs.append({"first_s": first_s, "rerun_s": again_s,
                             "first_cache": first["cache"], "rerun_cache": again["cache"],
                             "first_generation_s": first["timing_s"]["generation"],
                             "rerun_generation_s": again["timing_s"]["generation"]})
                print(json.dumps(runs[-1]), flush=True)
        finally:
            daemon.terminate()
            daemon.wait(120)
    first = [r["first_s"] for r in runs]
    again = [r["rerun_s"] for r in runs]
    return write_record("rerun", {
        "settings": {"repeats": repeats, "n": n, "max_tokens": tokens, "changed": 0.01,
                     "fake": fake, "quick": quick, "model": "tiny-llama", "window": 256},
        "runs": runs, "first_s": summary(first), "rerun_s": summary(again),
        "ratios": {"rerun_over_first": round(statistics.median(again)
                                             / statistics.median(first), 4)},
        "goal": "the re-run with 1 % of lines changed <= 5 % of the first run's time"})
