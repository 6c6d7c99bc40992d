"""Contrastive losses on a square similarity matrix S [B, B] (rows = texts, columns = videos).

`negnce` is the release's NegNCE (docs/method.md §4, §A.4): InfoNCE-like positive term plus a
penalty on hard negatives read off S itself. `infonce` is CLIP4Clip's CrossEn. Both use a fixed
scale lambda = 100 (not CLIP's learnable logit scale). S spans the global batch: under `jax.jit`
with sharded inputs the matrix already covers every device, so no all-gather is written here.
"""

import jax
import jax.numpy as jnp

SCALE = 100.0
CLIP_EPS = 1e-6


def _check_square(sim: jax.Array) -> None:
  if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
    raise ValueError(f"expected a square similarity matrix [B, B], got shape {sim.shape}")


def hard_negative_mask(sim: jax.Array, margin: float = 0.0) -> jax.Array:
  """Hard-negative set H of NegNCE(S): i != j and (S_ij > S_ii - m or S_ij > S_jj - m).

  Args:
    sim: [B, B].
    margin: the release's margin (0).

  Returns:
    bool [B, B]. Computed on a stop-gradient copy: the selection is not differentiated.
  """
  _check_square(sim)
  s = jax.lax.stop_gradient(sim)
  d = jnp.diagonal(s)
  hard = (margin + s - d[:, None] > 0) | (margin + s - d[None, :] > 0)
  return hard & ~jnp.eye(s.shape[0], dtype=bool)


def negnce(sim: jax.Array, scale: float = SCALE, pos_weight: float = 1.0,
           neg_weight: float = 0.5, margin: float = 0.0, clip_eps: float = CLIP_EPS) -> jax.Array:
  """One direction of NegNCE: rows of `sim` are queries, the diagonal holds the positives.

  P = clip(softmax_row(scale * S), eps, 1 - eps);
  loss = pos_weight * mean_i(-log P_ii) + neg_weight * mean_{(i,j) in H}(-log(1 - P_ij)),
  the second term dropped when H is empty. Clipped entries get no gradient.

  Args:
    sim: [B, B].

  Returns:
    scalar loss.
  """
  _check_square(sim)
  p = jnp.clip(jax.nn.softmax(scale * sim, axis=-1), clip_eps, 1 - clip_eps)
  loss_pos = -jnp.mean(jnp.log(jnp.diagonal(p)))
  hard = hard_negative_mask(sim, margin)
  n_hard = jnp.sum(hard)
  neg = jnp.sum(jnp.where(hard, -jnp.log1p(-jnp.where(hard, p, 0)), 0))
  loss_neg = jnp.where(n_hard > 0, neg / jnp.maximum(n_hard, 1), 0)
  return pos_weight * loss_pos + neg_weight * loss_neg


def negnce_symmetric(sim: jax.Array, **kwargs) -> jax.Array:
  """L_NegNCE = (NegNCE(S) + NegNCE(S^T)) / 2 (text-to-video and video-to-text)."""
  return 0.5 * (negnce(sim, **kwargs) + negnce(sim.T, **kwargs))


def infonce(sim: jax.Array, scale: float = SCALE) -> jax.Array:
  """One direction of InfoNCE (CLIP4Clip `CrossEn`): mean_i -log_softmax_row(scale * S)_ii."""
  _check_square(sim)
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scale * sim, axis=-1)))


def infonce_symmetric(sim: jax.Array, scale: float = SCALE) -> jax.Array:
  """(InfoNCE(S) + InfoNCE(S^T)) / 2."""
  return 0.5 * (infonce(sim, scale) + infonce(sim.T, scale))


SATURATION_KEY = "saturated"


def saturated_fraction(sim: jax.Array, scale: float = SCALE,
                       clip_eps: float = CLIP_EPS) -> jax.Array:
  """Fraction of queries (rows of S and of S^T) whose scaled softmax is saturated on a wrong match.

  A query is saturated when its positive's probability is at or below `clip_eps` and every entry
  of its row sits at a clip bound (<= eps or >= 1 - eps): NegNCE then clips all of it and gives the
  row no gradient (its loss is -log eps), and InfoNCE is as stuck in practice. A healthy model that
  is confident on the RIGHT match is not counted. Cheap (one softmax of S), not differentiated.

  Args:
    sim: [B, B] similarity matrix (rows = texts, columns = videos, diagonal = positives).

  Returns:
    float32 scalar in [0, 1].
  """
  _check_square(sim)
  s = jax.lax.stop_gradient(sim).astype(jnp.float32)

  def rows(x):
    p = jax.nn.softmax(scale * x, axis=-1)
    at_bound = jnp.all((p <= clip_eps) | (p >= 1 - clip_eps), axis=-1)
    return at_bound & (jnp.diagonal(p) <= clip_eps)

  return 0.5 * (jnp.mean(rows(s)) + jnp.mean(rows(s.T)))
