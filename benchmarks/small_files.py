"""Scenario `small_files`: many small files through one daemon against vLLM's
own batch runner, started once per file (what users of `run_batch` do today).

Both sides answer the same FILES x REQUESTS chat requests (greedy, fixed
length) on the same model and engine arguments. batchd: one warm-up job, then
all files renamed into the inbox of the running daemon at once, timed from
the first rename to the last final status line (the daemon's one model load
is reported apart and added to its total). Peer: `python -m
vllm.entrypoints.openai.run_batch -i FILE -o OUT` per file, timed from the
first start to the last exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BATCHD, MODELS, ensure_tiny, make_spool, wait_final, write_record

QUICK = {"files": 2, "requests": 2}


def batch_lines(f: int, requests: int) -> str:
    return "".join(json.dumps({
        "custom_id": f"f{f}-r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": str(MODELS / "tiny-llama"), "max_tokens": 16, "temperature": 0.0,
                 "ignore_eos": True,
                 "messages": [{"role": "user", "content": f"File {f} request {i}"}]}}) + "\n"
        for i in range(requests))


def peer(tmp: Path, files: int, requests: int) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    per_file = []
    started = time.perf_counter()
    for f in range(files):
        src, out = tmp / f"peer{f}.jsonl", tmp / f"peer{f}.out.jsonl"
        src.write_text(batch_lines(f, requests))
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i",
                        str(src), "-o", str(out), "--model", str(MODELS / "tiny-llama"),
                        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"],
                       env=env, check=True, capture_output=True)
        per_file.append(time.perf_counter() - t)
        assert len(out.read_text().splitlines()) == requests
    return {"total_s": time.perf_counter() - started, "per_file_s": per_file}


def ours(tmp: Path, files: int, requests: int) -> dict:
    config = make_spool(tmp / "daemon")
    inbox, outbox = tmp / "daemon" / "spool" / "inbox", tmp / "daemon" / "spool" / "outbox"
    inbox.mkdir(parents=True)
    daemon = subprocess.Popen([BATCHD, "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def wait(job: str) -> None:
        if wait_final(outbox / f"{job}.status.jsonl", daemon) != "completed":
            raise RuntimeError(f"{job} failed")

    try:
        started = time.perf_counter()
        (inbox / "warmup.jsonl").write_text(batch_lines(999, 1))
        wait("warmup")
        load = json.loads((outbox / "warmup.bench.json").read_text())["timing_s"]["model_load"]
        first_job = time.perf_counter() - started
        for f in range(files):
            part = inbox / f".f{f}.part"
            part.write_text(batch_lines(f, requests))
        started = time.perf_counter()
        for f in range(files):
            os.rename(inbox / f".f{f}.part", inbox / f"f{f}.jsonl")
        for f in range(files):
            wait(f"f{f}")
        files_s = time.perf_counter() - started
    finally:
        daemon.terminate()
        daemon.wait(120)
    return {"model_load_s": load, "warmup_job_s": first_job, "files_s": files_s,
            "total_s": first_job + files_s}


def run(repeats: int = 1, files: int = 20, requests: int = 10, quick: bool = False) -> Path:
    ensure_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        batchd = ours(Path(tmp), files, requests)
        print("batchd", json.dumps(batchd), flush=True)
        runner = peer(Path(tmp), files, requests)
        print("run_batch", json.dumps(runner), flush=True)
    ratio = round(runner["total_s"] / batchd["total_s"], 2)
    return write_record("small_files", {
        "settings": {"files": files, "requests": requests, "quick": quick,
                     "model": "tiny-llama", "max_tokens": 16},
        "batchd": batchd, "run_batch": runner,
        "ratios": {"run_batch_total_over_batchd_total": ratio},
        "goal": "batchd >= 10x faster in total wall time"})
