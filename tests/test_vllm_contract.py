"""What batchd takes from the installed vLLM release, checked without loading a model."""

import dataclasses

import pytest

pytestmark = pytest.mark.vllm


def test_every_engine_key_a_profile_may_set_is_an_engine_argument_of_this_release():
    from batchd.engine.endpoints import _first
    from batchd.profiles import ENGINE_KEYS

    engine_args = _first(("vllm.engine.arg_utils",), "AsyncEngineArgs")
    known = {field.name for field in dataclasses.fields(engine_args)}
    assert sorted(ENGINE_KEYS - known) == []


def test_engine_death_is_recognised_by_vllms_own_type():
    from batchd.engine.endpoints import _first

    dead = _first(("vllm.v1.engine.exceptions", "vllm.engine.exceptions"), "EngineDeadError")
    assert issubclass(dead, Exception) and dead.__name__ == "EngineDeadError"


def test_every_shipped_profile_passes_the_server_option_check():
    """No shipped profile names a parser, template or engine key the installed vLLM
    lacks, and each says what its tool_choice lines get."""
    from batchd.engine.capabilities import ANSWERED, REFUSED, capabilities
    from batchd.profiles import ProfileSet
    from conftest import ROOT

    profiles = ProfileSet.load(ROOT / "profiles")
    assert profiles.errors == []
    found = {name: capabilities(profile) for name, profile in profiles.profiles.items()}
    assert {name: caps.problems for name, caps in found.items() if caps.problems} == {}
    everything = {"auto": ANSWERED, "required": ANSWERED, "named": ANSWERED}
    nothing = {"auto": REFUSED, "required": REFUSED, "named": REFUSED}
    for name in ("gemma3-4b", "gemma3-12b", "llama3.2-1b", "qwen3-8b"):
        assert found[name].tool_choice == everything, name
    for name in ("olmo2-1b", "smollm2-135m"):
        assert found[name].tool_choice == nothing, name
    assert found["minilm-l6"].tool_choice == {}  # an embedding model serves no chat


def test_a_parser_the_installed_vllm_lacks_fails_the_check_with_the_list(tmp_path):
    import subprocess

    from conftest import BATCHD

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "odd.toml").write_text(
        'model = "org/odd"\n[engine]\nmax_model_len = 512\n[chat]\n'
        'tool_call_parser = "no-such-parser"\nenable_auto_tool_choice = true\n'
        'reasoning_parser = "no-such-reasoner"\nchat_template = "missing.jinja"\n'
        '[fit]\nparams_b = 1.0\nlayers = 16\nkv_heads = 8\nhead_size = 64\n')
    config = tmp_path / "config.toml"
    config.write_text('[routing]\nprofiles_dir = "profiles"\ndefault_profile = "odd"\n')
    out = subprocess.run([BATCHD, "profiles", "check", "--config", str(config)],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    problems = [line for line in out.stdout.splitlines() if "PROBLEM:" in line]
    assert len(problems) == 3, out.stdout
    assert "'no-such-parser' is not a tool parser" in problems[0]
    assert "hermes" in problems[0] and "pythonic" in problems[0]  # the ones it has
    assert "'no-such-reasoner' is not a reasoning parser" in problems[1]
    assert "qwen3" in problems[1]
    assert "missing.jinja does not exist" in problems[2]


def test_the_engine_reads_local_images_only_from_the_spools_media_folder(tmp_path):
    """What vLLM is started with: allowed_local_media_path is work/media/ (the
    running jobs' pictures) unless the profile names its own folder, and
    allowed_media_domains the config's hosts, or a name that never resolves."""
    from batchd.engine.serving import server_args
    from batchd.profiles import Profile

    root = str(tmp_path / "spool" / "work" / "media")
    plain = Profile(name="p", model="m", path=str(tmp_path))
    args = server_args(plain, tmp_path, {"root": root, "domains": []})
    assert args.allowed_local_media_path == root
    assert args.allowed_media_domains == ["nothing.invalid"]
    args = server_args(plain, tmp_path, {"root": root, "domains": ["images.example"]})
    assert args.allowed_media_domains == ["images.example"]
    own = Profile(name="p", model="m", path=str(tmp_path),
                  media={"local_folder": "/srv/pictures"})
    assert server_args(own, tmp_path, {"root": root}).allowed_local_media_path == \
        "/srv/pictures"
    anywhere = Profile(name="p", model="m", path=str(tmp_path), media={"allow_remote": True})
    assert server_args(anywhere, tmp_path, {"root": root}).allowed_media_domains is None
