"""batchd.engine.serving's lookup of vLLM's entry points across releases (no vLLM needed)."""

import pytest

from batchd.engine.endpoints import _first


def test_first_takes_the_first_module_that_has_the_name():
    assert _first(("batchd.no_such_module", "json"), "JSONDecoder").__module__ == "json.decoder"


def test_a_module_whose_dependency_is_missing_is_named_with_its_cause(tmp_path, monkeypatch):
    """A release's module that fails on a missing package (vLLM's API server
    without uvicorn, say) must not read as 'this release lacks the name'."""
    (tmp_path / "server_needing_a_package.py").write_text("import not_installed_package\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as caught:
        _first(("batchd.no_such_module", "server_needing_a_package"), "build_client")
    message = str(caught.value)
    assert "server_needing_a_package: No module named 'not_installed_package'" in message
    assert "batchd.no_such_module:" not in message  # merely absent: not a cause


def test_a_missing_dependency_whose_name_begins_the_module_name_is_still_a_cause(
        tmp_path, monkeypatch):
    """'api_server' failing on a missing 'api' package is not 'api_server is absent'."""
    (tmp_path / "api_server.py").write_text("import api\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"api_server: No module named 'api'"):
        _first(("api_server",), "build_client")
    with pytest.raises(ImportError) as caught:  # a missing package above it: absent
        _first(("batchd_no_such_package.api_server",), "build_client")
    assert "(" not in str(caught.value)


class _Serving:
    async def create_chat_completion(self, request, raw):
        return None

    async def create_completion(self, request, raw):
        return None


def _state(**attrs):
    from types import SimpleNamespace
    return SimpleNamespace(**attrs)


def test_a_serving_object_renamed_by_vllm_fails_the_load_by_name():
    """vLLM's app state as a release that renamed the chat serving object would
    build it: the load fails naming the missing attribute and the release, instead
    of every chat line coming back unsupported_url."""
    from batchd.engine.endpoints import serving_calls

    both = _Serving()
    calls = serving_calls(_state(openai_serving_chat=both, openai_serving_completion=both),
                          ("generate",))
    assert set(calls) == {"/v1/chat/completions", "/v1/completions"}
    renamed = _state(openai_serving_chat_v2=both, openai_serving_completion=both)
    with pytest.raises(RuntimeError) as exc:
        serving_calls(renamed, ("generate",))
    message = str(exc.value)
    assert message.startswith("vLLM ") and "openai_serving_chat" in message
    assert "/v1/chat/completions" in message and "'generate'" in message
    # an embedding model needs the embedding serving object, not the chat one
    with pytest.raises(RuntimeError, match="serving_embedding or openai_serving_embedding"):
        serving_calls(renamed, ("embed",))


def test_a_serving_method_renamed_by_vllm_fails_the_load_by_name():
    from batchd.engine.endpoints import serving_calls

    class Renamed:
        async def create_chat_completions(self, request, raw):
            return None

    with pytest.raises(RuntimeError, match="openai_serving_chat has no method "
                                           "'create_chat_completion'"):
        serving_calls(_state(openai_serving_chat=Renamed()), ())
