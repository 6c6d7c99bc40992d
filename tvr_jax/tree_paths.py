"""Pytree key paths as strings, flat parameter dicts, and filling a tree from a flat dict.

Parameters, optimizer state and checkpoints are all addressed by one spelling of a leaf's path:
`"clip/visual/transformer/resblocks/0/attn/q_proj/kernel"` (dict keys, list indices and attribute
names joined by "/"; NNX's trailing "/value" dropped). Sharding rules, optimizer groups, checkpoint
comparisons and weight conversion all use these helpers, so a path means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _key_part(key: Any) -> str:
  for attr in ("key", "idx", "name"):   # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """'a/b/0/c' from a jax key path (int and str keys alike: Orbax restores list indices as str)."""
  s = "/".join(_key_part(k) for k in path)
  return s[:-len("/value")] if s.endswith("/value") else s


def flatten_params(tree: Any) -> dict[str, Any]:
  """Nested dicts / lists -> {"a/b/0/c": leaf}."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/0/c": leaf} -> nested dict with string keys (the form saved with Orbax)."""
  tree: dict[str, Any] = {}
  for key, leaf in flat.items():
    node = tree
    *parents, last = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return tree


def check_same_leaves(want: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
  """Raises ValueError naming `what` and the keys unless both flat dicts match in keys and shapes.

  `want` / `got` map paths to arrays or anything with a `.shape` (ShapeDtypeStructs, metadata).
  """
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"{what}: parameters do not match: missing {missing[:10]}, unexpected "
                     f"{extra[:10]}")
  for key, leaf in want.items():
    if tuple(np.shape(got[key])) != tuple(np.shape(leaf)):
      raise ValueError(f"{what}: {key} has shape {tuple(np.shape(got[key]))}, expected "
                       f"{tuple(np.shape(leaf))}")


def fill_params(target: Any, flat: Mapping[str, Any], what: str) -> Any:
  """`target`'s structure with every leaf taken from `flat` (same keys and shapes, checked).

  Leaves become jnp arrays of the target leaf's dtype. Raises ValueError naming `what` and the
  first differing keys otherwise.
  """
  check_same_leaves(flatten_params(target), flat, what)
  return jax.tree_util.tree_map_with_path(
      lambda p, leaf: jnp.asarray(flat[path_str(p)], getattr(leaf, "dtype", None)), target)
