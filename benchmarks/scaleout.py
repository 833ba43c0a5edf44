"""Scenario `scaleout`: one bulk's worth of whole files on one daemon and on two
daemons sharing one spool (CONTRACT sections 1 and 7: each file claimed by one
rename, runs on one daemon).

Side by side on one machine, each a warm spool of its own, the same bulk cut
into ``FILES`` files and dropped at once (renames into the inbox) on each in
turn, the order rotating between repeats: the first drop to the last file's
final status line.

- ``one``: one daemon; its one engine runs up to ``max_running_jobs`` of the
  files at once;
- ``two``: two daemons on one spool, each free to use every core (vLLM's
  automatic thread binding then puts both engines' threads on the same cores);
- ``two_pinned``: the same with each daemon (and so its engine) on its own
  half of the cores, as ``CPUAffinity=`` gives each ``batchd@N`` unit.

A file is never cut over several daemons: jobs in parts are retired, and one
daemon drives every GPU of its host itself (``[engine] replicas``, CONTRACT
18). On a CPU machine every engine runs vLLM's engine core in its own process
(the shipped CPU profile's setting), and two daemons share the cores one
daemon used alone: ``two`` is a guard against a regression, not the promise.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .common import FAKE_BATCHD, TINY_PROFILE, batchd_command, ensure_tiny, make_spool, \
    summary, wait_final, write_record
from .concurrency import lines

MODES = ("one", "two", "two_pinned")
FILES = 8  # the bulk, cut in this many whole files
QUICK = {"bulk": 160, "tokens": 4, "fake": True}


class Spool:
    """A spool with N daemons on it; PIN: daemon i on the i-th share of the cores."""

    def __init__(self, base: Path, daemons: int, fake: bool, pin: bool):
        profile = TINY_PROFILE
        if _gpu():  # two engines share the one GPU's memory
            profile = profile.replace("[engine]\n", "[engine]\ngpu_memory_utilization = 0.4\n")
        config = make_spool(base, "[status]\ninterval = 0.5\n[scheduling]\n"
                            "max_running_jobs = 4\n")
        (base / "profiles" / "tiny.toml").write_text(profile)
        self.base = base
        self.inbox, self.outbox = base / "spool" / "inbox", base / "spool" / "outbox"
        self.inbox.mkdir(parents=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if fake:
            env["BATCHD_FAKE_STEP_SECONDS"] = "0.1"
        command = FAKE_BATCHD if fake else batchd_command()
        cores = sorted(os.sched_getaffinity(0))
        self.daemons = []
        for i in range(daemons):
            share = set(cores[i::daemons]) if pin else None
            self.daemons.append(subprocess.Popen(
                [*command, "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                stderr=open(base / f"daemon{i}.log", "wb"), env=env,
                preexec_fn=(lambda share=share: os.sched_setaffinity(0, share)) if share
                else None))
        self.count = 0

    def run(self, texts: list[str], timeout: float = 1800) -> tuple[float, int]:
        """Drop TEXTS as new files at once; seconds from the first drop to the last
        final line, and how many daemons ran them."""
        jobs = []
        for text in texts:
            self.count += 1
            job = f"bulk{self.count}"
            (self.inbox / f".{job}.part").write_text(text)
            jobs.append(job)
        began = time.perf_counter()
        for job in jobs:
            os.rename(self.inbox / f".{job}.part", self.inbox / f"{job}.jsonl")
        ran_on = set()
        for job in jobs:
            status = self.outbox / f"{job}.status.jsonl"
            state = wait_final(status, self.daemons[0],
                               max(1.0, timeout - (time.perf_counter() - began)))
            if state != "completed":
                raise RuntimeError(f"{job}: {state}")
            ran_on.add(json.loads(status.read_text().splitlines()[-1])["daemon"])
        return time.perf_counter() - began, len(ran_on)

    def warm(self, texts: list[str]) -> None:
        """Until every daemon has run one of the files (each has its model loaded)."""
        for _ in range(5):
            _, used = self.run(texts)
            if used >= len(self.daemons):
                return
        raise RuntimeError(f"only {used} of {len(self.daemons)} daemons ran a warm-up file")

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            try:
                daemon.wait(120)
            except subprocess.TimeoutExpired:
                daemon.kill()


def _gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi"], capture_output=True).returncode == 0


def run(repeats: int = 3, bulk: int = 4000, tokens: int = 64, fake: bool = False,
        quick: bool = False, modes: tuple[str, ...] = MODES) -> Path:
    if not fake:
        ensure_tiny()
    size = max(1, bulk // FILES)
    texts = [lines(f"bulk{k}", size, tokens) for k in range(FILES)]
    warmup = [lines(f"warm{k}", max(1, size // 4), tokens) for k in range(FILES)]
    times: dict[str, list[float]] = {m: [] for m in modes}
    used: dict[str, list[int]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        spools = {}
        try:
            for mode in modes:
                spools[mode] = Spool(Path(tmp) / mode, 2 if mode.startswith("two") else 1,
                                     fake, pin=mode == "two_pinned")
            for spool in spools.values():
                spool.warm(warmup)
            for i in range(repeats):
                rotated = modes[i % len(modes):] + modes[:i % len(modes)]
                for mode in rotated:
                    seconds, daemons = spools[mode].run(texts)
                    times[mode].append(round(seconds, 3))
                    used[mode].append(daemons)
                    print(mode, round(seconds, 2), "daemons", daemons, flush=True)
        finally:
            for spool in spools.values():
                spool.close()
    base = statistics.median(times["one"]) if "one" in times else None
    ratios = {f"{m}_over_one": round(statistics.median(times[m]) / base, 3)
              for m in modes if base and m != "one"}
    print(json.dumps(ratios), flush=True)
    return write_record("scaleout", {
        "settings": {"repeats": repeats, "bulk": bulk, "files": FILES, "max_tokens": tokens,
                     "fake": fake, "quick": quick, "modes": list(modes),
                     "model": "tiny-llama", "cores": len(os.sched_getaffinity(0)),
                     "gpu": _gpu()},
        "seconds": {m: summary(v) for m, v in times.items()},
        "daemons_used": used, "ratios": ratios,
        "goals": {"two_over_one": "< 1 where the daemons have hardware of their own"}})
