"""What batchd takes from the installed vLLM release, checked without loading a model."""

import dataclasses

import pytest

pytestmark = pytest.mark.vllm


def test_every_engine_key_a_profile_may_set_is_an_engine_argument_of_this_release():
    from batchd.engine.serving import _first
    from batchd.profiles import ENGINE_KEYS

    engine_args = _first(("vllm.engine.arg_utils",), "AsyncEngineArgs")
    known = {field.name for field in dataclasses.fields(engine_args)}
    assert sorted(ENGINE_KEYS - known) == []


def test_engine_death_is_recognised_by_vllms_own_type():
    from batchd.engine.serving import _first

    dead = _first(("vllm.v1.engine.exceptions", "vllm.engine.exceptions"), "EngineDeadError")
    assert issubclass(dead, Exception) and dead.__name__ == "EngineDeadError"
