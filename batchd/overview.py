"""What this spool and host have, for an operator: each profile's fit and
server options, the bench records by profile, the spool's daemons and their
engine replicas (the jobs themselves are views.py's)."""

from __future__ import annotations

import sys

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .profiles import Profile
from .spool.listing import bench_groups


def print_fit(profiles: list[Profile], models_dir: Path, vram: int) -> int:
    """`batchd profiles check`: whether each profile's weights and KV cache fit a
    card of VRAM bytes (engine/fit.py's estimate); 1 when one does not."""
    from .engine.fit import FitError, check

    print(f"{'PROFILE':14} {'WEIGHTS':>8} {'BUDGET':>7} {'KV CACHE':>9} {'KV/TOKEN':>9} "
          f"{'MAX LEN':>8} {'FULL SEQS':>9} {'IMAGES':>11}  FITS {vram / 1024**3:g} GiB")
    ok = True
    for profile in sorted(profiles, key=lambda p: p.name):
        try:
            r = check(profile, models_dir, vram)
        except (FitError, KeyError, ValueError) as exc:
            print(f"{profile.name:14} cannot estimate: {exc}")
            ok = False
            continue
        ok = ok and r["fits"]
        lora = f"  (LoRA slots {r['lora_gb']:.2f}G)" if r["lora_gb"] else ""
        # images a prompt may carry, and the tokens each takes of max_model_len
        seen = "no" if not r["images"] else f"{r['images']} x {r['image_tokens']}t" \
            if r["image_tokens"] else f"{r['images']}"
        print(f"{r['profile']:14} {r['weights_gb']:7.1f}G {r['budget_gb']:6.1f}G "
              f"{r['kv_cache_gb']:8.1f}G {r['kv_kib_per_token']:7.0f}Ki {r['max_model_len']:8d} "
              f"{r['full_length_sequences']:9.1f} {seen:>11}  {'yes' if r['fits'] else 'NO'}{lora}")
    return 0 if ok else 1


def print_capabilities(profiles: list[Profile]) -> int:
    """`batchd profiles check`, part two: what each profile's server options give on
    the installed vLLM (engine/capabilities.py); 1 when a profile names a parser
    vLLM does not have, a missing template or an unknown engine key."""
    try:
        from .engine.capabilities import capabilities
        found = [capabilities(profile) for profile in sorted(profiles, key=lambda p: p.name)]
    except ImportError as exc:
        print(f"\nserver options not checked: vLLM is not importable here ({exc})")
        return 0
    print(f"\nSERVER OPTIONS on vLLM {found[0].release if found else '?'}")
    for caps in found:
        print(f"{caps.profile:14} {caps.line().split('; ', 1)[1]}")
        for problem in caps.problems:
            print(f"{'':14} PROBLEM: {problem}")
    return 1 if any(caps.problems for caps in found) else 0


def bench_report(outbox: Path, plot: str | None = None) -> int:
    """A table of all bench records grouped by profile; a bar chart with --plot."""
    groups = bench_groups(outbox)
    table = Table(box=None, header_style="bold")
    for column in ("PROFILE", "JOBS", "REQUESTS", "TOKENS", "OUT TOK/S", "REQ/S", "LOAD S",
                   "HARDWARE"):
        table.add_column(column, no_wrap=True)
    for name, g in sorted(groups.items()):
        gen = g["gen"] or float("nan")
        hw = g["hardware"]
        where = ", ".join(hw.get("gpus") or []) or f"{hw.get('cpu_count')} CPUs, no GPU"
        table.add_row(name, str(g["jobs"]), str(g["requests"]), str(g["total_tokens"]),
                      f"{g['completion'] / gen:.1f}", f"{g['requests'] / gen:.2f}",
                      f"{g['load']:.1f}", where[:40])
    Console().print(table)
    return _plot(groups, plot) if plot else 0


def _plot(groups: dict[str, dict[str, Any]], path: str) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("batchd: --plot needs matplotlib (pip install 'batchd[plot]')", file=sys.stderr)
        return 1
    names = sorted(groups)
    rates = [groups[n]["completion"] / groups[n]["gen"] if groups[n]["gen"] else 0
             for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3))
    ax.bar(names, rates)
    ax.set_ylabel("output tokens/s")
    ax.set_title("batchd throughput by profile")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")
    return 0


def print_daemons(records: list[dict[str, Any]]) -> None:
    """The spool's daemons (spool/daemons.py), live ones first."""
    live = [r for r in records if r.get("live")]
    if not live:
        return
    table = Table(box=None, header_style="bold")
    for column in ("DAEMON", "LOADED", "RUNNING", "FREE SLOTS", "HEARTBEAT"):
        table.add_column(column)
    for r in live:
        table.add_row(str(r.get("daemon")), r.get("profile") or "-",
                      ", ".join(r.get("running") or []) or "-", str(r.get("free", "-")),
                      f"{r.get('age_s', 0):.0f}s ago")
    Console().print(table)
    replicas = [(r.get("daemon"), line) for r in live for line in r.get("replicas") or []]
    if replicas:
        table = Table(box=None, header_style="bold")
        for column in ("DAEMON", "REPLICA", "WHERE", "STATE", "REQUESTS", "TOK/S", "DEATHS"):
            table.add_column(column)
        for daemon, line in replicas:
            seconds = line.get("generation_s") or 0
            tps = line.get("output_tokens", 0) / seconds if seconds else 0
            table.add_row(str(daemon), str(line.get("replica")), str(line.get("where")),
                          str(line.get("state")), str(line.get("requests", 0)),
                          f"{tps:.1f}" if tps else "-", str(line.get("deaths", 0)))
        Console().print(table)
