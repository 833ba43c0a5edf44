"""Shared pieces of the benchmark scenarios: machine facts, processes, records."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from batchd import bench

ROOT = Path(__file__).resolve().parent.parent
# Tests point this elsewhere so that checking a scenario runs leaves no record.
RESULTS = Path(os.environ.get("BATCHD_BENCH_RESULTS",
                              Path(__file__).resolve().parent / "results"))
BATCHD = str(Path(sys.executable).parent / "batchd")
# The same command line with every model loaded as the fake engine (batchd/testing.py).
FAKE_BATCHD = [sys.executable, "-m", "batchd.testing"]
MODELS = ROOT / "models"

# The tiny random Llama, as the shipped CPU profile runs a model: vLLM's worker
# inside its engine core process (VLLM_ENABLE_V1_MULTIPROCESSING = "0"; on the
# CPU build each load then spawns one process importing vLLM, not two:
# docs/MODELS.md). On a GPU the flag changes nothing for batchd's engine.
TINY_PROFILE = """
model = "batchd/tiny-llama"
recipe = "tiny-llama"
[environment]
VLLM_CPU_KVCACHE_SPACE = "1"
VLLM_ENABLE_V1_MULTIPROCESSING = "0"
[engine]
dtype = "float32"
max_model_len = 512
enforce_eager = true
"""


def machine() -> dict:
    return {"hardware": bench.hardware(), "versions": bench.versions(),
            "host": os.uname().nodename, "kernel": os.uname().release}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def wait_final(status: Path, daemon: subprocess.Popen, timeout: float = float("inf")) -> str:
    """Wait for a job's final status line ("completed" or "failed"); return it.

    The file is read only when it grew, polled every 10 ms: a side that reads
    it whole 200 times a second takes CPU from the machine both sides share
    (0.5 CPU-s per 2,000-request run), while raw vLLM's harness blocks on a pipe.
    """
    deadline, seen = time.monotonic() + timeout, -1
    while True:
        try:
            size = status.stat().st_size
        except FileNotFoundError:
            size = -1
        if size != seen and size > 0:
            seen = size
            if found := FINAL.search(status.read_text()):
                return found.group(1)
        if daemon.poll() is not None:
            raise RuntimeError(f"{status.name}: the daemon exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{status.name}: no final status after {timeout:.0f} s")
        time.sleep(0.01)


FINAL = re.compile(r'"state": "(completed|failed)"')


def write_record(scenario: str, record: dict, path: Path | None = None) -> Path:
    """Write RESULTS/SCENARIO-STAMP.json (or rewrite PATH, for a scenario that
    saves what it has after each part)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = path or RESULTS / f"{scenario}-{stamp}.json"
    record = {"scenario": scenario, "at": stamp, "machine": machine(), **record}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def make_spool(base: Path, extra: str = "") -> Path:
    """A spool with the tiny profile as default; returns its config file."""
    (base / "profiles").mkdir(parents=True, exist_ok=True)
    (base / "profiles" / "tiny.toml").write_text(TINY_PROFILE)
    config = base / "config.toml"
    config.write_text(f'[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "profiles"\n'
                      f'default_profile = "tiny"\nmodels_dir = "{MODELS}"\n'
                      f'[watch]\nsettle_seconds = 0.2\n[log]\nformat = "json"\n' + extra)
    return config


def batchd_command() -> list[str]:
    """The batchd console script, or `python -m batchd` where none is installed
    (the lent GPU machine runs batchd from the checkout)."""
    return [BATCHD] if Path(BATCHD).exists() else [sys.executable, "-m", "batchd"]


def ensure_tiny() -> None:
    subprocess.run([*batchd_command(), "models", "prepare", "tiny-llama", "--config",
                    str(ROOT / "config.toml")], check=True, capture_output=True)


def peak_rss(cmd: list[str], env: dict | None = None, cwd: Path | None = None
             ) -> tuple[int, float, int, dict[str, int]]:
    """Run CMD; return (exit code, seconds, peak RSS bytes of its main process,
    {name: peak RSS bytes} of every process under it).

    Peaks are the kernel's own high-water marks (VmHWM), read until exit.
    """
    import psutil

    started = time.monotonic()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks: dict[int, int] = {}
    names: dict[int, str] = {}
    while proc.poll() is None:
        try:
            children = psutil.Process(proc.pid).children(True)
        except psutil.Error:
            children = []
        for child in children:
            if child.pid not in names:
                try:
                    line = " ".join(child.cmdline())
                    names[child.pid] = "batchd.engine.host" if "batchd.engine.host" in line \
                        else child.name()
                except psutil.Error:
                    continue
        for pid in [proc.pid, *names]:
            peaks[pid] = max(peaks.get(pid, 0), _hwm(pid))
        time.sleep(0.05)
    main = peaks.pop(proc.pid, 0)
    children_peaks: dict[str, int] = {}
    for pid, peak in peaks.items():
        children_peaks[names[pid]] = children_peaks.get(names[pid], 0) + peak
    return proc.returncode, time.monotonic() - started, main, children_peaks


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
