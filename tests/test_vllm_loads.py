"""Model loads on real vLLM: a load cut short by the engine process's death is an
engine death (the job waits and loads again), a load that fails by itself fails
its job with vLLM's reason, and the daemon goes on to the next file.

One daemon, files dropped one after another: a profile whose model vLLM
refuses; the engine process killed once while loading (the job completes); and
killed max_engine_failures times in a row while loading (the job fails, naming
the deaths). Kills land once vLLM's engine core runs, deep inside the load.
"""

import json
import shutil

import psutil
import pytest

from batchd.spool.outbox import read_status

from conftest import (BENCH_TINY, DaemonProcess, drop, final_state, outputs, served_spool,
                      wait_for)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def engine_tree(daemon, seen: set[int]):
    """(an engine process of a daemon not in SEEN, vLLM's engine cores under it)."""
    try:
        tree = psutil.Process(daemon.proc.pid).children(recursive=True)
    except psutil.Error:
        return None, []
    host = None
    for p in tree:
        try:
            if "batchd.engine.host" in " ".join(p.cmdline()) and p.pid not in seen \
                    and p.status() != psutil.STATUS_ZOMBIE:
                host = p
        except psutil.Error:
            continue
    if host is None:
        return None, []
    cores = []
    try:
        for p in host.children(recursive=True):
            try:
                if "EngineCore" in p.name() + " ".join(p.cmdline()):
                    cores.append(p)
            except psutil.Error:
                continue
    except psutil.Error:
        return None, []
    return host, cores


def events(daemon, name):
    return [e for e in daemon.logs() if e.get("event") == name]


def kill_while_loading(daemon, seen: set[int], deep: bool = True) -> list:
    """Kill the next engine process (one not in SEEN) before it is loaded, as the
    OOM killer would: that process alone; DEEP: once vLLM's engine core runs
    under it. Returns once the daemon logged the death, with the engine cores
    that ran under it."""
    loaded = len(events(daemon, "engine_loaded"))
    died = len(events(daemon, "engine_died"))

    def loading():
        host, cores = engine_tree(daemon, seen)
        return (host, cores) if host is not None and (cores or not deep) else None

    host, cores = wait_for(loading, 300, interval=0.02, what="an engine process loading")
    host.kill()
    seen.add(host.pid)
    wait_for(lambda: len(events(daemon, "engine_died")) > died, 60, what="the death logged")
    assert len(events(daemon, "engine_loaded")) == loaded, "it loaded before the kill"
    return cores


def test_loads_cut_short_by_a_death_wait_and_load_again(tiny_model, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-llama").symlink_to(tiny_model)
    (models / "other").symlink_to(tiny_model)
    broken = models / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))

    def named(name):
        return BENCH_TINY.replace('"batchd/tiny-llama"', f'"org/{name}"').replace(
            'recipe = "tiny-llama"', f'path = "{name}"')

    profiles = {"tiny": BENCH_TINY, "other": named("other"), "broken": named("broken")}
    config_path = served_spool(tmp_path, models, profiles,
                               "[engine]\nmax_engine_failures = 2\n"
                               "restart_backoff_seconds = 0.5\n")
    spool = tmp_path / "spool"
    inbox, outbox = spool / "inbox", spool / "outbox"
    lines = [{"custom_id": f"r{i}", "prompt": f"line {i}", "max_tokens": 8} for i in range(40)]
    daemon = DaemonProcess(config_path)
    try:
        daemon.wait_ready()
        # a model vLLM refuses: its job fails at once with vLLM's reason
        drop(inbox, "broken__c.jsonl", lines[:3])
        assert wait_for(lambda: final_state(outbox, "broken__c"), 300,
                        what="the unloadable job") == "failed"
        error = read_status(outbox / "broken__c.status.jsonl")[-1]["errors"][0]
        assert error["code"] == "engine_error"
        assert "model failed to load" in error["message"]
        assert "NoSuchModelForCausalLM" in error["message"]
        assert not events(daemon, "engine_died")

        # killed once while loading: the job waits, loads again, completes
        seen: set[int] = set()
        drop(inbox, "a.jsonl", lines)
        cores = kill_while_loading(daemon, seen)
        assert wait_for(lambda: final_state(outbox, "a"), 300, what="job a") == "completed"
        results, errors = outputs(outbox, "a")
        assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
        assert errors == []
        died = events(daemon, "engine_died")
        assert len(died) == 1 and died[0]["while_loading"] and died[0]["jobs"] == ["a"]
        phases = [s.get("phase") for s in read_status(outbox / "a.status.jsonl")]
        assert phases.index("engine_died") < len(phases) - 1 - phases[::-1].index(
            "loading_model")  # it waited, then loaded again

        # killed max_engine_failures (2) times in a row while loading: it fails
        warm, _ = engine_tree(daemon, seen)
        seen.add(warm.pid)  # tiny's engine, closed for the swap: not the one to kill
        drop(inbox, "other__b.jsonl", lines)
        cores += kill_while_loading(daemon, seen, deep=False)  # early in the load
        cores += kill_while_loading(daemon, seen)
        assert wait_for(lambda: final_state(outbox, "other__b"), 300,
                        what="job b") == "failed"
        last = read_status(outbox / "other__b.status.jsonl")[-1]
        assert "died 2 times loading the model" in last["errors"][0]["message"]
        results, errors = outputs(outbox, "other__b")
        assert results == [] and len(errors) == len(lines)
        assert {e["response"]["body"]["error"]["code"] for e in errors} == {"engine_error"}
        assert [e["while_loading"] for e in events(daemon, "engine_died")] == [True] * 3
        # no engine core outlives its killed engine process
        gone, alive = psutil.wait_procs(cores, timeout=60)
        assert alive == []
    finally:
        code = daemon.stop()
    assert code == 0
