"""Scenario `claim`: how fast an idle daemon notices a file.

Files are renamed into the inbox of an idle daemon (fake engine: only the
spool is measured) one at a time; the latency is from the rename to the claim,
i.e. the first status line's timestamp. inotify mode claims a renamed file at
once; poll mode finds it at the next scan (`poll_interval`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from .common import FAKE_BATCHD, make_spool, summary, write_record

QUICK = {"files": 10}
POLL_INTERVAL = 0.5


def latencies(mode: str, files: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = make_spool(Path(tmp))
        text = config.read_text().replace(
            "[watch]\n", f'[watch]\nmode = "{mode}"\npoll_interval = {POLL_INTERVAL}\n')
        config.write_text(text)
        inbox, outbox = Path(tmp) / "spool" / "inbox", Path(tmp) / "spool" / "outbox"
        inbox.mkdir(parents=True)
        daemon = subprocess.Popen([*FAKE_BATCHD, "run", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = []
        try:
            time.sleep(2.0)  # let it reach idle
            for i in range(files):
                part = inbox / f".f{i}.part"
                part.write_text('{"prompt": "x"}\n')
                renamed = time.time()
                os.rename(part, inbox / f"f{i}.jsonl")
                status = outbox / f"f{i}.status.jsonl"
                while not (status.exists() and status.stat().st_size > 0):
                    time.sleep(0.001)
                first = json.loads(status.read_text().splitlines()[0])
                claimed = datetime.fromisoformat(first["ts"].replace("Z", "+00:00")).timestamp()
                out.append(max(0.0, claimed - renamed))
                while '"state": "completed"' not in status.read_text():
                    time.sleep(0.001)
                time.sleep(0.05 if mode == "inotify" else POLL_INTERVAL * 0.37 * (i % 3))
        finally:
            daemon.terminate()
            daemon.wait(30)
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def run(repeats: int = 1, files: int = 200, quick: bool = False) -> Path:
    modes = {}
    for mode in ("inotify", "poll"):
        values = [v for _ in range(repeats) for v in latencies(mode, files)]
        modes[mode] = {"median_s": statistics.median(values), "p99_s": p99(values),
                       "max_s": max(values), "summary": summary(values)}
        print(mode, json.dumps({k: round(v, 4) for k, v in modes[mode].items()
                                if k != "summary"}), flush=True)
    return write_record("claim", {
        "settings": {"files": files, "repeats": repeats, "poll_interval": POLL_INTERVAL,
                     "quick": quick, "engine": "fake"},
        "modes": modes,
        "goal": "inotify median <= 50 ms, p99 <= 250 ms; poll <= poll_interval + 100 ms"})
