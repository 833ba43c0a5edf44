"""The checkpoint's read-back for publishing: every answered line once, in input
order, as the exact bytes the outbox publishes (no engine needed)."""

import json

from batchd.spool.checkpoint import Checkpoint
from batchd.spool.outbox import dumps_line


def out_line(n: int, text: str) -> dict:
    return {"id": f"batch_req_line_{n}", "custom_id": f"r{n}", "line": n, "error": None,
            "response": {"status_code": 200, "request_id": f"batch_req_line_{n}",
                         "body": {"choices": [{"message": {"content": text}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": n}}}}


def test_ordered_gives_each_line_once_in_input_order_as_published_bytes(tmp_path):
    ckpt = Checkpoint(tmp_path / "job.ckpt.jsonl")
    texts = {4: 'say "}\\n" and {"line": 9}', 0: "é\u2028next", 2: "plain"}
    for n, text in texts.items():  # answers arrive out of order
        ckpt.add(n, "result", out_line(n, text))
    ckpt.add(2, "result", out_line(2, "a second answer to line 2 is ignored"))
    error = {"id": "batch_req_line_1", "custom_id": "r1", "line": 1, "error": None,
             "response": {"status_code": 400, "body": {"error": {"code": "invalid_request"}}}}
    ckpt.add(1, "error", error)
    got = list(ckpt.ordered())
    expected = [(0, "result", out_line(0, texts[0])), (1, "error", error),
                (2, "result", out_line(2, texts[2])), (4, "result", out_line(4, texts[4]))]
    assert got == [(n, kind, dumps_line(out)) for n, kind, out in expected]
    assert ckpt.tally.completed == 3 and ckpt.tally.failed == 1
    ckpt.close()
    # every record is still plain JSON (resume parses it)
    for raw in (tmp_path / "job.ckpt.jsonl").read_bytes().splitlines():
        assert set(json.loads(raw)) == {"line", "kind", "out"}


def test_records_in_another_layout_are_parsed_and_published_alike(tmp_path):
    """A checkpoint whose records are laid out otherwise (keys in another order,
    other spacing) is read by parsing: same lines, same bytes."""
    path = tmp_path / "job.ckpt.jsonl"
    records = [{"out": out_line(1, "b"), "kind": "result", "line": 1},
               {"kind": "result", "line": 0, "out": out_line(0, "a")}]
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    ckpt = Checkpoint(path)  # resumes: both lines answered
    assert ckpt.resumed_lines == 2
    assert list(ckpt.ordered()) == [(0, "result", dumps_line(out_line(0, "a"))),
                                    (1, "result", dumps_line(out_line(1, "b")))]
    ckpt.close()
