"""NegNCE and InfoNCE against brute-force loops (float64), corner cases and gradients."""

import math

import jax
import numpy as np
import pytest

from tvr_jax import losses

_NEGNCE = jax.jit(losses.negnce)
_NEGNCE_SYM = jax.jit(losses.negnce_symmetric)
_INFONCE_SYM = jax.jit(losses.infonce_symmetric)


def brute_negnce(sim, scale=100.0):
  sim = np.asarray(sim, np.float64)
  b = len(sim)
  pos, neg, count = 0.0, 0.0, 0
  for i in range(b):
    row = [math.exp(scale * sim[i, j] - scale * sim[i].max()) for j in range(b)]
    total = sum(row)
    p = [min(max(r / total, 1e-6), 1 - 1e-6) for r in row]
    pos += -math.log(p[i])
    for j in range(b):
      if j != i and (sim[i, j] > sim[i, i] or sim[i, j] > sim[j, j]):
        neg += -math.log(1 - p[j])
        count += 1
  loss = pos / b
  if count:
    loss += 0.5 * neg / count
  return loss


def brute_infonce(sim, scale=100.0):
  sim = np.asarray(sim, np.float64)
  out = 0.0
  for i in range(len(sim)):
    m = max(scale * sim[i])
    lse = m + math.log(sum(math.exp(scale * x - m) for x in sim[i]))
    out += lse - scale * sim[i, i]
  return out / len(sim)


def _random_sim(seed, b=6, spread=0.015):
  """Random S with hard negatives; used entries stay away from the clip (float32-conditioned)."""
  rng = np.random.default_rng(seed)
  sim = 0.3 + spread * rng.normal(size=(b, b))
  sim[np.arange(b), np.arange(b)] += 0.01
  p = np.exp(100 * sim - 100 * sim.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  assert np.all(1 - p[~np.eye(b, dtype=bool)] > 1e-2) and np.all(np.diag(p) > 1e-4)
  return sim.astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_negnce_matches_brute_force(seed):
  sim = _random_sim(seed)
  assert np.any(np.asarray(losses.hard_negative_mask(sim)))
  np.testing.assert_allclose(_NEGNCE(sim), brute_negnce(sim), rtol=2e-5)
  np.testing.assert_allclose(_NEGNCE(sim.T), brute_negnce(sim.T), rtol=2e-5)
  np.testing.assert_allclose(_NEGNCE_SYM(sim),
                             0.5 * (brute_negnce(sim) + brute_negnce(sim.T)), rtol=2e-5)
  np.testing.assert_allclose(_INFONCE_SYM(sim),
                             0.5 * (brute_infonce(sim) + brute_infonce(sim.T)), rtol=2e-5)


def test_hard_negative_set_rule():
  sim = np.array([[0.5, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.65, 0.3]], np.float32)
  # (0,1): S01 > S00; (2,1): S21 = .65 > S22; (1,0)? S10 = .2 < S11 and < S00 -> no;
  # (0,2)? .1 < .5 and < .3 -> no; column rule alone: (1,2)? S12=.1 no. (2,0)? .1 no.
  want = np.zeros((3, 3), bool)
  want[0, 1] = want[2, 1] = True
  np.testing.assert_array_equal(losses.hard_negative_mask(sim), want)
  # Column-only hard negative: S_ij > S_jj but not > S_ii.
  sim2 = np.array([[0.9, 0.5], [0.1, 0.4]], np.float32)
  np.testing.assert_array_equal(losses.hard_negative_mask(sim2), [[False, True], [False, False]])


def test_empty_hard_set_gives_positive_term_only():
  sim = np.eye(4, dtype=np.float32) * 0.05 + 0.1
  assert not np.any(np.asarray(losses.hard_negative_mask(sim)))
  p_diag = 1 / (1 + 3 * math.exp(-5.0))
  np.testing.assert_allclose(_NEGNCE(sim), -math.log(p_diag), rtol=1e-5)


def test_clipped_entries_get_no_gradient():
  # Row 0 is certain (P_00 clipped at 1 - 1e-6); row 1 is not.
  sim = np.array([[0.9, 0.1, 0.1], [0.3, 0.32, 0.31], [0.2, 0.25, 0.3]], np.float32)
  g = np.asarray(jax.grad(losses.negnce)(sim))
  assert np.all(g[0] == 0)
  assert np.any(g[1] != 0)


def test_gradient_matches_finite_differences():
  sim = _random_sim(7, b=4).astype(np.float64)
  g = np.asarray(jax.jit(jax.grad(losses.negnce_symmetric))(sim.astype(np.float32)))
  eps = 1e-4
  num = np.zeros_like(sim)
  for i in range(4):
    for j in range(4):
      up, dn = sim.copy(), sim.copy()
      up[i, j] += eps
      dn[i, j] -= eps
      num[i, j] = (0.5 * (brute_negnce(up) + brute_negnce(up.T)) -
                   0.5 * (brute_negnce(dn) + brute_negnce(dn.T))) / (2 * eps)
  np.testing.assert_allclose(g, num, atol=2e-3 * np.abs(num).max())


def test_rejects_non_square():
  with pytest.raises(ValueError, match="square"):
    losses.negnce(np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="square"):
    losses.infonce(np.zeros((3,), np.float32))
