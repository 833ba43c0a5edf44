"""The result cache on the fake engine: hits, misses, what is never cached, and
a store that fails. The same on real vLLM: test_vllm_daemon.py."""

import json
import sqlite3

import pytest

from batchd.config import load_settings
from batchd.testing import FakeEngine
from batchd.spool import cache

from conftest import drain, drop, final_state, in_process, outputs, read_jsonl


COMPLETION = {"method": "POST", "url": "/v1/completions"}


def prompt(i: int, **sampling) -> dict:
    return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": f"q {i}"}],
                                           "temperature": 0, **sampling}}


@pytest.fixture
def cached(spool_config):
    """(settings, daemon, engines) with the cache on."""
    settings = load_settings(spool_config("[cache]\nenabled = true\n"))
    engines: list[FakeEngine] = []

    def factory(profile):
        engines.append(FakeEngine(profile))
        return engines[-1]

    d = in_process(settings, factory=factory, clock=lambda: 1000.0)
    return settings, d, engines


def sent(engines) -> int:
    return sum(e.answered for e in engines)


def bench(settings, job: str) -> dict:
    return json.loads((settings.outbox / f"{job}.bench.json").read_text())


def strip_ids(line: dict) -> dict:
    body = dict(line["response"]["body"])
    body.pop("id", None)
    body.pop("created", None)
    return {"custom_id": line["custom_id"], "body": body}


def test_a_rerun_reaches_no_engine_and_a_changed_line_does(cached):
    settings, d, engines = cached
    lines = [prompt(i) for i in range(40)]
    drop(settings.inbox, "first.jsonl", lines)
    drain(d)
    assert sent(engines) == 40
    assert bench(settings, "first")["cache"] == {"hits": 0, "misses": 40}

    drop(settings.inbox, "again.jsonl", lines)
    drain(d)
    assert final_state(settings.outbox, "again") == "completed"
    assert sent(engines) == 40  # nothing new reached the engine
    assert bench(settings, "again")["cache"] == {"hits": 40, "misses": 0}
    first, _ = outputs(settings.outbox, "first")
    again, _ = outputs(settings.outbox, "again")
    assert [strip_ids(l) for l in again] == [strip_ids(l) for l in first]
    # a fresh id, as a new server answer would have
    assert all(a["response"]["body"]["id"] != f["response"]["body"]["id"]
               for a, f in zip(again, first))
    assert all(a["response"]["body"]["id"].startswith("chatcmpl-") or "-" in
               a["response"]["body"]["id"] for a in again)
    status = read_jsonl(settings.outbox / "again.status.jsonl")
    assert status[-1]["cache"] == {"hits": 40, "misses": 0}

    changed = lines[:]
    for i in range(0, 40, 10):
        changed[i] = prompt(i, max_tokens=5)  # another request: a miss
    drop(settings.inbox, "changed.jsonl", changed)
    drain(d)
    assert bench(settings, "changed")["cache"] == {"hits": 36, "misses": 4}
    assert sent(engines) == 44
    results, errors = outputs(settings.outbox, "changed")
    assert len(results) == 40 and not errors
    assert [r["custom_id"] for r in results] == [f"c{i}" for i in range(40)]  # input order


def test_sampled_lines_are_never_cached_and_seeded_ones_are(cached):
    settings, d, engines = cached
    def line(cid: str, **body) -> dict:
        return {"custom_id": cid, **COMPLETION, "body": {"prompt": "p", **body}}

    lines = [line("hot", temperature=0.8), line("default"),  # the model's own default
             line("seeded", temperature=0.8, seed=7),
             line("many", temperature=0.8, seed=7, n=2), line("greedy-many", temperature=0, n=2)]
    for name in ("one", "two"):
        drop(settings.inbox, f"{name}.jsonl", lines)
        drain(d)
    assert bench(settings, "one")["cache"] == {"hits": 0, "misses": 2}
    assert bench(settings, "two")["cache"] == {"hits": 2, "misses": 0}
    assert sent(engines) == 5 + 3


def test_a_sidecar_turns_the_cache_off_for_its_file(cached):
    settings, d, engines = cached
    lines = [prompt(i) for i in range(5)]
    drop(settings.inbox, "warm.jsonl", lines)
    drain(d)
    (settings.inbox / "nocache.toml").write_text("cache = false\n")
    drop(settings.inbox, "nocache.jsonl", lines)
    drain(d)
    assert bench(settings, "nocache")["cache"] is None
    assert sent(engines) == 10
    assert "cache" not in read_jsonl(settings.outbox / "nocache.status.jsonl")[-1]


def test_sidecar_sampling_defaults_are_part_of_the_key(cached):
    settings, d, engines = cached
    lines = [{"custom_id": "a", **COMPLETION, "body": {"prompt": "p"}}]
    (settings.inbox / "t0.toml").write_text("[sampling]\ntemperature = 0\n")
    drop(settings.inbox, "t0.jsonl", lines)
    drain(d)
    (settings.inbox / "t0b.toml").write_text("[sampling]\ntemperature = 0\nmax_tokens = 3\n")
    drop(settings.inbox, "t0b.jsonl", lines)
    drain(d)
    assert bench(settings, "t0")["cache"] == {"hits": 0, "misses": 1}
    assert bench(settings, "t0b")["cache"] == {"hits": 0, "misses": 1}
    assert sent(engines) == 2


def test_a_store_that_fails_is_bypassed_and_every_job_publishes(cached, tmp_path, monkeypatch):
    settings, d, engines = cached
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    settings.layout.cache.symlink_to(outside)  # a planted symlink: never followed
    drop(settings.inbox, "a.jsonl", [prompt(i) for i in range(3)])
    drain(d)
    assert final_state(settings.outbox, "a") == "completed"
    assert list(outside.iterdir()) == []
    assert d.admission.results.broken and "symlink" in d.admission.results.broken


def test_a_corrupt_store_is_bypassed(cached):
    settings, d, engines = cached
    drop(settings.inbox, "a.jsonl", [prompt(i) for i in range(3)])
    drain(d)
    d.admission.results.close()
    (settings.layout.cache / "cache.db").write_bytes(b"this is not sqlite" * 100)
    drop(settings.inbox, "b.jsonl", [prompt(i) for i in range(3)])
    drain(d)
    assert final_state(settings.outbox, "b") == "completed"
    assert len(outputs(settings.outbox, "b")[0]) == 3
    assert d.admission.results.broken


def test_a_full_disk_on_write_is_bypassed(cached, monkeypatch):
    settings, d, engines = cached

    def full(self, key, value):
        raise sqlite3.OperationalError("database or disk is full")

    import diskcache
    monkeypatch.setattr(diskcache.Cache, "add", full)
    drop(settings.inbox, "a.jsonl", [prompt(i) for i in range(3)])
    drain(d)
    assert final_state(settings.outbox, "a") == "completed"
    assert "full" in d.admission.results.broken


def test_the_store_stays_under_its_size_limit(tmp_path):
    store = cache.ResultCache(tmp_path / "c", size_limit=200_000)
    body = {"text": "x" * 2000}
    for i in range(1000):
        store.add(f"k{i}", body)
    volume = store._open().volume()
    assert volume < 400_000  # diskcache culls a few entries per write
    assert store.get("k999") == body and store.get("k0") is None
    store.close()


def test_what_is_cacheable():
    assert cache.cacheable("/v1/embeddings", {"input": "x"})
    assert cache.cacheable("/v1/chat/completions", {"temperature": 0})
    assert cache.cacheable("/v1/chat/completions", {"top_k": 1, "temperature": 1})
    assert cache.cacheable("/v1/completions", {"seed": 1, "temperature": 1})
    assert not cache.cacheable("/v1/completions", {"seed": 1, "temperature": 1, "n": 3})
    assert not cache.cacheable("/v1/completions", {"temperature": 0.7})
    assert not cache.cacheable("/v1/completions", {})


def test_a_file_the_cache_answers_whole_loads_no_model(cached):
    settings, d, engines = cached
    lines = [prompt(i) for i in range(5)]
    drop(settings.inbox, "a.jsonl", lines)
    drain(d)
    drop(settings.inbox, "b.jsonl", [{"model": "org/other-model", "prompt": "x"}])
    drain(d)
    assert [e.profile.name for e in engines] == ["tiny", "other"]
    drop(settings.inbox, "again.jsonl", lines)
    drain(d)
    assert final_state(settings.outbox, "again") == "completed"
    assert [e.profile.name for e in engines] == ["tiny", "other"]  # no swap back for it
    record = bench(settings, "again")
    assert record["cache"] == {"hits": 5, "misses": 0}
    assert record["timing_s"]["generation"] == 0 and record["timing_s"]["model_load"] == 0


def test_a_profile_changed_and_reloaded_is_another_key(cached):
    """An operator edits a profile's engine settings and sends SIGHUP: the old
    answers are not served for the new settings."""
    settings, d, engines = cached
    lines = [prompt(i) for i in range(3)]
    drop(settings.inbox, "before.jsonl", lines)
    drain(d)
    profile = settings.routing.profiles_dir / "tiny.toml"
    profile.write_text(profile.read_text().replace("[engine]\n", "[engine]\nseed = 7\n"))
    d.reload.set()
    d._reload()
    drop(settings.inbox, "after.jsonl", lines)
    drain(d)
    assert bench(settings, "after")["cache"] == {"hits": 0, "misses": 3}
