"""The versions a bench record names, also when batchd runs from a source tree."""

import json
import os
import subprocess
import sys
from importlib import metadata

from conftest import ROOT


def test_source_tree_version_is_the_installed_one(tmp_path):
    """On a host batchd is carried to on PYTHONPATH (not installed), the record
    still names batchd's version, read from the tree's pyproject.toml: an
    interpreter that does not have batchd installed (-S: no site-packages)
    imports it from the tree and reads the version there. The tree is reached
    through a folder of its own (the checkout's egg-info would count as installed)."""
    (tmp_path / "batchd").symlink_to(ROOT / "batchd")
    script = ("import json; from importlib import metadata\n"
              "from batchd import bench\n"
              "try:\n    metadata.version('batchd'); installed = True\n"
              "except metadata.PackageNotFoundError:\n    installed = False\n"
              "print(json.dumps({'installed': installed, 'batchd': bench.versions()['batchd']}))")
    out = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=True, cwd="/")
    seen = json.loads(out.stdout)
    assert seen == {"installed": False, "batchd": metadata.version("batchd")}
