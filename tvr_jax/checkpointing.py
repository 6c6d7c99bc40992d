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

from tvr_jax.tree_paths import check_same_leaves, flatten_params, path_str

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
  # Orbax keeps its own temporaries beside the path it is given; a private container directory
  # keeps those inside, so a failure is cleaned up by one rmtree.
  container = temporary_sibling(directory)
  os.makedirs(container)
  try:
    tmp = os.path.join(container, "tree")
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(tmp, tree)
    checkpointer.close()
    os.rename(tmp, directory)
  finally:
    shutil.rmtree(container, ignore_errors=True)
  return directory


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

  try:
    check_same_leaves(flatten_params(abstract_tree), flatten_params(saved), f"checkpoint {directory}")
  except ValueError as e:
    raise ValueError(f"{e} (target tree vs checkpoint)") from None

  def _args(leaf):
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape),
                                  dtype=leaf.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)

  restore_args = jax.tree.map(_args, abstract_tree)
  return checkpointer.restore(
      directory, args=ocp.args.PyTreeRestore(item=abstract_tree, restore_args=restore_args))


# ==================================================================================================
# Part 2: training checkpoints (CheckpointManager).
#
# One step directory per checkpoint, `DIR/<step>/{state,data,meta}`:
#   state  the train-state pytree (parameters, optimizer state, step, RNG), sharded arrays
#   data   every process's input-iterator state (JSON), so a resumed run sees the same batches
#   meta   a JSON description of the run (model/config fingerprint) checked on restore
# Orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it only after every process
# has finished writing (the rename is the commit), so a process killed mid-save leaves the last
# finalized step as the latest; stale tmp directories are removed on the next start.
# ==================================================================================================

import base64  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from collections.abc import Mapping  # noqa: E402

from orbax.checkpoint import checkpoint_managers as _ocp_managers  # noqa: E402


class CheckpointError(RuntimeError):
  """A training checkpoint cannot be used (corrupt, or from another model); nothing was changed."""


def _gather_process_strings(text: str) -> list[str]:
  """All processes' `text`, in process order (a no-op list of one on a single process)."""
  if jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [bytes(gathered[i, :lengths[i]]).decode() for i in range(len(lengths))]


def _encode_data_state(state: Any) -> str:
  """JSON text for an input-iterator state (bytes are base64-wrapped)."""
  if isinstance(state, (bytes, bytearray)):
    return json.dumps({"bytes": base64.b64encode(bytes(state)).decode()})
  return json.dumps({"json": state})


def _decode_data_state(text: str) -> Any:
  d = json.loads(text)
  return base64.b64decode(d["bytes"]) if "bytes" in d else d["json"]


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  return {k: tuple(getattr(x, "shape", ())) for k, x in flatten_params(tree).items()}


def is_step_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is one finalized training checkpoint step (`.../checkpoints/<step>/state`)."""
  path = os.fspath(path)
  return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(
      os.path.join(path, "state"))


def latest_step_dir(directory: str | os.PathLike) -> str | None:
  """The newest finalized step directory under a training checkpoint directory, or None.

  Read-only (safe beside a training run writing there): Orbax writes each step to
  `<step>.orbax-checkpoint-tmp*` and renames it when complete, so only finished steps count.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    return None
  steps = sorted(int(n) for n in os.listdir(directory) if is_step_dir(os.path.join(directory, n)))
  return os.path.join(directory, str(steps[-1])) if steps else None


def restore_train_params(step_dir: str | os.PathLike) -> PyTree:
  """The `params` subtree of a training checkpoint step as host NumPy arrays (any topology).

  Raises CheckpointError naming the step directory when it is unreadable or holds no parameters.
  """
  step_dir = os.path.abspath(os.fspath(step_dir))
  try:
    saved = restore_pytree(os.path.join(step_dir, "state"))
  except Exception as e:  # noqa: BLE001 - any Orbax failure means an unusable checkpoint
    raise CheckpointError(f"checkpoint {step_dir} is unreadable ({type(e).__name__}: {e})") from e
  if not isinstance(saved, dict) or "params" not in saved:
    raise CheckpointError(f"checkpoint {step_dir}/state has no 'params' entry")
  return saved["params"]


class TrainCheckpointManager:
  """Async, atomic training checkpoints: latest K plus the best by a validation metric.

  Usage (from `tvr_jax.train`):
    mgr = TrainCheckpointManager(workdir + "/checkpoints", keep=2, best_metric="t2v/R@1")
    step = mgr.latest_step()                                  # None on a fresh run
    state, data_state, meta = mgr.restore(step, abstract_state, meta)
    mgr.save(step, state, data_state=it.get_state(), metrics={"t2v/R@1": 41.2}, meta=meta)
    mgr.close()                                               # waits for the async write
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2, best_metric: str | None = "t2v/R@1",
               async_save: bool = True, read_only: bool = False):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: where step directories live.
      keep: number of most recent checkpoints kept.
      best_metric: metric name (as passed to `save(metrics=...)`) whose highest value is kept too;
        None keeps only the latest.
      async_save: write in a background thread (training continues; `close` waits).
      read_only: only read (evaluation): creates, deletes and cleans up nothing, so it is safe
        beside a training run that is writing into the same directory.
    """
    self.directory = os.path.abspath(os.fspath(directory))
    self.best_metric = best_metric
    policies = [_ocp_managers.LatestN(n=max(int(keep), 1))]
    best_fn = None
    if best_metric:
      best_fn = lambda m: float((m or {}).get(best_metric, -math.inf))  # noqa: E731
      policies.append(_ocp_managers.BestN(get_metric_fn=best_fn, reverse=False, n=1,
                                          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode="max",   # only so that Orbax writes the metrics to disk
        enable_async_checkpointing=async_save,
        preservation_policy=_ocp_managers.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=not read_only,   # remove what a killed save left behind
        create=not read_only, read_only=read_only)
    # Handlers declared up front so a fresh process can read metadata before its first save.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """Most recent finalized step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every finalized step still on disk, ascending."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """Step with the highest `best_metric` among saved checkpoints with metrics (None if none has)."""
    best, best_value = None, -math.inf
    for step in self.all_steps():
      metrics = self._manager.metrics(step) or {}
      if self.best_metric in metrics and float(metrics[self.best_metric]) > best_value:
        best, best_value = step, float(metrics[self.best_metric])
    return best

  def step_dir(self, step: int) -> str:
    """Directory of one step's checkpoint."""
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: PyTree, *, data_state: Any = None,
           metrics: Mapping[str, float] | None = None, meta: Mapping[str, Any] | None = None) -> None:
    """Starts saving `state` (and this process's `data_state`) as checkpoint `step`.

    Every process must call it (arrays are written shard by shard, iterator states gathered). Returns
    once the device arrays are copied to host; writing continues in the background when async.
    """
    data_states = _gather_process_strings(_encode_data_state(data_state))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"processes": data_states}),
        meta=ocp.args.JsonSave(dict(meta or {})))
    # {} rather than None: steps without an evaluation rank last for `best_metric`.
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    self._manager.save(int(step), args=args, metrics=metrics, force=True)

  def check_compatible(self, step: int, abstract_state: PyTree,
                       meta: Mapping[str, Any] | None = None) -> None:
    """Raises CheckpointError if checkpoint `step` does not fit `abstract_state` / `meta`.

    Compares the saved tree's keys and shapes (another model size shows as a shape difference,
    another architecture as missing keys) and, for keys present in both, the `meta` dicts.
    """
    path = self.step_dir(step)
    try:
      saved_meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      item_meta = self._manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 - any read failure means the directory is unusable
      raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                            "delete it (or use another --workdir) to start fresh") from e
    if item_meta is None:
      raise CheckpointError(f"checkpoint {path} has no readable 'state' item; it is corrupt")
    item_meta = getattr(item_meta, "tree", item_meta)
    for key, want in (meta or {}).items():
      if key in (saved_meta or {}) and saved_meta[key] != want:
        raise CheckpointError(f"checkpoint {path} was written with {key}={saved_meta[key]!r}, this run "
                              f"has {key}={want!r}; use a fresh --workdir or the matching config")
    saved, target = _flat_shapes(item_meta), _flat_shapes(abstract_state)
    missing, extra = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or extra:
      raise CheckpointError(f"checkpoint {path} holds a different model: missing {missing[:5]}, "
                            f"unexpected {extra[:5]}")
    for key, shape in target.items():
      if saved[key] != shape:
        raise CheckpointError(f"checkpoint {path} holds a different model size: {key} has shape "
                              f"{saved[key]}, this config builds {shape}")

  def restore(self, step: int, abstract_state: PyTree, meta: Mapping[str, Any] | None = None
              ) -> tuple[PyTree, Any, dict]:
    """Restores checkpoint `step` onto the shardings of `abstract_state` (ShapeDtypeStructs).

    Returns `(state, data_state of this process, saved meta)`. Raises CheckpointError (naming the
    directory and the mismatch) for a checkpoint of another model or a corrupt one.
    """
    self.check_compatible(step, abstract_state, meta)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {self.step_dir(step)} could not be restored "
                            f"({type(e).__name__}: {e}); it is corrupt or incomplete") from e
    processes = (out["data"] or {}).get("processes", [])
    if len(processes) != jax.process_count():
      raise CheckpointError(f"checkpoint {self.step_dir(step)} holds input state for {len(processes)} "
                            f"processes, this run has {jax.process_count()}; resume with the same "
                            "number of processes")
    return out["state"], _decode_data_state(processes[jax.process_index()]), dict(out["meta"] or {})

  def wait(self) -> None:
    """Blocks until the background write (if any) is finalized."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
