"""Scenario `images`: a job's pictures are read when their requests run, not
held by the daemon.

Two jobs through `batchd run --once` on real vLLM (the tiny-vision profile,
1 output token each): SMALL and LARGE lines, each with its own picture (a
distinct 64x64 PNG) in the job's media folder, given by relative path. The
daemon's peak RSS (VmHWM of its main process) for the large job against the
small one is the figure; the engine processes' peaks are recorded beside it
(vLLM decodes each picture there when its request is scheduled).
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path

from .common import (BATCHD, MODELS, ROOT, batchd_command, peak_rss, summary,
                     write_record)

PROFILE = (ROOT / "profiles" / "tiny-vision.toml").read_text()


def make_job(base: Path, n: int) -> Path:
    from PIL import Image

    (base / "profiles").mkdir(parents=True)
    (base / "profiles" / "tiny-vision.toml").write_text(PROFILE)
    config = base / "config.toml"
    config.write_text(f'[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "profiles"\n'
                      f'default_profile = "tiny-vision"\nmodels_dir = "{MODELS}"\n'
                      f'[watch]\nsettle_seconds = 0.2\n[log]\nformat = "json"\n')
    inbox = base / "spool" / "inbox"
    folder = inbox / "pics.media"
    folder.mkdir(parents=True)
    rng = random.Random(n)
    with open(inbox / "pics.jsonl", "w") as out:
        for i in range(n):
            name = f"{i // 1000:03d}/{i}.png"
            (folder / name).parent.mkdir(exist_ok=True)
            pixels = bytes(rng.getrandbits(8) for _ in range(64 * 64 * 3))
            buffer = io.BytesIO()
            Image.frombytes("RGB", (64, 64), pixels).save(buffer, format="PNG")
            (folder / name).write_bytes(buffer.getvalue())
            out.write(json.dumps({"custom_id": f"r{i}", "max_tokens": 1, "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Describe the picture."},
                    {"type": "image_url", "image_url": {"url": name}}]}]}) + "\n")
    return config


def one(n: int, base: Path) -> dict:
    config = make_job(base, n)
    code, seconds, peak, engine_peak = peak_rss([*batchd_command(), "run", "--once",
                                                 "--config", str(config)])
    bench = json.loads((base / "spool" / "outbox" / "pics.bench.json").read_text())
    assert code == 0 and bench["requests"]["succeeded"] == n, (code, bench["requests"])
    assert bench["images"] == n
    return {"images": n, "peak_rss_bytes": peak,
            "engine_processes_peak_rss_bytes": sum(engine_peak.values()),
            "seconds": round(seconds, 2), "generation_s": bench["timing_s"]["generation"],
            "model_load_s": bench["timing_s"]["model_load"]}


def run(repeats: int = 1, small: int = 50, large: int = 5_000, quick: bool = False) -> Path:
    import subprocess

    subprocess.run([*batchd_command(), "models", "prepare", "tiny-vision", "--config",
                    str(ROOT / "config.toml")], check=True, capture_output=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for n in (small, large):
                runs.append(one(n, Path(tmp) / f"{n}-{r}"))
                print(json.dumps(runs[-1]), flush=True)
    median = {n: {key: summary([x[key] for x in runs if x["images"] == n])["median"]
                  for key in ("peak_rss_bytes", "engine_processes_peak_rss_bytes",
                              "generation_s")} for n in (small, large)}
    return write_record("images", {
        "settings": {"small": small, "large": large, "repeats": repeats, "quick": quick,
                     "model": "tiny-vision, one 64x64 PNG a line, 1 output token",
                     "batchd": BATCHD},
        "runs": runs, "medians": median,
        "peak_ratio_large_over_small": {
            "daemon": round(median[large]["peak_rss_bytes"] / median[small]["peak_rss_bytes"],
                            3),
            "engine_processes": round(median[large]["engine_processes_peak_rss_bytes"]
                                      / median[small]["engine_processes_peak_rss_bytes"], 3)},
        "goal": "daemon peak RSS for the large job within the memory scenario's 1.5x"})


QUICK = {"small": 5, "large": 20}
