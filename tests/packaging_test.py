"""pyproject.toml's dependencies against the code's imports and the pinned requirements.txt."""

import ast
import importlib.metadata
import os
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tvr_jax", "data_prep", "configs")
# Test-only references and tools: never in what a GPU / TPU user installs.
TEST_ONLY = {"torch", "torchvision", "open-clip-torch", "transformers", "playwright", "pytest"}


def _pyproject() -> dict:
  with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _names(requirements: list[str]) -> set[str]:
  return {canonicalize_name(Requirement(r).name) for r in requirements}


def _lock() -> dict[str, str]:
  """requirements.txt as {canonical name: version}."""
  pins = {}
  with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"requirements.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(req.name)] = spec.version
  return pins


def _third_party_imports() -> dict[str, set[str]]:
  """{top-level import name: files} of every import in tvr_jax/, data_prep/, configs/."""
  found = {}
  for package in PACKAGES:
    for dirpath, _, filenames in os.walk(os.path.join(REPO_ROOT, package)):
      for name in filenames:
        if not name.endswith(".py"):
          continue
        path = os.path.join(dirpath, name)
        with open(path) as f:
          tree = ast.parse(f.read(), filename=path)
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            tops = [a.name.split(".")[0] for a in node.names]
          elif isinstance(node, ast.ImportFrom) and node.level == 0:
            tops = [node.module.split(".")[0]]
          else:
            continue
          for top in tops:
            if top not in sys.stdlib_module_names and top not in PACKAGES + ("__future__",):
              found.setdefault(top, set()).add(os.path.relpath(path, REPO_ROOT))
  return found


def test_every_import_is_a_declared_dependency():
  project = _pyproject()
  declared = _names(project["dependencies"]) | _names(project["optional-dependencies"]["convert"])
  # The distributions that provide each import name in this (test) environment.
  providers = importlib.metadata.packages_distributions()
  missing = {}
  for top, files in sorted(_third_party_imports().items()):
    dists = {canonicalize_name(d) for d in providers.get(top, [])}
    assert dists, f"import {top} (in {sorted(files)}) is not installed here"
    if not dists & declared:
      missing[top] = (sorted(dists), sorted(files))
  assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_only_converting_safetensors_needs_the_convert_extra():
  project = _pyproject()
  runtime = _names(project["dependencies"])
  providers = importlib.metadata.packages_distributions()
  for top, files in _third_party_imports().items():
    dists = {canonicalize_name(d) for d in providers.get(top, [])}
    if not dists & runtime:
      assert files == {"tvr_jax/torch_io.py"}, (top, files)


def test_accelerator_and_runtime_sets_hold_no_test_only_package():
  project = _pyproject()
  extras = project["optional-dependencies"]
  for name, requirements in [("dependencies", project["dependencies"]),
                             ("gpu", extras["gpu"]), ("tpu", extras["tpu"]),
                             ("convert", extras["convert"])]:
    assert not _names(requirements) & TEST_ONLY, name
  assert _names(extras["gpu"]) == {"jax"} and "cuda12" in Requirement(extras["gpu"][0]).extras
  assert _names(extras["tpu"]) == {"jax"} and "tpu" in Requirement(extras["tpu"][0]).extras
  # Lower bounds (and at most an upper cap where private API is used), not exact pins: those are
  # requirements.txt's job.
  for r in project["dependencies"]:
    ops = {s.operator for s in Requirement(r).specifier}
    assert ">=" in ops and ops <= {">=", "<"}, r


@pytest.mark.parametrize("group", ["dependencies", "convert", "test"])
def test_lock_satisfies_pyproject(group):
  project = _pyproject()
  requirements = (project["dependencies"] if group == "dependencies"
                  else project["optional-dependencies"][group])
  lock = _lock()
  for r in requirements:
    req = Requirement(r)
    name = canonicalize_name(req.name)
    if name == "tvr-jax":   # test = tvr_jax[convert] + ...
      continue
    if req.marker is not None and not req.marker.evaluate():
      continue
    assert name in lock, f"requirements.txt lacks {req.name} (pyproject.toml {group})"
    assert req.specifier.contains(lock[name], prereleases=True), (
        f"requirements.txt pins {req.name}=={lock[name]}, outside pyproject.toml's {r!r}")


def test_requirements_in_names_every_direct_dependency():
  project = _pyproject()
  direct = set()
  with open(os.path.join(REPO_ROOT, "requirements.in")) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        direct.add(canonicalize_name(Requirement(line).name))
  extras = project["optional-dependencies"]
  wanted = (_names(project["dependencies"]) | _names(extras["convert"])
            | _names(extras["test"])) - {"tvr-jax"}
  assert wanted <= direct, f"requirements.in lacks {sorted(wanted - direct)}"
