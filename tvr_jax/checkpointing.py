"""The one module that owns the Orbax API.

Orbax still moves between releases; keeping every call to it here makes an upgrade one edit.

Part 1 (this section): whole-pytree save/restore, used by `tvr_jax.convert` / `load_clip` for
converted CLIP weights. Saving is atomic: the tree is written to a temporary sibling directory and
renamed into place, so a failure never leaves a partial `directory` behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


def temporary_sibling(directory: str | os.PathLike, tag: str = "tmp") -> str:
  """Returns a fresh, not yet existing path next to `directory` (same filesystem, so rename works)."""
  directory = os.path.abspath(os.fspath(directory))
  parent, name = os.path.split(directory.rstrip(os.sep))
  return os.path.join(parent, f".{name}.{tag}-{uuid.uuid4().hex[:12]}")


def save_pytree(directory: str | os.PathLike, tree: PyTree) -> str:
  """Saves a pytree of arrays (numpy or jax) to `directory`, atomically.

  The tree is written to a temporary sibling and renamed to `directory` only once Orbax has
  committed it; on any failure the sibling is removed and `directory` is untouched.

  Args:
    directory: target path; must not exist yet (its parent is created if needed).
    tree: nested dicts/lists of arrays or scalars (e.g. `nnx.state(model).to_pure_dict()`).

  Returns:
    The absolute path of the saved checkpoint.

  Raises:
    FileExistsError: `directory` already exists.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise FileExistsError(f"refusing to overwrite existing checkpoint directory {directory}")
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  tmp = temporary_sibling(directory)
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(tmp, tree)
    checkpointer.close()
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _key_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def pytree_metadata(directory: str | os.PathLike) -> PyTree:
  """Returns the saved tree's structure with Orbax array metadata (shape, dtype) at the leaves."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory at {directory}")
  meta = ocp.PyTreeCheckpointer().metadata(directory)
  meta = getattr(meta, "item_metadata", meta)
  return getattr(meta, "tree", meta)


def restore_pytree(directory: str | os.PathLike, abstract_tree: PyTree | None = None) -> PyTree:
  """Restores a pytree saved by `save_pytree`.

  Args:
    directory: the checkpoint path.
    abstract_tree: optional target with the saved structure whose leaves are
      `jax.ShapeDtypeStruct`s (or arrays). Leaves that carry a `sharding` are restored as
      `jax.Array`s with that sharding; the others as numpy arrays cast to the leaf dtype. Shapes
      are checked against the checkpoint.

  Returns:
    Without `abstract_tree`: the saved tree with numpy arrays (host memory, no device placement,
    so it works on any topology). With it: a tree of the same structure.

  Raises:
    FileNotFoundError: no checkpoint at `directory`.
    ValueError: structure or a shape differs from `abstract_tree` (the message names the key).
  """
  directory = os.path.abspath(os.fspath(directory))
  saved = pytree_metadata(directory)
  checkpointer = ocp.PyTreeCheckpointer()
  if abstract_tree is None:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))

  saved_flat = dict((_key_name(p), m) for p, m in jax.tree_util.tree_leaves_with_path(saved))
  target_flat = dict((_key_name(p), t) for p, t in jax.tree_util.tree_leaves_with_path(abstract_tree))
  missing = sorted(set(target_flat) - set(saved_flat))
  extra = sorted(set(saved_flat) - set(target_flat))
  if missing or extra:
    raise ValueError(f"checkpoint {directory} does not match the target tree: missing from the "
                     f"checkpoint {missing[:10]}, not in the target {extra[:10]}")
  for key, target in target_flat.items():
    if tuple(saved_flat[key].shape) != tuple(target.shape):
      raise ValueError(f"checkpoint {directory}: {key} has shape {tuple(saved_flat[key].shape)}, "
                       f"target expects {tuple(target.shape)}")

  def _args(leaf):
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape),
                                  dtype=leaf.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)

  restore_args = jax.tree.map(_args, abstract_tree)
  return checkpointer.restore(
      directory, args=ocp.args.PyTreeRestore(item=abstract_tree, restore_args=restore_args))
