"""The versions a bench record names, also when batchd runs from a source tree."""

from importlib import metadata

from batchd import bench


def test_source_tree_version_is_the_installed_one():
    """On a host batchd is carried to on PYTHONPATH (not installed), the record
    still names batchd's version, read from the tree's pyproject.toml."""
    assert bench._source_version() == metadata.version("batchd")
    assert bench.versions()["batchd"] == metadata.version("batchd")
