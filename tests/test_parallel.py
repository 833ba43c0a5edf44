"""Profile [engine] parallelism reaches vLLM unchanged.

Tensor parallelism runs for real on the CPU build: two CPU workers, one core
each. The Ray backend cannot run here (vLLM's CPU platform refuses Ray), and
vLLM's offline LLM refuses data parallelism in one process; those tests show
the arguments arriving in vLLM as given, and vLLM's own refusal in the job.
"""

import ast
import json
import os
import re
import subprocess
import tomllib

import pytest

from conftest import BATCHD, drop, final_state, read_jsonl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BASE = """
model = "batchd/tiny-llama"
recipe = "tiny-llama"
[environment]
VLLM_CPU_KVCACHE_SPACE = "1"
{environment}
[engine]
dtype = "float32"
max_model_len = 512
enforce_eager = true
{engine}
"""


def run_job(tmp_path, tiny_model, environment: str, engine: str):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "par.toml").write_text(
        BASE.format(environment=environment, engine=engine))
    config = tmp_path / "config.toml"
    config.write_text(f'[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "profiles"\n'
                      f'default_profile = "par"\nmodels_dir = "{tiny_model.parent}"\n'
                      f'[watch]\nsettle_seconds = 0.1\n')
    inbox = tmp_path / "spool" / "inbox"
    inbox.mkdir(parents=True)
    drop(inbox, "job.jsonl", [{"custom_id": "a", "prompt": "Hello", "max_tokens": 4},
                              {"custom_id": "b", "messages": [{"role": "user", "content": "Hi"}],
                               "max_tokens": 4}])
    run = subprocess.run([BATCHD, "run", "--once", "--config", str(config)], timeout=600,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-3000:]
    return run.stdout, tmp_path / "spool" / "outbox"


def vllm_args(log: str) -> dict:
    """The arguments vLLM says it was given ("non-default args: {...}")."""
    found = re.search(r"non-default args: (\{.*\})", log)
    assert found, log[-3000:]
    return ast.literal_eval(found.group(1))


def test_tensor_parallel_job_runs_on_two_cpu_workers(tmp_path, tiny_model):
    log, outbox = run_job(tmp_path, tiny_model, 'VLLM_CPU_OMP_THREADS_BIND = "0|1"',
                             'tensor_parallel_size = 2\ndistributed_executor_backend = "mp"')
    assert final_state(outbox, "job") == "completed", log[-3000:]
    assert len(read_jsonl(outbox / "job.results.jsonl")) == 2
    given = vllm_args(log)
    assert given["tensor_parallel_size"] == 2
    assert given["distributed_executor_backend"] == "mp"
    assert "world_size=2" in log  # vLLM started two workers
    engine = tomllib.loads((outbox / "job.job.toml").read_text())["engine"]
    assert engine["tensor_parallel_size"] == 2
    bench = json.loads((outbox / "job.bench.json").read_text())
    assert bench["engine_args"]["distributed_executor_backend"] == "mp"


def test_ray_backend_and_pipeline_parallel_reach_vllm(tmp_path, tiny_model):
    log, outbox = run_job(tmp_path, tiny_model, "",
                          'tensor_parallel_size = 2\npipeline_parallel_size = 2\n'
                          'distributed_executor_backend = "ray"')
    given = vllm_args(log)
    assert {k: given.get(k) for k in ("tensor_parallel_size", "pipeline_parallel_size",
                                      "distributed_executor_backend")} \
        == {"tensor_parallel_size": 2, "pipeline_parallel_size": 2,
            "distributed_executor_backend": "ray"}
    # The job fails with vLLM's own Ray refusal (Ray not installed, or the CPU
    # platform); the daemon reports it on every line and finishes the run.
    status = failed_job(outbox)
    # The root cause, printed by vLLM's engine core, is in the job's error.
    assert re.search(r"Failed to import Ray|does not support ray",
                     status["errors"][0]["message"]), status["errors"][0]["message"]


def test_data_parallel_size_reaches_vllm(tmp_path, tiny_model):
    """vLLM 0.32's offline LLM refuses data_parallel_size > 1 itself; the job
    says so (one daemon per GPU is batchd's data parallelism)."""
    _, outbox = run_job(tmp_path, tiny_model, "", "data_parallel_size = 2")
    status = failed_job(outbox)
    assert "LLM(data_parallel_size=2) is not supported" in status["errors"][0]["message"]


def failed_job(outbox):
    assert final_state(outbox, "job") == "failed"
    status = read_jsonl(outbox / "job.status.jsonl")[-1]
    assert status["errors"][0]["code"] == "engine_error"
    errors = read_jsonl(outbox / "job.errors.jsonl")
    assert [e["response"]["body"]["error"]["code"] for e in errors] == ["engine_error"] * 2
    return status
