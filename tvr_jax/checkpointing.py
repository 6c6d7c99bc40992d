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
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tvr_jax.tree_paths import check_same_leaves, flatten_params

PyTree = Any


def temporary_sibling(directory: str | os.PathLike, tag: str = "tmp") -> str:
  """A fresh, not yet existing path next to `directory` (same filesystem, so rename works)."""
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
    check_same_leaves(flatten_params(abstract_tree), flatten_params(saved),
                      f"checkpoint {directory}")
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
#
# Integrity: `save` refuses non-finite leaves and records per-leaf checksums in `meta`; `restore`
# verifies them. `restore_latest` falls back over damaged steps to the newest intact one; the
# caller sets the damaged ones aside as `<step>.damaged` (kept, no longer counted as steps). A
# failed write (full disk) is one CheckpointWriteError naming the directory and its free space, and
# leaves no tmp directory.
# ==================================================================================================

import base64  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import errno  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import logging as py_logging  # noqa: E402
import math  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402

from absl import logging  # noqa: E402

from orbax.checkpoint import checkpoint_managers as _ocp_managers  # noqa: E402


class CheckpointError(RuntimeError):
  """A training checkpoint cannot be used (corrupt, or from another model); nothing was changed."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint is intact but belongs to another model or objective: never fallen back from."""


class CheckpointDamagedError(CheckpointError):
  """The checkpoint's files are unreadable, incomplete or fail their checksums."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (e.g. the disk is full); no partial step is left behind."""


class NonFiniteStateError(CheckpointError):
  """Refused to save a state holding NaN/inf values (the previous checkpoints are untouched)."""


# --------------------------------------------------------------------------------------------------
# Integrity: per-leaf checksums recorded in the step's meta at save time, verified after restore.
#
# Orbax stores no checksum of its own (flipped bytes in an array file restore as wrong numbers or
# NaNs, without an error). Each leaf's bits, read as uint32 words w[i] (2- and 1-byte dtypes widened
# to uint32), give two sums modulo 2**32:
#   plain     sum_i w[i]              detects any single changed word
#   weighted  sum_i (2*i + 1) * w[i]  odd weights are invertible mod 2**32, so a single changed word
#                                     changes it too; it also detects swapped or shifted blocks,
#                                     which leave the plain sum unchanged
# (i = the row-major position in the global array). Integer addition is associative, so the sums
# do not depend on reduction order or on how the array is sharded; both are computed on device
# with a finiteness flag, by one jitted function per leaf signature (shape, dtype, sharding):
# a transformer's few distinct leaf shapes compile quickly, where one function over all ~600
# leaves of a ViT-B/32 train state took minutes to compile on a loaded 2-core CPU.
# --------------------------------------------------------------------------------------------------
INTEGRITY_KEY = "integrity"
CHECKSUM_ALGORITHM = "u32-sum+odd-weighted-u32-sum/v1"


def _words(x: jax.Array) -> jax.Array:
  """The leaf's bits as uint32 words (shape of `x`, plus a trailing 2 for 8-byte dtypes)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    narrow = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _leaf_integrity(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  w = _words(x)
  # Row-major position of every word, built from iotas so no reshape of a sharded array is needed.
  position = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    position = position + (jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
                           * jnp.uint32(stride % 2**32))
    stride *= w.shape[axis]
  plain = jnp.sum(w, dtype=jnp.uint32)
  weighted = jnp.sum(w * (position * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return plain, weighted, finite


_leaf_integrity_jit = jax.jit(_leaf_integrity)


@functools.lru_cache(maxsize=8)
def _leaf_integrity_jit_onto(sharding: jax.sharding.Sharding):
  # Replicated outputs: every process can read them (multi-host states).
  return jax.jit(_leaf_integrity, out_shardings=(sharding, sharding, sharding))


def state_integrity(tree: PyTree) -> tuple[dict[str, list[int]], list[str]]:
  """Checksums of every leaf and the paths of non-finite leaves, computed on device.

  Args:
    tree: a pytree of arrays (jax arrays, sharded or not, or NumPy arrays / scalars).

  Returns:
    `({path: [plain, weighted]}, [paths of leaves with a NaN or inf])`, paths as
    `tvr_jax.tree_paths.path_str` spells them. Independent of sharding and reduction order.
  """
  flat = flatten_params(tree)
  paths = list(flat)
  results = []
  for p in paths:   # dispatched asynchronously; compiled once per (shape, dtype, sharding)
    x = flat[p]
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding):
      fn = _leaf_integrity_jit_onto(
          jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()))
    else:
      fn = _leaf_integrity_jit
    results.append(fn(x))
  results = jax.device_get(results)   # one wait for all of them
  sums = {p: [int(a), int(b)] for p, (a, b, _) in zip(paths, results)}
  return sums, [p for p, (_, _, ok) in zip(paths, results) if not bool(ok)]


def verify_integrity(tree: PyTree, saved_meta: Mapping[str, Any] | None, what: str, *,
                     only_prefix: str = "") -> bool:
  """Checks a restored tree against the checksums recorded when it was saved.

  Args:
    tree: the restored pytree.
    saved_meta: the step's meta dict (its INTEGRITY_KEY entry holds the checksums).
    what: names the checkpoint in messages.
    only_prefix: verify only leaves whose path starts with this (e.g. "params/" for a tree
      restored without a target, whose other paths Orbax may spell differently); all of
      them must be recorded.

  Returns:
    True if verified, False if the checkpoint records no checksums (older checkpoints: only
    finiteness is checked then).

  Raises:
    CheckpointDamagedError: a checksum differs, a leaf is not recorded, or a restored leaf is
      not finite; the message names the leaves.
  """
  sums, nonfinite = state_integrity(tree)
  recorded = (saved_meta or {}).get(INTEGRITY_KEY)
  verified = False
  if recorded:
    if recorded.get("algorithm") != CHECKSUM_ALGORITHM:
      raise CheckpointDamagedError(f"{what}: unknown checksum algorithm "
                                   f"{recorded.get('algorithm')!r}")
    want = recorded.get("leaves", {})
    keys = [k for k in sums if k.startswith(only_prefix)]
    if not only_prefix and set(want) != set(sums):
      raise CheckpointDamagedError(
          f"{what}: the restored leaves differ from the recorded ones (missing "
          f"{sorted(set(want) - set(sums))[:5]}, unrecorded {sorted(set(sums) - set(want))[:5]})")
    bad = [k for k in keys if list(want.get(k, [])) != sums[k]]
    if bad:
      raise CheckpointDamagedError(
          f"{what}: checksum mismatch in {len(bad)} of {len(keys)} arrays ({', '.join(bad[:5])}"
          f"{', ...' if len(bad) > 5 else ''}): its files were changed or damaged after saving")
    verified = True
  if nonfinite:
    raise CheckpointDamagedError(f"{what}: restored non-finite values (NaN/inf) in "
                                 f"{', '.join(nonfinite[:5])}"
                                 f"{', ...' if len(nonfinite) > 5 else ''}")
  return verified


def _gather_process_strings(text: str) -> list[str]:
  """All processes' `text`, in process order (a no-op list of one on a single process)."""
  if jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = np.asarray(
      multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
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
  verify_integrity({"params": saved["params"]}, read_step_meta(step_dir), f"checkpoint {step_dir}",
                   only_prefix="params/")
  return saved["params"]


def read_step_meta(step_dir: str | os.PathLike) -> dict:
  """The `meta` item of a training checkpoint step ({} when the step has none).

  Raises CheckpointDamagedError naming the step when the item exists but cannot be read.
  """
  path = os.path.join(os.path.abspath(os.fspath(step_dir)), "meta")
  if not os.path.isdir(path):
    return {}
  try:
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)
  except Exception as e:  # noqa: BLE001 - any read failure means a damaged item
    raise CheckpointDamagedError(f"checkpoint {step_dir}: its meta item is unreadable "
                                 f"({type(e).__name__}: {e})") from e
  return dict(meta or {})


DAMAGED_SUFFIX = ".damaged"


def set_aside_damaged(step_dir: str | os.PathLike, reason: str) -> str:
  """Renames a damaged step directory to `<step>.damaged` (`.damaged-2`, ... if taken).

  The data stays on disk for inspection (a `DAMAGED.txt` inside says why), but no longer counts as
  a step, so a resumed run can save that step number again. Process 0 renames; every process
  waits for it. Returns the new path.
  """
  step_dir = os.path.abspath(os.fspath(step_dir))
  target, k = step_dir + DAMAGED_SUFFIX, 1
  while os.path.exists(target):
    k += 1
    target = f"{step_dir}{DAMAGED_SUFFIX}-{k}"
  if jax.process_index() == 0:
    os.rename(step_dir, target)
    with open(os.path.join(target, "DAMAGED.txt"), "w") as f:
      f.write(reason + "\n")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"set_aside_damaged:{step_dir}")
  return target


def meta_differences(saved: Mapping[str, Any], want: Mapping[str, Any]
                     ) -> list[tuple[str, Any, Any]]:
  """`(key, saved value, this run's value)` for every key of `want` recorded with another value.

  Values are compared as JSON (tuples and lists alike); keys the checkpoint does not record are
  not differences (see `unrecorded_keys`).
  """
  norm = lambda v: json.loads(json.dumps(v, sort_keys=True))  # noqa: E731
  return [(k, saved[k], v) for k, v in want.items() if k in saved and norm(saved[k]) != norm(v)]


def unrecorded_keys(saved: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
  """Keys of `want` that the checkpoint's meta does not record (written by an older version)."""
  return sorted(set(want) - set(saved) - {INTEGRITY_KEY})


def _is_no_space(error: BaseException) -> bool:
  """Whether an exception (or one it was raised from) says the disk is full."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(error)
    if "RESOURCE_EXHAUSTED" in text or "No space left" in text or "ENOSPC" in text:
      return True
    error = error.__cause__ or error.__context__
  return False


class _QuietOrbaxWriteErrors(py_logging.Filter):
  """Keeps Orbax's background-thread tracebacks of a failed write off the console.

  The failure reaches the caller as one CheckpointWriteError line; the tracebacks still go to
  every other handler (the run's log file).
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (record.levelno >= py_logging.ERROR and record.exc_info is not None
                and f"{os.sep}orbax{os.sep}" in record.pathname)


def _install_console_filter() -> None:
  """Adds the filter to absl's console handler and every root stream handler but files."""
  handlers = [logging.get_absl_handler()] + [
      h for h in py_logging.getLogger().handlers
      if isinstance(h, py_logging.StreamHandler) and not isinstance(h, py_logging.FileHandler)]
  for handler in handlers:
    if not any(isinstance(f, _QuietOrbaxWriteErrors) for f in handler.filters):
      handler.addFilter(_QuietOrbaxWriteErrors())


class TrainCheckpointManager:
  """Async, atomic training checkpoints: latest K plus the best by a validation metric.

  Usage (from `tvr_jax.train`):
    mgr = TrainCheckpointManager(workdir + "/checkpoints", keep=2, best_metric="t2v/R@1")
    step = mgr.latest_step()                                  # None on a fresh run
    state, data_state, meta = mgr.restore(step, abstract_state, meta)
    mgr.save(step, state, data_state=it.get_state(), metrics={"t2v/R@1": 41.2}, meta=meta)
    mgr.close()                                               # waits for the async write
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2,
               best_metric: str | None = "t2v/R@1", async_save: bool = True,
               read_only: bool = False):
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
    self._pending_step: int | None = None   # step of the async save in flight
    _install_console_filter()
    self._failed = False                    # a write failed (reported once)
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
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """Most recent finalized step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every finalized step still on disk, ascending."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """Step with the highest `best_metric` among saved checkpoints with metrics (None if none)."""
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
           metrics: Mapping[str, float] | None = None,
           meta: Mapping[str, Any] | None = None) -> None:
    """Starts saving `state` (and this process's `data_state`) as checkpoint `step`.

    Every process must call it (arrays are written shard by shard, iterator states gathered). First
    checks every leaf finite and records its checksums in `meta` (one jitted device call); returns
    once the device arrays are copied to host; writing continues in the background when async.

    Raises:
      NonFiniteStateError: a leaf holds NaN/inf (nothing is written).
      CheckpointWriteError: this or the previous (async) save failed, e.g. on a full disk; the
        half-written step is removed.
    """
    sums, nonfinite = state_integrity(state)
    if nonfinite:
      latest = self.latest_step()
      raise NonFiniteStateError(
          f"refusing to save checkpoint step {step}: non-finite values (NaN/inf) in "
          f"{', '.join(nonfinite[:5])}{', ...' if len(nonfinite) > 5 else ''}; "
          f"the newest checkpoint in {self.directory} is still step {latest}")
    meta = {**dict(meta or {}),
            INTEGRITY_KEY: {"algorithm": CHECKSUM_ALGORITHM, "leaves": sums}}
    data_states = _gather_process_strings(_encode_data_state(data_state))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"processes": data_states}),
        meta=ocp.args.JsonSave(meta))
    # {} rather than None: steps without an evaluation rank last for `best_metric`.
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    with self._write_errors(step):   # also surfaces a failure of the previous async save
      self._manager.save(int(step), args=args, metrics=metrics, force=True)
    self._pending_step = int(step)

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """Turns an Orbax write failure into a one-line CheckpointWriteError; removes the tmp dir."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - tensorstore / Orbax raise many types
      failed = self._pending_step if self._pending_step is not None else step
      self._pending_step, self._failed = None, True
      for tmp in glob.glob(os.path.join(self.directory, f"{failed}.orbax-checkpoint-tmp*")):
        if jax.process_index() == 0:
          shutil.rmtree(tmp, ignore_errors=True)
      try:
        usage = shutil.disk_usage(self.directory)
        space = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
      except OSError:
        space = "free space unknown"
      if _is_no_space(e):
        reason = "no space left on the device"
      else:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
      raise CheckpointWriteError(
          f"cannot write checkpoint step {failed} into {self.directory}: {reason} ({space}); "
          "its partial files were removed and the earlier checkpoints are intact (Orbax's "
          "traceback is in the log file). Free space (or use another --workdir) and rerun the "
          "same command to resume") from None

  def read_meta(self, step: int) -> dict:
    """The saved meta dict of checkpoint `step` (CheckpointDamagedError if unreadable)."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any read failure means the directory is unusable
      raise CheckpointDamagedError(f"checkpoint {self.step_dir(step)} is unreadable or corrupt "
                                   f"({type(e).__name__}: {e})") from e
    return dict(out["meta"] or {})

  def check_meta(self, step: int, meta: Mapping[str, Any] | None, *,
                 allow_changes: Sequence[str] = (), hint: str = "") -> list[tuple[str, Any, Any]]:
    """Compares checkpoint `step`'s recorded meta with this run's `meta` (read-only).

    Returns the differences in `allow_changes` (for the caller to report). Raises
    CheckpointMismatchError listing EVERY other difference as `key: saved -> now` (`hint` is
    appended, with `{keys}` replaced by the refused keys joined by commas),
    CheckpointDamagedError if the meta cannot be read.
    """
    saved = self.read_meta(step)
    diffs = meta_differences(saved, dict(meta or {}))
    refused = [d for d in diffs if d[0] not in set(allow_changes)]
    if refused:
      lines = "".join(f"\n  {k}: {a!r} -> {b!r}" for k, a, b in refused)
      hint = (hint or "use a fresh --workdir or the matching config").format(
          keys=",".join(k for k, _, _ in refused))
      raise CheckpointMismatchError(
          f"checkpoint {self.step_dir(step)} was written with other settings than this run "
          f"(saved -> now):{lines}\n{hint}")
    return [d for d in diffs if d[0] in set(allow_changes)]

  def check_compatible(self, step: int, abstract_state: PyTree,
                       meta: Mapping[str, Any] | None = None, *,
                       allow_changes: Sequence[str] = (), hint: str = ""
                       ) -> list[tuple[str, Any, Any]]:
    """Raises CheckpointError if checkpoint `step` does not fit `abstract_state` / `meta`.

    Compares the `meta` dicts (`check_meta`) and the saved tree's keys and shapes (another model
    size shows as a shape difference, another architecture as missing keys). Returns the allowed
    meta differences.
    """
    path = self.step_dir(step)
    allowed = self.check_meta(step, meta, allow_changes=allow_changes, hint=hint)
    try:
      item_meta = self._manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 - any read failure means the directory is unusable
      raise CheckpointDamagedError(f"checkpoint {path} is unreadable or corrupt "
                                   f"({type(e).__name__}: {e})") from e
    if item_meta is None:
      raise CheckpointDamagedError(f"checkpoint {path} has no readable 'state' item; it is corrupt")
    item_meta = getattr(item_meta, "tree", item_meta)
    saved, target = _flat_shapes(item_meta), _flat_shapes(abstract_state)
    missing, extra = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or extra:
      raise CheckpointMismatchError(f"checkpoint {path} holds a different model: missing "
                                    f"{missing[:5]}, unexpected {extra[:5]}")
    for key, shape in target.items():
      if saved[key] != shape:
        raise CheckpointMismatchError(f"checkpoint {path} holds a different model size: {key} has "
                                      f"shape {saved[key]}, this config builds {shape}")
    return allowed

  def restore(self, step: int, abstract_state: PyTree, meta: Mapping[str, Any] | None = None, *,
              allow_changes: Sequence[str] = (), hint: str = "") -> tuple[PyTree, Any, dict]:
    """Restores checkpoint `step` onto the shardings of `abstract_state` (ShapeDtypeStructs).

    After the read, every leaf is checked against the checksums recorded at save time and for
    finiteness (one jitted call). Returns `(state, data_state of this process, saved meta)`, the
    meta without its checksums.

    Raises:
      CheckpointMismatchError: another model, or `meta` differs outside `allow_changes`.
      CheckpointDamagedError: unreadable, incomplete, or failing its checksums.
    """
    self.check_compatible(step, abstract_state, meta, allow_changes=allow_changes, hint=hint)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise CheckpointDamagedError(f"checkpoint {self.step_dir(step)} could not be restored "
                                   f"({type(e).__name__}: {e}); it is corrupt or incomplete") from e
    saved_meta = dict(out["meta"] or {})
    verified = verify_integrity(out["state"], saved_meta, f"checkpoint {self.step_dir(step)}")
    if not verified:
      logging.warning("checkpoint %s records no checksums (written by an older version): only "
                      "finiteness was checked", self.step_dir(step))
    processes = (out["data"] or {}).get("processes", [])
    if len(processes) != jax.process_count():
      raise CheckpointMismatchError(
          f"checkpoint {self.step_dir(step)} holds input state for {len(processes)} processes, "
          f"this run has {jax.process_count()}; resume with the same number of processes")
    saved_meta.pop(INTEGRITY_KEY, None)   # the checksums are this module's business
    return out["state"], _decode_data_state(processes[jax.process_index()]), saved_meta

  def restore_latest(self, abstract_state: PyTree, meta: Mapping[str, Any] | None = None, *,
                     allow_changes: Sequence[str] = (), hint: str = "") -> "Restored | None":
    """Restores the newest INTACT checkpoint, skipping damaged newer ones (see `Restored.skipped`).

    A damaged step (unreadable, truncated, failing its checksums, non-finite) is skipped with a
    warning naming it and why; a mismatch (other model or settings) is raised at once, since an
    older step of the same directory would not match either.

    Returns None when the directory holds no checkpoint.

    Raises:
      CheckpointMismatchError: as `restore`.
      CheckpointDamagedError: every step is damaged (the message lists each one and why).
    """
    skipped: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        state, data_state, saved_meta = self.restore(step, abstract_state, meta,
                                                     allow_changes=allow_changes, hint=hint)
      except CheckpointDamagedError as e:
        logging.warning("skipping damaged checkpoint step %d: %s", step, e)
        skipped.append((step, str(e)))
        continue
      allowed = meta_differences(saved_meta, dict(meta or {}))
      return Restored(step, state, data_state, saved_meta, allowed, skipped)
    if skipped:
      listing = "".join(f"\n  step {s}: {why}" for s, why in skipped)
      raise CheckpointDamagedError(
          f"no intact checkpoint in {self.directory}; every step is damaged:{listing}\n"
          "nothing was changed: move the damaged steps away (or use a fresh --workdir) to start "
          "from scratch")
    return None

  def wait(self) -> None:
    """Blocks until any background write is finalized (CheckpointWriteError if it failed)."""
    with self._write_errors(None):
      self._manager.wait_until_finished()
    self._pending_step = None

  def close(self) -> None:
    """Waits for pending writes, releases the manager; CheckpointWriteError if a write failed."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # noqa: BLE001 - the write error was already reported
        if not self._failed:
          raise
        logging.info("closing the checkpoint manager after a failed write: %s", e)


@dataclasses.dataclass
class Restored:
  """What `TrainCheckpointManager.restore_latest` restored."""
  step: int
  state: PyTree
  data_state: Any
  meta: dict
  allowed_changes: list[tuple[str, Any, Any]]   # (key, saved, now) accepted via allow_changes
  skipped: list[tuple[int, str]]                # (step, why) of newer damaged steps
