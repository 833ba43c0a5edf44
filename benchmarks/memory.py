"""Scenario `memory`: batchd's memory does not grow with the file.

A 1,000-line and a 100,000-line job run through `batchd run --once` on real
vLLM (tiny model, 1 output token each). The model lives in batchd's engine
process (and vLLM's engine core under it), so the daemon's peak RSS (VmHWM of
the main process) excludes model weights and KV cache; the engine processes'
peaks are recorded beside it. Then `batchd validate` on a 1,000,000-line file:
peak RSS and lines/s.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .common import (BATCHD, FAKE_BATCHD, ensure_tiny, make_spool, peak_rss, summary,
                     write_record)


def write_lines(path: Path, n: int, max_tokens: int = 1) -> None:
    with open(path, "w") as out:
        for i in range(n):
            out.write(json.dumps({"custom_id": f"r{i}", "max_tokens": max_tokens,
                                  "messages": [{"role": "user",
                                                "content": f"Request number {i}"}]}) + "\n")


def daemon_peak(n: int, fake: bool, base: Path) -> dict:
    config = make_spool(base)
    inbox = base / "spool" / "inbox"
    inbox.mkdir(parents=True)
    write_lines(inbox / "job.jsonl", n)
    command = FAKE_BATCHD if fake else [BATCHD]
    code, seconds, peak, engine_peak = peak_rss([*command, "run", "--once", "--config",
                                                 str(config)])
    bench = json.loads((base / "spool" / "outbox" / "job.bench.json").read_text())
    assert code == 0 and bench["requests"]["total"] == n, (code, bench["requests"])
    return {"requests": n, "engine": "fake" if fake else "vllm", "peak_rss_bytes": peak,
            "engine_processes_peak_rss_bytes": sum(engine_peak.values()),
            "engine_processes": engine_peak,
            "seconds": round(seconds, 2), "generation_s": bench["timing_s"]["generation"]}


def run(repeats: int = 1, small: int = 1_000, large: int = 100_000,
        validate_lines: int = 1_000_000, quick: bool = False) -> Path:
    ensure_tiny()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine_fake in (True, False):
            for n in (small, large):
                for r in range(repeats):
                    base = Path(tmp) / f"{'fake' if engine_fake else 'vllm'}-{n}-{r}"
                    runs.append(daemon_peak(n, engine_fake, base))
                    print(json.dumps(runs[-1]), flush=True)
        big = Path(tmp) / "validate.jsonl"
        write_lines(big, validate_lines)
        config = make_spool(Path(tmp) / "validate")
        code, seconds, peak, _ = peak_rss([BATCHD, "validate", str(big), "--config",
                                           str(config)])
        validate = {"lines": validate_lines, "exit_code": code, "seconds": round(seconds, 2),
                    "lines_per_s": round(validate_lines / seconds), "peak_rss_bytes": peak,
                    "file_bytes": big.stat().st_size}
        print(json.dumps(validate), flush=True)
    ratios = {}
    for engine in ("fake", "vllm"):
        peaks = {n: summary([r["peak_rss_bytes"] for r in runs
                             if r["engine"] == engine and r["requests"] == n])["median"]
                 for n in (small, large)}
        ratios[engine] = round(peaks[large] / peaks[small], 3)
    engine_peaks = {n: summary([r["engine_processes_peak_rss_bytes"] for r in runs
                                if r["engine"] == "vllm" and r["requests"] == n])["median"]
                    for n in (small, large)}
    ratios["vllm_engine_processes"] = round(engine_peaks[large] / engine_peaks[small], 3)
    return write_record("memory", {
        "settings": {"small": small, "large": large, "repeats": repeats, "quick": quick,
                     "validate_lines": validate_lines, "model": "tiny-llama, 1 output token"},
        "runs": runs, "validate": validate, "peak_ratio_large_over_small": ratios,
        "goal": "daemon peak RSS for the large job within 1.5x of the small job"})
QUICK = {"small": 20, "large": 200, "validate_lines": 1000}
