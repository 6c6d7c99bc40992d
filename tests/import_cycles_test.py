"""Tests of tools/import_cycles.py on tiny packages made in tmp_path, and on this repository."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "tools", "import_cycles.py")
sys.path.insert(0, REPO_ROOT)

from tools import import_cycles  # noqa: E402


def _make_package(root, files: dict[str, str]) -> str:
  """Writes {relative path: source} under `root`; returns `root` as a string."""
  for rel, source in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
  return str(root)


def _run(root: str, *packages: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, SCRIPT, "--root", root, *packages],
                        capture_output=True, text=True, timeout=60, check=False)


def test_direct_module_level_cycle(tmp_path):
  root = _make_package(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/a.py": "import pkg.b\n",
      "pkg/b.py": "from pkg.a import something\n",
  })
  assert import_cycles.find_cycles(root, ["pkg"]) == [["pkg.a", "pkg.b", "pkg.a"]]
  result = _run(root, "pkg")
  assert result.returncode == 1, result.stdout + result.stderr
  assert "pkg.a -> pkg.b -> pkg.a" in result.stdout.splitlines()
  assert "pkg/b.py:1: pkg.b imports pkg.a" in result.stdout


def test_cycle_through_function_level_import(tmp_path):
  root = _make_package(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/train.py": "import os\n\nfrom pkg import util\n",
      "pkg/evaluate.py": """\
          def run():
            if True:
              from pkg import train  # closes the cycle only when run() is called
            return train
          """,
      "pkg/util.py": """\
          class Helper:
            def method(self):
              import pkg.evaluate
              return pkg.evaluate
          """,
  })
  assert import_cycles.find_cycles(root, ["pkg"]) == [
      ["pkg.evaluate", "pkg.train", "pkg.util", "pkg.evaluate"]]
  result = _run(root, "pkg")
  assert result.returncode == 1
  assert "pkg.evaluate -> pkg.train -> pkg.util -> pkg.evaluate" in result.stdout.splitlines()
  assert "pkg/evaluate.py:3: pkg.evaluate imports pkg.train (function-level)" in result.stdout
  assert "pkg/train.py:3: pkg.train imports pkg.util\n" in result.stdout


def test_cycle_through_from_package_import_submodule(tmp_path):
  # `from pkg.sub import mod` is an edge to the submodule pkg.sub.mod, not to pkg.sub.
  root = _make_package(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/sub/__init__.py": "",
      "pkg/sub/mod.py": "from pkg import top\n",
      "pkg/top.py": "from pkg.sub import mod\n",
  })
  assert import_cycles.find_cycles(root, ["pkg"]) == [["pkg.sub.mod", "pkg.top", "pkg.sub.mod"]]
  assert _run(root, "pkg").returncode == 1


def test_relative_imports(tmp_path):
  root = _make_package(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/models/__init__.py": "from . import clip\n",         # pkg.models -> pkg.models.clip
      "pkg/models/clip.py": "from ..io import reader\n",         # -> pkg.io.reader
      "pkg/io/__init__.py": "",
      "pkg/io/reader.py": "from ..models.clip import CLIP\n",   # -> pkg.models.clip
  })
  assert import_cycles.find_cycles(root, ["pkg"]) == [
      ["pkg.io.reader", "pkg.models.clip", "pkg.io.reader"]]


def test_cycle_across_top_level_packages_and_import_module(tmp_path):
  root = _make_package(tmp_path, {
      "lib/__init__.py": "",
      "lib/core.py": "import importlib\nimportlib.import_module('app.cli')\n",
      "app/__init__.py": "",
      "app/cli.py": "from lib.core import main\n",
  })
  assert import_cycles.find_cycles(root, ["lib", "app"]) == [["app.cli", "lib.core", "app.cli"]]
  # Scanning one package alone sees no cycle: the other is not ours there.
  assert import_cycles.find_cycles(root, ["lib"]) == []


def test_every_cycle_of_a_component_is_listed(tmp_path):
  # a <-> b and b <-> c: two elementary cycles in one strongly connected component.
  root = _make_package(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/a.py": "from pkg import b\n",
      "pkg/b.py": "from pkg import a, c\n",
      "pkg/c.py": "from pkg import b\n",
  })
  assert import_cycles.find_cycles(root, ["pkg"]) == [
      ["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.c", "pkg.b"]]
  result = _run(root, "pkg")
  assert "2 import cycle(s)" in result.stdout


def test_acyclic_package(tmp_path):
  root = _make_package(tmp_path, {
      "pkg/__init__.py": "from pkg.a import f\n",   # a package re-exporting its submodule
      "pkg/a.py": "import pkg.b\nimport os, json\n",
      "pkg/b.py": """\
          from typing import TYPE_CHECKING
          import numpy  # not ours
          if TYPE_CHECKING:
            from pkg import a  # never runs: not an edge
          """,
      "pkg/c.py": "from pkg import a, b\nfrom . import b\n",
  })
  assert import_cycles.find_cycles(root, ["pkg"]) == []
  result = _run(root, "pkg")
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.strip() == "no import cycles"


def test_unparsable_file_is_named(tmp_path):
  root = _make_package(tmp_path, {"pkg/__init__.py": "", "pkg/bad.py": "def f(:\n"})
  result = _run(root, "pkg")
  assert result.returncode == 2
  assert "pkg/bad.py:1" in result.stderr
  with pytest.raises(FileNotFoundError, match="nosuchpkg"):
    import_cycles.find_cycles(root, ["nosuchpkg"])


def test_repository_has_no_import_cycles():
  result = _run(REPO_ROOT)
  assert result.returncode == 0, "cycles among tvr_jax/, data_prep/, configs/:\n" + result.stdout
  assert result.stdout.strip() == "no import cycles"
