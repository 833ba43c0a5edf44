"""Where each engine replica runs (``[engine] replicas``, engine/replicas.py):
its GPUs, a tensor x pipeline parallel group of the visible ones, or on a
host without GPUs its own share of the daemon's cores; and how ``batchd
status`` and the bench record name the place ("HOST GPU0,1", "HOST cores 0-7").
"""

from __future__ import annotations

import os
import socket
from typing import Iterable

from ..profiles import Profile


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES, else those the
    NVIDIA driver lists (none on a host without one)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def gpus_per_replica(profile: Profile) -> int:
    """The GPUs one engine of PROFILE spans: tensor x pipeline parallel."""
    return int(profile.engine.get("tensor_parallel_size", 1) or 1) * \
        int(profile.engine.get("pipeline_parallel_size", 1) or 1)


def replica_places(profile: Profile, replicas: int | str
                   ) -> tuple[int, list[tuple[str, dict[str, str]]]]:
    """How many replicas of PROFILE and, for each, where it runs (for `batchd
    status`) and its environment: its GPUs (tensor x pipeline parallel of them),
    or on a host without GPUs its own share of the cores."""
    host = socket.gethostname()
    gpus = visible_gpus()
    width = gpus_per_replica(profile)
    if replicas == "auto":
        count = max(1, len(gpus) // width) if gpus else 1
    else:
        count = int(replicas)
    if gpus:
        # tp x pp GPUs a replica; more replicas than groups share them in turn
        whole = [gpus[i * width:(i + 1) * width] for i in range(max(1, len(gpus) // width))]
        groups = [whole[i % len(whole)] for i in range(count)]
        return count, [(f"{host} GPU{','.join(group)}",
                        {"CUDA_VISIBLE_DEVICES": ",".join(group)}) for group in groups]
    cores = cpu_slices(count)
    return count, [(f"{host} cores {core_range(own)}",
                    {"BATCHD_ENGINE_CPUS": ",".join(map(str, own))}) for own in cores]


def core_range(cores: list[int]) -> str:
    """CORES as a person writes them: "0-7", "3", or "0,2,5" when not a run."""
    if len(cores) > 1 and cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def cpu_slices(count: int, cpus: Iterable[int] | None = None) -> list[list[int]]:
    """This process's cores cut into COUNT runs of neighbours, one per replica
    (a replica on fewer cores than the others when they do not divide)."""
    allowed = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if count >= len(allowed):
        return [[allowed[i % len(allowed)]] for i in range(count)]
    size, extra = divmod(len(allowed), count)
    slices, at = [], 0
    for i in range(count):
        n = size + (1 if i < extra else 0)
        slices.append(allowed[at:at + n])
        at += n
    return slices
