"""Input lines: every shape, every error code, bounded reading."""

import io
import json

from hypothesis import given, settings, strategies as st

from batchd.jsonl import RawLine, read_lines
from batchd.lines import (CHAT, COMPLETIONS, EMBEDDINGS, Dedup, LineError, Request,
                          parse_line)


def parse(obj, number=1):
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_line(RawLine(number, data, len(data)))


def test_three_shapes():
    batch = parse({"custom_id": "a", "method": "POST", "url": CHAT,
                   "body": {"messages": [{"role": "user", "content": "hi"}]}})
    assert isinstance(batch, Request) and batch.url == CHAT and batch.custom_id == "a"
    chat = parse({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}, 7)
    assert chat.url == CHAT and chat.custom_id == "line-7" and chat.body["temperature"] == 0.5
    prompt = parse({"custom_id": "p", "prompt": "Once"})
    assert prompt.url == COMPLETIONS and prompt.body == {"prompt": "Once"}
    emb = parse({"custom_id": "e", "method": "POST", "url": EMBEDDINGS, "body": {"input": "x"}})
    assert emb.url == EMBEDDINGS


def test_error_codes_name_the_field():
    assert parse(b"{not json").code == "invalid_json_line"
    assert parse(b"[1, 2]").code == "invalid_json_line"
    assert parse(b'{"prompt": NaN}').code == "invalid_json_line"
    assert parse(b"\xff\xfe{}").code == "invalid_json_line"
    # a byte order mark inside the file (only the first line's is dropped)
    assert parse(b'\xef\xbb\xbf{"prompt": "x"}').code == "invalid_json_line"
    bad_url = parse({"url": "/v1/images", "body": {}})
    assert bad_url.code == "unsupported_url" and bad_url.param == "url"
    role = parse({"url": CHAT, "body": {"messages": [{"role": "wizard", "content": "x"}]}})
    assert role.code == "invalid_request" and role.param == "body.messages.0.role"
    assert parse({"messages": []}).param == "messages"
    assert parse({"prompt": "x", "max_tokens": 0}).param == "max_tokens"
    assert parse({"prompt": "x", "temperature": "hot"}).param == "temperature"
    assert parse({"custom_id": 5, "prompt": "x"}).param == "custom_id"
    assert parse({"hello": "world"}).code == "invalid_request"
    assert parse({"url": CHAT, "body": {"messages": [{"role": "user", "content": "x"}]},
                  "extra": 1}).param == "extra"


def test_duplicate_custom_id_first_wins():
    dedup = Dedup()
    first = dedup.check(parse({"custom_id": "x", "prompt": "a"}, 1))
    second = dedup.check(parse({"custom_id": "x", "prompt": "b"}, 2))
    assert isinstance(first, Request)
    assert isinstance(second, LineError) and second.code == "duplicate_custom_id"
    assert second.line == 2


def test_read_lines_skips_blanks_bom_crlf_and_bounds_long_lines():
    data = b"\xef\xbb\xbf{\"prompt\": \"a\"}\r\n\n   \n" + b"x" * 5000 + b"\n{\"prompt\": \"b\"}"
    raws = list(read_lines(io.BytesIO(data), max_line_bytes=1000))
    assert [r.number for r in raws] == [1, 4, 5]
    assert raws[1].data is None and raws[1].length == 5001
    assert isinstance(parse_line(raws[0]), Request)
    long = parse_line(raws[1], 1000)
    assert long.code == "invalid_request" and "over the limit" in long.message
    assert isinstance(parse_line(raws[2]), Request)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_one_defined_outcome(data):
    outcome = parse_line(RawLine(3, data, len(data)))
    assert isinstance(outcome, (Request, LineError))
    assert outcome.line == 3


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.sampled_from(
                        ["messages", "prompt", "role", "content", "body", "url", "custom_id",
                         "max_tokens", "n", "model", "input"]), children, max_size=5),
                    max_leaves=20))
def test_any_json_gives_one_defined_outcome(obj):
    outcome = parse(obj)
    assert isinstance(outcome, (Request, LineError))
