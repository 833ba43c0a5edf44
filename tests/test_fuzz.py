"""Property tests over what a stranger controls: file names, sidecars, first
lines and routing inputs. Any input gives a defined result or a defined
rejection; nothing else escapes. (The line parser's are in test_lines.py.)"""

import os
import re
import tempfile
from pathlib import Path

from hypothesis import given, settings, strategies as st

from batchd.spool import inbox as spool
from batchd.profiles import ProfileSet
from batchd.jobs.router import (JobRejected, ModelVote, Sidecar, hint, read_sidecar, route,
                                routes)

from conftest import OTHER_PROFILE, TINY_PROFILE

JOB_NAME = re.compile(r"^[A-Za-z0-9_+=@,][A-Za-z0-9._+=@,-]*$")
# What a file name can be on Linux: any bytes but "/" and NUL, as Python sees them.
NAMES = st.binary(min_size=1, max_size=255).map(
    lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\0", b"_"))) | st.text(max_size=300)
CODES = {"unknown_profile", "too_many_models", "invalid_sidecar"}


def profile_set() -> ProfileSet:
    folder = Path(tempfile.mkdtemp())
    (folder / "tiny.toml").write_text(TINY_PROFILE)
    (folder / "other.toml").write_text(OTHER_PROFILE)
    return ProfileSet.load(folder)


PROFILES = profile_set()


@given(NAMES)
def test_any_name_gives_a_safe_job_name(name):
    stem = spool.safe_stem(name)
    assert JOB_NAME.match(stem) and 1 <= len(stem) <= 180
    assert os.fsencode(stem) == stem.encode("ascii")  # plain ASCII, no escapes


@given(st.text(alphabet="~.-0123456789abc", max_size=120), NAMES)
def test_any_claim_name_fits_a_file_name(prefix, name):
    assert len(os.fsencode(spool.fit_name(prefix, name))) <= spool.NAME_MAX


@given(st.binary(max_size=2000) | st.text(max_size=500).map(str.encode))
@settings(max_examples=300)
def test_any_sidecar_is_read_or_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.toml"
        path.write_bytes(data)
        try:
            sidecar = read_sidecar(path)
        except JobRejected as exc:
            assert exc.code == "invalid_sidecar" and "job.toml" in exc.message
        else:
            assert isinstance(sidecar, Sidecar)


@given(NAMES, st.none() | st.text(min_size=1, max_size=200),
       st.lists(st.sampled_from(["tiny", "other", "org/other-model", "batchd/tiny-llama",
                                 "../../etc/x", "unknown"]) | st.text(max_size=30),
                max_size=5),
       st.sampled_from(["tiny", "nope", ""]))
def test_any_routing_input_gives_a_known_profile_or_a_rejection(job, named, models, default):
    votes = ModelVote()
    for line, model in enumerate(models, 1):
        votes.add(model, line)
    try:
        profile, reason = route(job, Sidecar(profile=named), votes, PROFILES, default)
    except JobRejected as exc:
        assert exc.code in CODES
    else:
        assert profile is PROFILES.profiles[profile.name]
        assert reason in ("sidecar", "filename prefix", "lines' model",
                          "lines' models, per line", "default")
        found = routes(reason, votes, PROFILES)
        if found is not None:  # per line: every model goes to a part or is unknown
            assert found.stages[0] is profile
            names = {p.name for p in found.stages}
            assert all(found.of(m) in names | {None} for m in models)
            assert found.of(None) == profile.name


@given(st.binary(max_size=70_000) | st.sampled_from([b"[" * 70_000, b'{"model": ' * 5000]),
       st.none() | st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_any_first_line_and_sidecar_give_a_hint_or_none(first, sidecar):
    with tempfile.TemporaryDirectory() as tmp:
        path, side = Path(tmp) / "job.jsonl", Path(tmp) / "job.toml"
        path.write_bytes(first)
        if sidecar is not None:
            side.write_bytes(sidecar)
        assert hint(path, side, PROFILES, "tiny") in (None, "tiny", "other")
