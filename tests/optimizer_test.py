"""Tests for tvr_jax.optimizer: the optax chain against a hand-written AdamW loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvr_jax import optimizer

CONFIG = dict(groups=[(r"^clip/", 1e-3), (r".*", 1e-2)], b1=0.9, b2=0.98, eps=1e-6,
              weight_decay=0.2, warmup_fraction=0.1, grad_clip_norm=1.0)


def _params():
  rng = np.random.default_rng(0)
  return {
      "clip": {"visual": {"proj": rng.normal(size=(4, 3)).astype(np.float32),
                          "ln_post": {"scale": np.ones(3, np.float32),
                                      "bias": np.zeros(3, np.float32)}},
               "token_embedding": {"embedding": rng.normal(size=(5, 3)).astype(np.float32)},
               "logit_scale": np.float32(math.log(1 / 0.07))},
      "head": {"dense": {"kernel": rng.normal(size=(3, 3)).astype(np.float32),
                         "bias": rng.normal(size=(3,)).astype(np.float32)}},
  }


def _reference(params, grads_seq, total_steps):
  """Plain numpy AdamW with groups, mask, warmup+cosine and global-norm clipping."""
  flat = {k: np.array(v, np.float64) for k, v in _flatten(params).items()}
  m = {k: np.zeros_like(v) for k, v in flat.items()}
  v = {k: np.zeros_like(x) for k, x in flat.items()}
  warm = int(round(0.1 * total_steps))
  for t, grads in enumerate(grads_seq):
    g = {k: np.array(x, np.float64) for k, x in _flatten(grads).items()}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    if norm > 1.0:
      g = {k: x / norm for k, x in g.items()}
    for k in flat:
      peak = 1e-3 if k.startswith("clip/") else 1e-2
      lr = (peak * t / warm if t < warm else
            peak * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total_steps - warm))))
      m[k] = 0.9 * m[k] + 0.1 * g[k]
      v[k] = 0.98 * v[k] + 0.02 * g[k] ** 2
      mh, vh = m[k] / (1 - 0.9 ** (t + 1)), v[k] / (1 - 0.98 ** (t + 1))
      upd = mh / (np.sqrt(vh) + 1e-6)
      decays = k in ("clip/visual/proj", "head/dense/kernel")
      if decays:
        upd = upd + 0.2 * flat[k]
      flat[k] = flat[k] - lr * upd
  return flat


def _flatten(tree):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_chain_matches_numpy_adamw():
  params = _params()
  total = 20
  tx, schedules = optimizer.build(CONFIG, total, params)
  assert set(schedules) == {r"^clip/", r".*"}
  rng = np.random.default_rng(1)
  grads_seq = [jax.tree.map(lambda x: (rng.normal(size=np.shape(x)) * 0.7).astype(np.float32),
                            params)
               for _ in range(12)]
  state = tx.init(params)
  p = jax.tree.map(jnp.asarray, params)
  for g in grads_seq:
    upd, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, upd)
  ref = _reference(params, grads_seq, total)
  for k, x in _flatten(p).items():
    np.testing.assert_allclose(np.asarray(x), ref[k], rtol=2e-5, atol=1e-7, err_msg=k)


def test_decay_mask_excludes_bias_norm_embedding_logit_scale():
  mask = _flatten(optimizer.decay_mask(_params()))
  assert mask == {"clip/visual/proj": True, "clip/visual/ln_post/scale": False,
                  "clip/visual/ln_post/bias": False, "clip/token_embedding/embedding": False,
                  "clip/logit_scale": False, "head/dense/kernel": True, "head/dense/bias": False}


def test_frozen_group_and_unmatched_parameter():
  params = _params()
  tx, _ = optimizer.build(dict(CONFIG, groups=[(r"^clip/", 0.0), (r".*", 1e-2)]), 10, params)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(2):  # step 0 has lr 0 (warmup starts from 0)
    upd, state = tx.update(grads, state, params)
  flat = _flatten(upd)
  assert all(float(jnp.abs(v).max()) == 0 for k, v in flat.items() if k.startswith("clip/"))
  assert float(jnp.abs(flat["head/dense/kernel"]).max()) > 0
  with pytest.raises(ValueError, match="head/dense/.*matches no entry"):
    optimizer.build(dict(CONFIG, groups=[(r"^clip/", 1e-3)]), 10, params)


def test_schedule_warmup_then_cosine():
  s = optimizer.warmup_cosine(1.0, 100, 0.1)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(s(55)), 0.5, rtol=1e-5)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-7)


def test_clamp_logit_scale():
  params = _params()
  params["clip"]["logit_scale"] = np.float32(9.0)
  out = optimizer.clamp_logit_scale(params)
  assert float(out["clip"]["logit_scale"]) == pytest.approx(math.log(100.0))
  np.testing.assert_array_equal(out["head"]["dense"]["kernel"], params["head"]["dense"]["kernel"])
