"""Scenario `window`: what the engine's window costs a bulk job.

One warm daemon per ``[engine] window`` (0, the shipped auto: vLLM's
max_num_seqs and a quarter more; and fixed windows), the same bulk file run
on each in turn, the order alternating between repeats so drift of the shared
machine falls on all alike. Drop (rename into the inbox) to the final status
line. The claim of the auto window: within a few percent of a deep (1,024)
window's time, while a job that joins waits behind at most a quarter of a
batch (the `concurrency` scenario measures that wait).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from .common import ensure_tiny, summary, write_record
from .concurrency import Spool, lines

QUICK = {"bulk": 100, "fake": True, "windows": (0, 64)}


def run(repeats: int = 3, bulk: int = 2000, tokens: int = 64, fake: bool = False,
        quick: bool = False, windows: tuple[int, ...] = (0, 512, 1024)) -> Path:
    if not fake:
        ensure_tiny()
    times: dict[int, list[float]] = {w: [] for w in windows}
    text = lines("bulk", bulk, tokens)
    with tempfile.TemporaryDirectory() as tmp:
        spools = {w: Spool(Path(tmp) / f"w{w}", "fcfs", fake, w) for w in windows}
        try:
            for spool in spools.values():
                spool.wait(spool.drop("warmup", lines("warmup", 2, 4)), timeout=900)
            for i in range(repeats):
                for w in (windows if i % 2 == 0 else windows[::-1]):
                    spool = spools[w]
                    times[w] += spool.wait(spool.drop("bulk", text))
        finally:
            for spool in spools.values():
                spool.close()
    deep = statistics.median(times[max(windows)])
    ratios = {f"window_{w}_over_{max(windows)}": round(statistics.median(times[w]) / deep, 3)
              for w in windows}
    print(json.dumps(ratios), flush=True)
    return write_record("window", {
        "settings": {"repeats": repeats, "bulk": bulk, "max_tokens": tokens, "fake": fake,
                     "quick": quick, "windows": list(windows), "model": "tiny-llama"},
        "bulk_s": {str(w): summary(v) for w, v in times.items()},
        "ratios": ratios,
        "goal": "the auto window (0) within 1.05x of the deepest window's bulk time"})
