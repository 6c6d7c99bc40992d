"""TPM-CL: weight predictor, adaptive masking and triplet terms against brute-force loops."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvr_jax.models import tpmcl

B, L, NV, D = 3, 6, 4, 8


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_xwp(p, q, k):
  """One sample of XWP written out: mixing, slab LayerNorm, exact GELU, sigmoid, sum-normalise."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  m = np.asarray(p["qk_proj.weight"], np.float64)
  mixed = np.array([[sum(m[n, j] * q[j, c] for j in range(len(q))) for c in range(q.shape[1])]
                    for n in range(len(k))])
  h = np.concatenate([mixed, k], axis=1)
  mean = h.mean()
  var = ((h - mean) ** 2).mean()
  h = (h - mean) / math.sqrt(var + 1e-5) * p["attn_proj.0.weight"] + p["attn_proj.0.bias"]
  w1, w2 = np.asarray(p["attn_proj.1.weight"], np.float64), np.asarray(p["attn_proj.3.weight"])
  u = []
  for n in range(len(k)):
    g = [0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in w1 @ h[n]]
    u.append(1 / (1 + math.exp(-float(w2[0] @ np.array(g)))))
  return np.array(u) / sum(u)


def brute_keep(w, tau=0.6):
  keep = np.ones(len(w), np.int64)
  c = 0.0
  for i in sorted(range(len(w)), key=lambda j: -w[j]):
    c += w[i]
    if c < tau:
      keep[i] = 0
  return keep


def brute_sigma(x, y, mu):
  c = [float(np.dot(x, y[v])) * mu[v] for v in range(len(y))]
  return 0.5 * (max(c) + sum(c) / sum(mu))


def _predictors(seed=0, spread=6.0):
  rngs = nnx.Rngs(seed)
  wp = tpmcl.CrossModalWeightPredictor(NV, L, D, rngs=rngs)
  vp = tpmcl.CrossModalWeightPredictor(1, NV, D, rngs=rngs)
  for mod in (wp, vp):  # spread the weights so that masking has something to choose
    mod.fc2.kernel.set_value(mod.fc2.kernel[...] * spread)
    mod.norm.scale.set_value(mod.norm.scale[...] + 0.2 * jax.random.normal(
        jax.random.key(seed), mod.norm.scale[...].shape))
  return wp, vp


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  s = _unit(rng.normal(size=(B, D))).astype(np.float32)
  w = _unit(rng.normal(size=(B, L, D))).astype(np.float32)
  f = _unit(rng.normal(size=(B, NV, D)) + 0.5).astype(np.float32)
  mv = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.int32)
  return s, w, f, mv


def test_predictor_matches_brute_force():
  wp, vp = _predictors()
  s, w, f, _ = _inputs()
  with jax.default_matmul_precision("highest"):
    a, b = np.asarray(wp(f, w)), np.asarray(vp(s[:, None], f))
  pw = tpmcl.xwp_state_to_torch(nnx.state(wp, nnx.Param))
  pv = tpmcl.xwp_state_to_torch(nnx.state(vp, nnx.Param))
  for i in range(B):
    np.testing.assert_allclose(a[i], brute_xwp(pw, f[i], w[i]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b[i], brute_xwp(pv, s[i][None], f[i]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(a.sum(-1), 1, rtol=1e-6)


def test_adaptive_keep_examples_and_brute_force():
  got = tpmcl.adaptive_keep(jnp.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]]))
  np.testing.assert_array_equal(got, [[0, 1, 1], [1, 0, 1]])
  np.testing.assert_array_equal(tpmcl.adaptive_keep(jnp.array([[0.7, 0.3], [0.3, 0.7]])),
                                [[1, 1], [1, 1]])
  rng = np.random.default_rng(0)
  w = rng.dirichlet(np.full(9, 0.7), size=50).astype(np.float32)
  got = np.asarray(tpmcl.adaptive_keep(jnp.asarray(w)))
  for i in range(len(w)):
    np.testing.assert_array_equal(got[i], brute_keep(w[i].astype(np.float64)))


def test_tpm_loss_matches_brute_force():
  wp, vp = _predictors(1)
  s, w, f, mv = _inputs(1)
  with jax.default_matmul_precision("highest"):
    loss, out = jax.jit(lambda *x: tpmcl.tpm_loss(*x, wp, vp))(s, w, f, mv)
  pw = tpmcl.xwp_state_to_torch(nnx.state(wp, nnx.Param))
  pv = tpmcl.xwp_state_to_torch(nnx.state(vp, nnx.Param))
  want = {k: [] for k in ("T1_x1", "T1_x2", "T2_x1", "T2_x2", "T3_x1", "T3_x2")}
  for i in range(B):
    a = brute_xwp(pw, f[i], w[i])
    b = brute_xwp(pv, s[i][None], f[i])
    wk, vk = brute_keep(a), brute_keep(b)
    np.testing.assert_array_equal(out["word_keep"][i], wk)
    np.testing.assert_array_equal(out["vis_keep"][i], vk)
    tg = a @ w[i]
    tg = tg / np.linalg.norm(tg)
    tgp = (a * wk) @ w[i]
    np.testing.assert_allclose(out["tg"][i], tg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["tgp"][i], tgp, rtol=1e-5, atol=1e-6)
    fp = f[i] * vk[:, None]  # zeroed tokens keep their mask bit
    want["T1_x1"].append(brute_sigma(s[i], f[i], mv[i]))
    want["T1_x2"].append(brute_sigma(s[i], fp, mv[i]))
    want["T2_x1"].append(brute_sigma(tg, f[i], mv[i]))
    want["T2_x2"].append(brute_sigma(tg, fp, mv[i]))
    want["T3_x1"].append(brute_sigma(tg, f[i], mv[i]))
    want["T3_x2"].append(brute_sigma(tgp, f[i], mv[i]))
  total = 0.0
  for t in (1, 2, 3):
    x1, x2 = np.array(want[f"T{t}_x1"]), np.array(want[f"T{t}_x2"])
    np.testing.assert_allclose(out[f"T{t}_x1"], x1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[f"T{t}_x2"], x2, rtol=1e-5, atol=1e-6)
    total += np.mean(np.maximum(0, 0.6 - (x1 - x2)))
  np.testing.assert_allclose(loss, total, rtol=1e-5)


def test_partial_types_select_terms():
  wp, vp = _predictors(2)
  s, w, f, mv = _inputs(2)
  l4, o4 = tpmcl.tpm_loss(s, w, f, mv, wp, vp, partial_type=4)
  l2, o2 = tpmcl.tpm_loss(s, w, f, mv, wp, vp, partial_type=2)
  l3, o3 = tpmcl.tpm_loss(s, w, f, mv, wp, vp, partial_type=3)
  l0, o0 = tpmcl.tpm_loss(s, w, f, mv, wp, vp, partial_type=0)
  np.testing.assert_allclose(l2, o4["T1"] + o4["T2"], rtol=1e-6)
  np.testing.assert_allclose(l3, o4["T3"], rtol=1e-6)
  np.testing.assert_allclose(l4, l2 + l3, rtol=1e-6)
  assert float(l0) == 0 and "T1" not in o0 and "T3" not in o2 and "T1" not in o3
  with pytest.raises(ValueError, match="partial_type"):
    tpmcl.tpm_loss(s, w, f, mv, wp, vp, partial_type=1)


def test_header_applies_to_the_masked_side_only():
  wp, vp = _predictors(3)
  s, w, f, mv = _inputs(3)
  _, plain = tpmcl.tpm_loss(s, w, f, mv, wp, vp)
  _, hdr = tpmcl.tpm_loss(s, w, f, mv, wp, vp, header=lambda x, m: 2 * x)
  for k in ("T1_x1", "T2_x1", "T3_x1", "T3_x2"):
    np.testing.assert_allclose(hdr[k], plain[k], rtol=1e-6)
  np.testing.assert_allclose(hdr["T1_x2"], 2 * plain["T1_x2"], rtol=1e-5)


def _grads(train_t2v):
  wp, vp = _predictors(4)
  s, w, f, mv = _inputs(4)
  gw, pw = nnx.split(wp)
  gv, pv = nnx.split(vp)

  def fn(pw, pv, s):
    return tpmcl.tpm_loss(s, w, f, mv, nnx.merge(gw, pw), nnx.merge(gv, pv),
                          train_t2v_predictor=train_t2v)[0]
  return fn(pw, pv, s), jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(pw, pv, s)


def test_t2v_predictor_gets_no_gradient_unless_asked():
  loss, (g_w, g_v, g_s) = _grads(False)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_v))
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g_w))
  loss_t, (_, g_v_t, _) = _grads(True)
  np.testing.assert_allclose(loss_t, loss, rtol=1e-7)  # same forward value
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g_v_t))


def test_load_torch_names_round_trip_and_errors():
  wp, _ = _predictors(5)
  params = tpmcl.xwp_state_to_torch(nnx.state(wp, nnx.Param))
  fresh = tpmcl.CrossModalWeightPredictor(NV, L, D, rngs=nnx.Rngs(9))
  tpmcl.load_torch_xwp(fresh, {**params, "q_proj.weight": np.zeros((D, D))})
  for k, v in tpmcl.xwp_state_to_torch(nnx.state(fresh, nnx.Param)).items():
    np.testing.assert_array_equal(v, params[k])
  with pytest.raises(KeyError, match="bogus"):
    tpmcl.load_torch_xwp(fresh, {**params, "bogus.weight": np.zeros(1)})
  with pytest.raises(KeyError, match="attn_proj.3.weight"):
    tpmcl.load_torch_xwp(fresh, {k: v for k, v in params.items() if k != "attn_proj.3.weight"})
  with pytest.raises(ValueError, match="qk_proj.weight"):
    tpmcl.load_torch_xwp(fresh, {**params, "qk_proj.weight": np.zeros((NV, L), np.float32)})
  with pytest.raises(ValueError, match="weight predictor built for"):
    fresh(np.zeros((1, NV + 1, D)), np.zeros((1, L, D)))
