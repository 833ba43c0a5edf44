"""batchd.engine.serving's lookup of vLLM's entry points across releases (no vLLM needed)."""

import pytest

from batchd.engine.serving import _first


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
