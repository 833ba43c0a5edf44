"""Prefix order (batchd/jobs/order.py): requests sharing a prefix reach the engine
back to back, results still come out in input order, and resume holds.

On the fake engine, recording the order it is fed; the real-vLLM kill -9 test
(test_vllm_crash.py) runs with prefix order on and checks the same promises.
"""

import json
import math
import random

import pytest

from batchd.spool.checkpoint import Checkpoint
from batchd.testing import FakeEngine
from batchd.lines import Request
from batchd.jobs.order import PrefixOrder, prefix_text, sort_key

from conftest import drain, drop, in_process, read_jsonl

GROUPS = 5
PER_GROUP = 12
PREAMBLES = [f"You grade answers for course {g}. " + "Rubric point. " * 120
             for g in range(GROUPS)]


def shuffled_file(seed=1):
    """Five long system prompts, twelve questions each, shuffled as files arrive."""
    lines = [{"custom_id": f"g{g}-q{q}", "max_tokens": 4 + (q * 7) % 30, "messages": [
        {"role": "system", "content": PREAMBLES[g]},
        {"role": "user", "content": f"Question {q} of group {g}?"}]}
        for g in range(GROUPS) for q in range(PER_GROUP)]
    random.Random(seed).shuffle(lines)
    return lines


def group_of(custom_id):
    return custom_id.split("-")[0]


def check_grouped(groups):
    """Leader-ahead prefix order: without each group's first request (its leader,
    sent one group early), every group is one run; each leader comes before
    the rest of its group."""
    seen, followers = set(), []
    for g in groups:
        if g not in seen:
            seen.add(g)  # the leader
        else:
            followers.append(g)
    runs = [g for i, g in enumerate(followers) if i == 0 or g != followers[i - 1]]
    assert sorted(runs) == sorted(set(followers))
    leaders = sorted(set(groups), key=groups.index)
    assert leaders == sorted(set(followers), key=followers.index)  # same group order


@pytest.fixture
def fed():
    """Every request the fake engine took, in the order it took them."""
    return []


@pytest.fixture
def recording(settings, fed):
    d = in_process(settings, factory=lambda p: FakeEngine(p, fed=fed), clock=lambda: 1000.0)
    return d


def test_keys_group_shared_prefixes_longest_output_first():
    lines = shuffled_file()
    order = PrefixOrder()
    for i, line in enumerate(lines):
        order.add(Request(i + 1, line["custom_id"], "/v1/chat/completions", line), i * 100)
    keyed = [line - 1 for line, offset in order.sequence()]
    assert [offset for _, offset in order.sequence()] == [i * 100 for i in keyed]
    groups = [group_of(lines[i]["custom_id"]) for i in keyed]
    check_grouped(groups)
    for g in set(groups):  # inside a group: the longest max_tokens first (log-scaled)
        scaled = [int(4 * math.log2(lines[i]["max_tokens"] + 1)) for i in keyed
                  if group_of(lines[i]["custom_id"]) == g]
        assert scaled == sorted(scaled, reverse=True) and scaled[0] > scaled[-1]


def test_prefix_text_is_what_a_template_renders_first():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {"tools": tools, "messages": [{"role": "user", "content": "hi"}]}
    assert prefix_text(body).index('"name": "f"') < prefix_text(body).index("hi")
    assert "abc" in prefix_text({"prompt": "abc"})
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}
    assert '"text": "q"' in prefix_text(parts)
    # sampling fields are not part of the prefix, only of the tie-break
    a, b = {"prompt": "same", "max_tokens": 5}, {"prompt": "same", "max_tokens": 500}
    assert sort_key(a) >> 6 == sort_key(b) >> 6 and sort_key(b) < sort_key(a)


def test_engine_is_fed_by_prefix_and_results_come_in_input_order(recording, settings, fed):
    lines = shuffled_file()
    lines.insert(3, "not json")
    lines.insert(9, "")
    drop(settings.inbox, "grade.jsonl", lines)
    drain(recording)
    fed = [r.custom_id for r in fed]
    assert len(fed) == len(set(fed)) == GROUPS * PER_GROUP  # each request once
    check_grouped([group_of(c) for c in fed])
    results = read_jsonl(settings.outbox / "grade.results.jsonl")
    errors = read_jsonl(settings.outbox / "grade.errors.jsonl")
    expected = [line["custom_id"] for line in lines if isinstance(line, dict)]
    assert [r["custom_id"] for r in results] == expected
    assert [e["custom_id"] for e in errors] == ["line-4"]
    bench = json.loads((settings.outbox / "grade.bench.json").read_text())
    assert bench["order"] == "prefix" and "hit_rate" in bench["prefix_cache"]
    status = read_jsonl(settings.outbox / "grade.status.jsonl")
    assert status[-1]["order"] == "prefix" and "cached" in status[-1]["tokens"]


def test_sidecar_chooses_input_order(recording, settings, fed):
    lines = shuffled_file()
    (settings.inbox / "plain.toml").write_text('order = "input"\n')
    drop(settings.inbox, "plain.jsonl", lines)
    drain(recording)
    assert [r.custom_id for r in fed] == [line["custom_id"] for line in lines]
    bench = json.loads((settings.outbox / "plain.bench.json").read_text())
    assert bench["order"] == "input"


def test_config_input_order(spool_config, fed):
    from batchd.config import load_settings
    settings = load_settings(spool_config('[engine]\norder = "input"\n'))
    d = in_process(settings, factory=lambda p: FakeEngine(p, fed=fed), clock=lambda: 1000.0)
    lines = shuffled_file(seed=2)
    drop(settings.inbox, "cfg.jsonl", lines)
    drain(d)
    assert [r.custom_id for r in fed] == [line["custom_id"] for line in lines]


def test_resume_in_prefix_order_skips_answered_lines(recording, settings, fed):
    lines = shuffled_file(seed=3)
    drop(settings.work, "r.jsonl", lines)
    (settings.outbox / "r.status.jsonl").write_text(
        json.dumps({"ts": "x", "job": "r", "state": "in_progress"}) + "\n")
    ckpt = Checkpoint(settings.work / "r.ckpt.jsonl")
    for n in (2, 30, 55):
        ckpt.add(n, "result", {"custom_id": lines[n - 1]["custom_id"], "marker": "kept",
                               "response": {"body": {"usage": {"prompt_tokens": 1}}}})
    ckpt.close()
    drain(recording)
    fed = {r.line for r in fed}
    assert fed.isdisjoint({2, 30, 55}) and len(fed) == len(lines) - 3
    results = read_jsonl(settings.outbox / "r.results.jsonl")
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
    assert sum(1 for r in results if r.get("marker") == "kept") == 3


def test_order_memory_is_a_few_bytes_a_line():
    order = PrefixOrder()
    for i in range(20_000):
        order.add(Request(i + 1, f"r{i}", "/v1/completions", {"prompt": f"p{i}"}), i * 40)
    held = sum(a.itemsize * len(a) for a in (order.entries, order.offsets, order.lines))
    assert held == 20 * 20_000
    assert [line for line, _ in order.sequence()].count(7) == 1
