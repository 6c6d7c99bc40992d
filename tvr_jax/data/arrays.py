"""From per-process NumPy batches to global `jax.Array`s, and who reads which rows.

Every process loads `global_batch / process_count` rows; `jax.make_array_from_process_local_data`
stitches the processes' rows into one global array laid out by the mesh's data sharding.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def process_layout(global_batch_size: int, process_index: int | None = None,
                   process_count: int | None = None) -> tuple[int, int, int]:
  """(process_index, process_count, local_batch_size), defaulting to this JAX process.

  Raises ValueError when the global batch does not split evenly over the processes.
  """
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                     f"{process_count} processes (each loads an equal share)")
  return process_index, process_count, global_batch_size // process_count


def ensure_flags_parsed() -> None:
  """Lets Grain's worker processes read their absl flags outside an absl app (pytest, notebooks).

  Grain's multiprocessing reads `--grain_*` flags; unparsed flags raise `UnparsedFlagAccessError`.
  Marking them parsed keeps their defaults; inside `absl.app.run` they are parsed already.
  """
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def to_global(batch: Mapping[str, np.ndarray], sharding, global_batch_size: int) -> dict:
  """Turns this process's rows into global arrays sharded by `sharding` (None: keep NumPy).

  Args:
    batch: {name: array `[local_batch, ...]`}.
    sharding: a `jax.sharding.Sharding` that splits the leading (batch) dimension over the data
      axes and replicates the rest, e.g. `tvr_jax.sharding.batch_sharding(mesh)`
      (`NamedSharding(mesh, P(('data', 'fsdp')))`); None returns `batch` unchanged.
    global_batch_size: rows of the global array.

  Returns:
    {name: `jax.Array [global_batch, ...]`}.
  """
  if sharding is None:
    return dict(batch)
  import jax
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    out[name] = jax.make_array_from_process_local_data(
        sharding, value, (global_batch_size,) + value.shape[1:])
  return out
