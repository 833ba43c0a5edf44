"""Routing order: sidecar, PROFILE__ prefix, lines' model, default."""

import pytest

from batchd.profiles import ProfileSet
from batchd.jobs.router import JobRejected, ModelVote, Sidecar, read_sidecar, route, routes


@pytest.fixture
def profiles(settings):
    return ProfileSet.load(settings.routing.profiles_dir)


def votes(*models):
    v = ModelVote()
    for i, m in enumerate(models, 1):
        v.add(m, i)
    return v


def test_order(profiles):
    assert route("x", Sidecar(profile="other"), votes("tiny"), profiles, "tiny")[1] == "sidecar"
    p, why = route("other__x", Sidecar(), votes("tiny"), profiles, "tiny")
    assert (p.name, why) == ("other", "filename prefix")
    p, why = route("nobody__x", Sidecar(), votes("org/other-model"), profiles, "tiny")
    assert (p.name, why) == ("other", "lines' model")
    p, why = route("x", Sidecar(), votes(), profiles, "tiny")
    assert (p.name, why) == ("tiny", "default")
    assert route("x", Sidecar(), votes("TINY"), profiles, "other")[0].name == "tiny"


def test_rejections(profiles):
    with pytest.raises(JobRejected) as exc:
        route("x", Sidecar(profile="gpt-9"), votes(), profiles, "tiny")
    assert exc.value.code == "unknown_profile" and "other, tiny" in exc.value.message
    many = ModelVote(limit=2)
    for i, model in enumerate(("a", "b", "c"), 1):
        many.add(model, i)
    with pytest.raises(JobRejected) as exc:
        route("x", Sidecar(), many, profiles, "tiny")
    assert exc.value.code == "too_many_models" and exc.value.line == 3


def test_lines_naming_several_models_route_per_line(profiles):
    v = votes("other", "gpt-9", "tiny", "batchd/tiny-llama")
    p, why = route("x", Sidecar(), v, profiles, "tiny")
    assert (p.name, why) == ("other", "lines' models, per line")
    r = routes(why, v, profiles)
    assert [p.name for p in r.stages] == ["other", "tiny"]  # first named first
    assert (r.of("tiny"), r.of("batchd/tiny-llama"), r.of("gpt-9"), r.of(None)) == \
        ("tiny", "tiny", None, "other")  # no model: the first named profile's
    # no line names a known model: the default runs them all, as before
    p, why = route("x", Sidecar(), votes("gpt-9", "gpt-10"), profiles, "tiny")
    assert (p.name, why, routes(why, votes(), profiles)) == ("tiny", "default", None)
    assert routes("sidecar", v, profiles) is None


def test_sidecar_refuses_engine_and_model(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('profile = "tiny"\n[engine]\ntrust_remote_code = true\n')
    with pytest.raises(JobRejected) as exc:
        read_sidecar(path)
    assert exc.value.code == "invalid_sidecar" and "engine" in exc.value.message
    path.write_text('profile = "tiny"\npriority = 5\n[sampling]\ntemperature = 0.1\n')
    side = read_sidecar(path)
    assert side.priority == 5 and side.sampling == {"temperature": 0.1}
    path.write_text("profile = ")
    with pytest.raises(JobRejected):
        read_sidecar(path)


def test_invalid_profile_is_reported_and_others_work(settings):
    (settings.routing.profiles_dir / "broken.toml").write_text(
        'model = "m"\n[engine]\nmax_modle_len = 5\n')
    found = ProfileSet.load(settings.routing.profiles_dir)
    assert "tiny" in found.profiles and "broken" not in found.profiles
    assert any("broken.toml" in e and "max_modle_len" in e for e in found.errors)


def test_sidecar_symlink_is_refused(tmp_path):
    target = tmp_path / "elsewhere.toml"
    target.write_text('profile = "tiny"\n')
    link = tmp_path / "x.toml"
    link.symlink_to(target)
    with pytest.raises(JobRejected) as exc:
        read_sidecar(link)
    assert exc.value.code == "invalid_sidecar" and "symbolic link" in exc.value.message


def test_sidecar_deadline_from_window_or_absolute_time():
    from datetime import datetime, timedelta, timezone

    from batchd.jobs.router import Sidecar
    claimed = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
    assert Sidecar().deadline(claimed) is None
    assert Sidecar(completion_window="90m").deadline(claimed) == claimed + timedelta(minutes=90)
    assert Sidecar(completion_window="2d").deadline(claimed) == claimed + timedelta(days=2)
    naive = Sidecar(expires_at=datetime(2026, 11, 28, 9, 0), completion_window="1s")
    assert naive.deadline(claimed) == datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc)
    for bad in ("24", "1w", "-1h", "1.5h", "h"):
        with pytest.raises(ValueError):
            Sidecar(completion_window=bad)
