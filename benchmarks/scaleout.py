"""Scenario `scaleout`: one big file on one daemon and on two (CONTRACT 18).

Side by side on one machine, each a warm spool of its own, the same bulk file
run on each in turn (the order rotating between repeats): drop (rename into
the inbox) to the final status line.

- ``one``: one daemon, the file whole (``part_lines = 0``);
- ``one_parts``: one daemon, the file in ``PARTS`` parts: what splitting
  costs a daemon alone (goal: at most 1.03x ``one``);
- ``two``: two daemons on one spool, the file in parts, each daemon free to
  use every core (vLLM's automatic thread binding then puts both engines'
  threads on the same cores);
- ``two_pinned``: the same with each daemon (and so its engine) on its own
  half of the cores, as ``CPUAffinity=`` gives each ``batchd@N`` unit.

On a CPU machine every engine runs vLLM's engine core in its own process (the
shipped CPU profile's setting), and two daemons share the cores one daemon
used alone: ``two`` is a guard against a regression, not the promise; on a
GPU machine (two daemons on one GPU, benchmarks/gpu_device.sh) it is the
figure that matters.
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

MODES = ("one", "one_parts", "two", "two_pinned")
PARTS = 8
QUICK = {"bulk": 160, "tokens": 4, "fake": True}


class Spool:
    """A spool with N daemons on it; PIN: daemon i on the i-th share of the cores."""

    def __init__(self, base: Path, daemons: int, part_lines: int, fake: bool, pin: bool):
        profile = TINY_PROFILE
        if _gpu():  # two engines share the one GPU's memory
            profile = profile.replace("[engine]\n", "[engine]\ngpu_memory_utilization = 0.4\n")
        config = make_spool(base, f"[status]\ninterval = 0.5\n[scheduling]\n"
                            f"part_lines = {part_lines}\nmax_running_jobs = 4\n")
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

    def run(self, text: str, timeout: float = 1800) -> tuple[float, dict]:
        """Drop TEXT as a new file; seconds to its final line, and its bench record."""
        self.count += 1
        job = f"bulk{self.count}"
        part = self.inbox / f".{job}.part"
        part.write_text(text)
        began = time.perf_counter()
        os.rename(part, self.inbox / f"{job}.jsonl")
        state = wait_final(self.outbox / f"{job}.status.jsonl", self.daemons[0], timeout)
        seconds = time.perf_counter() - began
        if state != "completed":
            raise RuntimeError(f"{job}: {state}")
        return seconds, json.loads((self.outbox / f"{job}.bench.json").read_text())

    def warm(self, text: str) -> None:
        """Until every daemon has answered lines of one file (each has its model)."""
        for _ in range(5):
            _, bench = self.run(text)
            if len(bench["workers"]) >= len(self.daemons):
                return
        raise RuntimeError(f"a daemon never took a part of the warm-up file: {bench['workers']}")

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
    part_lines = bulk // PARTS
    text = lines("bulk", bulk, tokens)
    # six parts as long as the bulk's: a daemon takes at most two parts of a job
    # at once and looks for parts every poll_interval, so every daemon gets one
    warmup = lines("warm", 6 * part_lines, tokens)
    times: dict[str, list[float]] = {m: [] for m in modes}
    workers: dict[str, list[int]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        spools = {}
        try:
            for mode in modes:
                spools[mode] = Spool(Path(tmp) / mode, 2 if mode.startswith("two") else 1,
                                     0 if mode == "one" else part_lines, fake,
                                     pin=mode == "two_pinned")
            for spool in spools.values():
                spool.warm(warmup)
            for i in range(repeats):
                rotated = modes[i % len(modes):] + modes[:i % len(modes)]
                for mode in rotated:
                    seconds, bench = spools[mode].run(text)
                    times[mode].append(round(seconds, 3))
                    workers[mode].append(len(bench["workers"]))
                    print(mode, round(seconds, 2), "workers", len(bench["workers"]), flush=True)
        finally:
            for spool in spools.values():
                spool.close()
    base = statistics.median(times["one"]) if "one" in times else None
    ratios = {f"{m}_over_one": round(statistics.median(times[m]) / base, 3)
              for m in modes if base and m != "one"}
    print(json.dumps(ratios), flush=True)
    return write_record("scaleout", {
        "settings": {"repeats": repeats, "bulk": bulk, "max_tokens": tokens, "fake": fake,
                     "quick": quick, "part_lines": part_lines, "modes": list(modes),
                     "model": "tiny-llama", "cores": len(os.sched_getaffinity(0)),
                     "gpu": _gpu()},
        "seconds": {m: summary(v) for m, v in times.items()},
        "workers": workers, "ratios": ratios,
        "goals": {"one_parts_over_one": "<= 1.03 (the cost of splitting, one daemon)",
                  "two_over_one": "< 1 where the daemons have hardware of their own"}})

