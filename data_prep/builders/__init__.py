"""One package per dataset builder; `builder_class(name)` finds a builder by its dataset name.

The dataset name is the package name: `data_prep/builders/<name>/` (the real datasets), or a
`data_prep/<name>/` package that has a `builder` module (the synthetic set). A new builder package
is picked up without editing this file.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil


def _modules() -> dict[str, str]:
  """Dataset name -> module holding its builder."""
  modules = {m.name: f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.ispkg}
  parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for m in pkgutil.iter_modules([parent]):
    if m.ispkg and m.name not in modules and os.path.isfile(
        os.path.join(parent, m.name, "builder.py")):
      modules[m.name] = f"data_prep.{m.name}.builder"
  return modules


def available() -> list[str]:
  """Names of the datasets that have a builder."""
  return sorted(_modules())


def builder_class(name: str) -> type:
  """The `VideoTextBuilder` subclass of dataset `name` (imports `data_prep.builders.<name>`)."""
  from data_prep import base  # pylint: disable=import-outside-toplevel
  modules = _modules()
  if name not in modules:
    raise ValueError(f"unknown dataset {name!r}; available: {sorted(modules)}")
  module = importlib.import_module(modules[name])
  candidates = [obj for obj in vars(module).values()
                if inspect.isclass(obj) and issubclass(obj, base.VideoTextBuilder)
                and obj is not base.VideoTextBuilder]
  named = [c for c in candidates if c.name == name]
  if len(named) == 1:
    return named[0]
  if len(candidates) == 1:
    return candidates[0]
  raise ValueError(f"{modules[name]} must expose exactly one VideoTextBuilder "
                   f"subclass; found {[c.__name__ for c in candidates]}")
