"""Benchmarks run and write their records (their timings are never asserted here)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_memory_scenario_runs_and_records(tiny_model, tmp_path):
    env = {**os.environ, "BATCHD_BENCH_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks", "run", "memory", "--quick"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (record_path,) = tmp_path.glob("memory-*.json")
    record = json.loads(record_path.read_text())
    assert record["settings"]["quick"] is True
    assert {r["engine"] for r in record["runs"]} == {"fake", "vllm"}
    assert all(r["peak_rss_bytes"] > 0 for r in record["runs"])
    assert record["validate"]["exit_code"] == 0 and record["validate"]["lines"] == 1000
    assert set(record["peak_ratio_large_over_small"]) == {"fake", "vllm",
                                                          "vllm_engine_processes"}
    for run in record["runs"]:  # the model lives in batchd's engine process
        assert ("batchd.enginehost" in run["engine_processes"]) == (run["engine"] == "vllm")
    assert record["machine"]["hardware"]["cpu_count"] >= 1
