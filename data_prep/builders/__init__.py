"""One package per dataset builder; `builder_class(name)` finds a builder by its dataset name.

The dataset name is the package name (`data_prep/builders/<name>/`), so a new builder package is
picked up without editing this file.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil


def available() -> list[str]:
  """Names of the builder packages under `data_prep/builders/`."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def builder_class(name: str) -> type:
  """The `VideoTextBuilder` subclass of dataset `name` (imports `data_prep.builders.<name>`)."""
  from data_prep import base  # pylint: disable=import-outside-toplevel
  names = available()
  if name not in names:
    raise ValueError(f"unknown dataset {name!r}; available: {names}")
  module = importlib.import_module(f"{__name__}.{name}")
  candidates = [obj for obj in vars(module).values()
                if inspect.isclass(obj) and issubclass(obj, base.VideoTextBuilder)
                and obj is not base.VideoTextBuilder]
  named = [c for c in candidates if c.name == name]
  if len(named) == 1:
    return named[0]
  if len(candidates) == 1:
    return candidates[0]
  raise ValueError(f"data_prep.builders.{name} must expose exactly one VideoTextBuilder "
                   f"subclass; found {[c.__name__ for c in candidates]}")
