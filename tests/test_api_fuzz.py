"""`batchd api` fuzzed from its own OpenAPI schema by schemathesis: every
operation, with and without API keys: no 5xx, no response that breaks its
schema, nothing written outside the spool. In process (the ASGI app the
server runs), on a spool with finished jobs of both formats to find."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from batchd.api.app import Keys, create_app
from batchd.config import load_settings
from batchd.testing import FakeEngine

from conftest import drain, drop, in_process

pytestmark = pytest.mark.slow

KEY = "fuzz-key"


def files_outside(base: Path) -> set[str]:
    return {str(p.relative_to(base)) for p in base.rglob("*")
            if not p.relative_to(base).parts[0] == "spool"}


@pytest.mark.parametrize("mode", ["without keys", "with keys"])
def test_no_5xx_and_responses_keep_their_schema(mode, spool_config, tmp_path):
    settings = load_settings(spool_config())
    daemon = in_process(settings, factory=FakeEngine, clock=lambda: 1000.0)
    drop(settings.inbox, "openai.jsonl", [{"custom_id": "a", "prompt": "x"}, "broken"])
    drop(settings.inbox, "anthropic.jsonl", [{"custom_id": "b", "params": {
        "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}}])
    drain(daemon)
    keys = None
    if mode == "with keys":
        (tmp_path / "keys").write_text(KEY + "\n")
        keys = Keys(tmp_path / "keys")
    headers = {"Authorization": f"Bearer {KEY}"} if keys else {}
    before = files_outside(tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings, keys))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # every route is in the schema
    cases = 0
    for operation in operations:
        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=15, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def fuzz(case):
            nonlocal cases
            cases += 1
            case.call_and_validate(headers=headers,
                                   checks=[not_a_server_error, response_schema_conformance])

        fuzz()
    assert files_outside(tmp_path) == before
    assert not any(p.is_symlink() for p in (tmp_path / "spool").rglob("*"))
    report = os.environ.get("BATCHD_FUZZ_REPORT")
    if report:  # the summary docs/SECURITY.md quotes
        with open(report, "a") as out:
            out.write(f"{mode}: {len(operations)} operations, {cases} cases, 0 failures\n")
