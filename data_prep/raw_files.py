"""Readers for raw annotation files that never execute code and never crash on one bad entry.

Whole-file faults (missing, unparseable, wrong top-level shape, a pickle that asks for code) raise
`base.RawDataError` naming the file; entry-level faults are left for the builders to skip and count.
Text is decoded as UTF-8 with `surrogateescape`, so one non-UTF-8 caption does not make the whole
file unreadable: it comes back with lone surrogates, which `base.check_caption` rejects.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
from typing import Any

from etils import epath

from data_prep.base import RawDataError

# The only globals a restricted pickle may name: plain containers and text.
_SAFE_PICKLE_GLOBALS = frozenset({
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "str"), ("builtins", "bytes"),
    ("__builtin__", "dict"), ("__builtin__", "list"), ("__builtin__", "str"),
    ("__builtin__", "unicode"),
})


def read_text(path: str | os.PathLike) -> str:
  """File contents as text (UTF-8, invalid bytes kept as lone surrogates)."""
  path = epath.Path(path)
  if not path.exists():
    raise RawDataError(f"annotation file {path} is missing")
  return path.read_bytes().decode("utf-8", errors="surrogateescape")


def read_json(path: str | os.PathLike) -> Any:
  """Parsed JSON; raises RawDataError naming the file when it is not valid JSON."""
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise RawDataError(f"annotation file {path} is not valid JSON: {e}") from e


def read_csv(path: str | os.PathLike, required_columns: tuple[str, ...]) -> list[dict[str, Any]]:
  """Rows of a CSV file with a header; raises RawDataError if a required column is absent."""
  text = read_text(path)
  reader = csv.DictReader(io.StringIO(text, newline=""))
  missing = [c for c in required_columns if c not in (reader.fieldnames or [])]
  if missing:
    raise RawDataError(f"annotation file {path} lacks column(s) {missing}; header is "
                       f"{reader.fieldnames}")
  try:
    return list(reader)
  except csv.Error as e:
    raise RawDataError(f"annotation file {path} is not valid CSV: {e}") from e


def read_lines(path: str | os.PathLike) -> list[str]:
  """Non-empty stripped lines of a text file (split lists)."""
  return [line.strip() for line in read_text(path).splitlines() if line.strip()]


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that refuses every global except plain containers and text (no code runs)."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _SAFE_PICKLE_GLOBALS:
      return {"dict": dict, "list": list, "str": str, "unicode": str, "bytes": bytes}[name]
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError("refusing persistent ids")


def read_pickle_safely(path: str | os.PathLike) -> Any:
  """Loads a pickle of dicts/lists/strings only, without executing any pickled object.

  Python 2 byte strings come back as `bytes` (checked as UTF-8 later, per caption).

  Raises:
    RawDataError: the file is missing, corrupt, or names any other global (e.g. `os.system`).
  """
  path = epath.Path(path)
  if not path.exists():
    raise RawDataError(f"annotation file {path} is missing")
  try:
    with path.open("rb") as f:
      return _RestrictedUnpickler(f, encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          IndexError, KeyError) as e:
    raise RawDataError(f"annotation file {path} is not a plain pickle of captions: {e}") from e
