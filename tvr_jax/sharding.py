"""Device mesh, partitioning rules and sharded initialisation.

This is the one module that owns the JAX sharding API (so an upgrade is one edit):

- `make_mesh(config)`: one mesh with the named axes `data` and `fsdp`, sized by config; a size of -1
  absorbs every device the other axes leave.
- A rule table: an ordered list of `(regex, rule)` pairs matched (`re.search`) against a leaf's
  path (`params/clip/visual/conv1/kernel`, `opt_state/0/mu/clip/visual/conv1/kernel`, ...). The
  first match wins. A rule is `"fsdp"` (shard the largest dimension divisible by the `fsdp` axis),
  `"replicate"`, or a tuple of mesh-axis names / None (an explicit PartitionSpec). Leaves smaller
  than `min_fsdp_size` elements are replicated whatever the rule says: sharding a LayerNorm scale
  costs a collective and saves nothing.
- `abstract_sharded(init_fn, mesh, rules)`: `jax.eval_shape` gives shapes and the rules give
  shardings; `jax.jit(init_fn, out_shardings=...)` then creates every array already in place
  (`tvr_jax.train.create_train_state`), so a model that does not fit one device is never
  materialised whole, and ahead-of-time compilation lowers against the same abstract tree.

Batches are sharded over both mesh axes on their leading dimension (FSDP devices also split the
batch); `batch_sharding` gives that sharding, `data_parallel_size` the number of shards and
`microbatch_sharding` the sharding of a batch cut into gradient-caching micro-batches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tvr_jax.tree_paths import path_str  # noqa: F401 (rules and optimizer groups match these)

MESH_AXES = ("data", "fsdp")
# Batch dimension is split over every mesh axis: FSDP shards are also data-parallel shards.
BATCH_AXES = MESH_AXES

Rule = Union[str, tuple]
Rules = Sequence[tuple[str, Rule]]

# Default table: everything FSDP-sharded where it pays, small leaves replicated by size. The token
# embedding table stays whole: sharded over its vocabulary, every lookup would become partial
# lookups plus an all-reduce of the text activations (and a gather in the backward pass).
DEFAULT_RULES: tuple[tuple[str, Rule], ...] = (
    (r"token_embedding", "replicate"),
    (r".*", "fsdp"),
)


def mesh_shape(mesh_config: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves the mesh sizes for `MESH_AXES` from a `{axis: size}` mapping (one size may be -1).

  Raises ValueError naming the axis when sizes do not multiply to `n_devices`.
  """
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; known axes: {MESH_AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError("config.mesh: sizes must be positive or -1, got "
                     f"{dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: fixed axes ({known} devices) "
                       f"do not divide the {n_devices} available devices")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices, but {n_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh over `devices` (default: all devices of all processes).

  `jax.make_mesh` orders devices so that the innermost axis (fsdp) stays within fast links
  (same host / ICI ring) when it can. Axes are `Auto`: the compiler inserts the collectives, so the
  model and loss are written on global arrays.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of shards the batch's leading dimension is split into."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch array: leading dimension over ('data', 'fsdp'), the rest replicated."""
  del ndim  # trailing dimensions are implicitly replicated
  return NamedSharding(mesh, P(BATCH_AXES))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch cut into micro-batches, [k, B/k, ...]: axis 1 over ('data', 'fsdp').

  Each micro-batch (a slice along axis 0) is spread over every data-parallel shard
  (`tvr_jax.gradcache`).
  """
  return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, P())


def gather_to_all(mesh: Mesh) -> Callable[[Any], Any]:
  """A function that places every leaf of a pytree on every device of `mesh` (a constraint).

  Applied inside a jitted step to the per-sample features between the towers and the loss: the
  compiler then all-gathers each feature once in the forward pass, and its cotangent needs no
  collective in the backward pass (each device slices its own rows), instead of partitioning the
  [B, B, ...] similarity tensors of the head over the batch shards.
  """
  sharding = replicated(mesh)
  return lambda tree: jax.lax.with_sharding_constraint(
      tree, jax.tree.map(lambda _: sharding, tree))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch divides evenly over the data-parallel shards."""
  n = data_parallel_size(mesh)
  if batch_size % n:
    raise ValueError(
        f"config.batch_size={batch_size} is not divisible by the {n} data-parallel shards of the "
        f"mesh {dict(mesh.shape)}; choose a multiple of {n} (the global batch is split evenly so "
        "1, 8 or 256 devices train the same objective)")


def fsdp_spec(shape: Sequence[int], fsdp_size: int, axis: str = "fsdp") -> P:
  """PartitionSpec sharding the largest dimension of `shape` divisible by `fsdp_size` over `axis`.

  Ties go to the later dimension (usually the output features); no divisible dimension → replicated.
  """
  if fsdp_size <= 1 or not shape:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % fsdp_size == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = axis
  return P(*spec)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules,
             min_fsdp_size: int = 2 ** 14) -> P:
  """The PartitionSpec for one leaf: the first rule whose regex matches `path` decides."""
  pattern, rule = next(((p, r) for p, r in rules if re.search(p, path)), (None, "replicate"))
  if rule == "replicate" or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
    return P()
  if rule == "fsdp":
    return fsdp_spec(shape, mesh.shape.get("fsdp", 1))
  if isinstance(rule, (tuple, list)):
    if len(rule) > len(shape):
      raise ValueError(f"sharding rule {pattern!r} -> {rule} has more entries than {path} has "
                       f"dimensions {tuple(shape)}")
    for dim, ax in zip(shape, rule):
      if ax is not None and dim % mesh.shape[ax]:
        raise ValueError(f"sharding rule {pattern!r} -> {rule}: {path} dimension {dim} is not "
                         f"divisible by mesh axis {ax!r} of size {mesh.shape[ax]}")
    return P(*rule)
  raise ValueError(f"unknown sharding rule {rule!r} for pattern {pattern!r}; use 'fsdp', "
                   "'replicate' or a tuple of mesh axes")


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                   min_fsdp_size: int = 2 ** 14) -> Any:
  """NamedShardings by the rule table for each array or ShapeDtypeStruct leaf of `abstract_tree`."""
  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, spec_for(path_str(path), shape, mesh, rules, min_fsdp_size))
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def abstract_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                     min_fsdp_size: int = 2 ** 14) -> tuple[Any, Any]:
  """`(abstract tree, shardings)` of `init_fn()`'s output, without running it.

  The abstract tree's leaves are `jax.ShapeDtypeStruct`s carrying their rule-table sharding: what
  ahead-of-time compilation lowers against, and what a checkpoint restores onto.
  """
  abstract = jax.eval_shape(init_fn)
  shardings = tree_shardings(abstract, mesh, rules, min_fsdp_size)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def describe(tree: Any) -> str:
  """One line per leaf: path, shape, PartitionSpec; for logging what the rules chose."""
  lines = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    lines.append(f"{path_str(path):70s} {str(tuple(leaf.shape)):20s} {spec}")
  return "\n".join(lines)
