"""Exact gradient caching (GradCache): the global-batch loss and gradient in micro-batches.

The contrastive head (NegNCE / InfoNCE over the similarity matrix, TPM-CL) couples every sample of
the global batch, so plain gradient accumulation (a loss per micro-batch) would change the
objective. The towers, though, are per-sample, and the head only reads small per-sample features
(`RetrievalModel.encode_for_loss`). So, for a global batch of B samples in k micro-batches:

  1. encode: the towers run on each micro-batch WITHOUT differentiation (no activations are
     kept), and the features of the whole batch are assembled: sentence [B, D], words [B, L, D],
     frame tokens before the temporal header [B, F, D], masks;
  2. head: `loss_from_features` runs once on the global batch, with its value, the gradient of
     the head's own parameters and the gradient G = dL/d(features). Every discrete choice (the
     hard-negative set, TPM-CL's adaptive masks, the EOT argmax) is made here, once, on the full
     batch, exactly as without caching;
  3. re-encode: each micro-batch runs through the towers again, now under `jax.vjp`, and its
     slice of G is pulled back to the tower parameters; the k tower gradients are summed.

The result equals `jax.value_and_grad(model.loss)` on the global batch up to float summation
order. Cost: one extra forward of the towers (step 1), the head once. Memory: one micro-batch's
tower activations plus the features of the whole batch (a few MB), instead of the whole batch's
activations.

Micro-batches are a `lax.scan` over slices of the sharded global batch (one compilation whatever
k is). Micro-batch j holds rows j, j + k, j + 2k, ...: with the leading axis split into contiguous
shards over the data-parallel devices, that column of the [B/k, k] view has B/(k n) rows on each
of the n shards, so every device works on every micro-batch and no rows move between devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tvr_jax import sharding

PyTree = Any
Batch = Mapping[str, jax.Array]
Features = dict[str, jax.Array]


def check_split(batch_size: int, accum_steps: int, shards: int = 1) -> None:
  """Raises ValueError unless `batch_size` splits into `accum_steps` micro-batches over `shards`.

  Every micro-batch must spread evenly over the data-parallel shards: B % (k * n) == 0.
  """
  if not isinstance(accum_steps, int) or isinstance(accum_steps, bool) or accum_steps < 1:
    raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}")
  if batch_size % (accum_steps * shards):
    raise ValueError(
        f"global batch {batch_size} does not split into accum_steps={accum_steps} micro-batches "
        f"over {shards} data-parallel shard(s): it must be a multiple of accum_steps x shards = "
        f"{accum_steps * shards}")


def split_microbatches(tree: PyTree, accum_steps: int, mesh: Mesh | None = None) -> PyTree:
  """[B, ...] leaves -> [k, B/k, ...]: micro-batch j is rows j, j + k, j + 2k, ... of the batch.

  With `mesh`, axis 1 is constrained to the batch sharding, so each micro-batch is spread over
  every data-parallel shard (see the module docstring).
  """
  def one(x):
    x = jnp.asarray(x)
    b = x.shape[0]
    y = jnp.swapaxes(x.reshape(b // accum_steps, accum_steps, *x.shape[1:]), 0, 1)
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(y, sharding.microbatch_sharding(mesh))
    return y
  return jax.tree.map(one, tree)


def merge_microbatches(tree: PyTree, mesh: Mesh | None = None) -> PyTree:
  """The inverse of `split_microbatches`: [k, B/k, ...] leaves -> [B, ...] in the batch's order."""
  def one(x):
    k, m = x.shape[:2]
    y = jnp.swapaxes(x, 0, 1).reshape(k * m, *x.shape[2:])
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(y, sharding.batch_sharding(mesh))
    return y
  return jax.tree.map(one, tree)


def _is_differentiable(x: jax.Array) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _split_features(features: Features) -> tuple[Features, Features]:
  """(float features, which get cotangents; integer ones: masks)."""
  floats = {k: v for k, v in features.items() if _is_differentiable(v)}
  ints = {k: v for k, v in features.items() if not _is_differentiable(v)}
  return floats, ints


def value_and_grad(model_of: Callable[[PyTree], Any], params: PyTree, batch: Batch,
                   accum_steps: int, *, mesh: Mesh | None = None,
                   param_shardings: PyTree | None = None,
                   loss_kwargs: dict[str, Any] | None = None, unroll: bool = False
                   ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], PyTree]:
  """`jax.value_and_grad(lambda p: model_of(p).loss(batch), has_aux=True)(params)` in micro-batches.

  Args:
    model_of: params -> the model (e.g. `nnx.merge(graphdef, params, rest)`); it must have
      `encode_for_loss(batch) -> features` (per-sample rows) and `loss_from_features(features) ->
      (total, terms)`, as `RetrievalModel` does.
    params: the differentiated parameters (any pytree).
    batch: the global batch, every leaf [B, ...].
    accum_steps: k, micro-batches; B must be a multiple of k (and of k x the data-parallel shards
      of `mesh`).
    mesh: when given, micro-batches and features are constrained to the batch sharding over it.
    param_shardings: when given (a tree like `params` of shardings), the gradient accumulator is
      kept in them (FSDP: each device holds its shards of the sum only).
    loss_kwargs: keyword arguments of `loss_from_features` (e.g. `health=True`).
    unroll: unroll both micro-batch loops (the same values; XLA's cost analysis counts a loop body
      once, so the AOT tool lowers an unrolled copy to count the step's FLOPs).

  Returns:
    ((total, terms), grads), as `jax.value_and_grad(..., has_aux=True)`.
  """
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"batch leaves disagree on the batch size: {sorted(sizes)}")
  (batch_size,) = sizes
  check_split(batch_size, accum_steps,
              sharding.data_parallel_size(mesh) if mesh is not None else 1)

  def encode(p, micro):
    return model_of(p).encode_for_loss(micro)

  def constrain_grads(g):
    if param_shardings is None:
      return g
    return jax.lax.with_sharding_constraint(g, param_shardings)

  micro = split_microbatches(batch, accum_steps, mesh)

  # 1. Features of every micro-batch, nothing kept for a backward pass.
  frozen = jax.lax.stop_gradient(params)
  loops = accum_steps if unroll else 1
  _, stacked = jax.lax.scan(lambda c, mb: (c, encode(frozen, mb)), None, micro, unroll=loops)
  features = merge_microbatches(stacked, mesh)

  # 2. The head once on the global batch: value, head-parameter gradients, feature gradients.
  floats, ints = _split_features(features)

  def head(p, f):
    return model_of(p).loss_from_features({**f, **ints}, **(loss_kwargs or {}))

  (total, terms), (head_grads, feature_grads) = jax.value_and_grad(
      head, argnums=(0, 1), has_aux=True)(params, floats)

  # 3. Re-encode each micro-batch under a VJP with its slice of the feature gradients.
  cotangents = split_microbatches(feature_grads, accum_steps, mesh)

  def pull_back(acc, xs):
    mb, ct = xs
    _, vjp = jax.vjp(lambda p: _split_features(encode(p, mb))[0], params)
    (g,) = vjp(ct)
    return constrain_grads(jax.tree.map(jnp.add, acc, g)), None

  grads, _ = jax.lax.scan(pull_back, constrain_grads(head_grads), (micro, cotangents),
                          unroll=loops)
  return (total, terms), grads
