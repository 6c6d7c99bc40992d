"""DMAE similarity against a brute-force Python-loop implementation of docs/method.md §3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tvr_jax.models import dmae

_SIM = jax.jit(dmae.dmae_similarity,
               static_argnames=("textual_attention", "visual_attention", "normalize"))


def _brute_interaction(x, mx, y, my, visual_attention, tw=None, vw=None):
  """sim(X, Y) for ONE text token set and ONE video token set, written as loops (float64)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  nt, nv = len(x), len(y)
  s = np.zeros((nt, nv))
  for t in range(nt):
    for v in range(nv):
      s[t, v] = float(x[t] @ y[v]) * min(mx[t], 1) * my[v]
  t2v = np.array([max(s[t]) for t in range(nt)])
  if visual_attention:
    a = np.zeros((nv, nv))
    for v in range(nv):
      for w in range(nv):
        if v != w:
          a[v, w] = float(y[v] @ y[w]) * my[v] * my[w]
    for t in range(nt):
      best = int(np.argmax(s[t]))  # first maximum, as jnp.argmax
      second = int(np.argmax(a[best]))
      t2v[t] += 0.5 * a[best, second] * s[t, second]
  v2t = np.array([max(s[:, v]) for v in range(nv)])
  tsum, vsum = float(sum(mx)), float(sum(my))
  total_t = 0.0
  for t in range(nt):
    weight = mx[t] * tw[t] if tw is not None else (mx[t] / tsum if tsum else 0.0)
    total_t += weight * t2v[t]
  total_v = 0.0
  for v in range(nv):
    weight = my[v] * vw[v] if vw is not None else (my[v] / vsum if vsum else 0.0)
    total_v += weight * v2t[v]
  return 0.5 * (total_t + total_v)


def brute_similarity(sent, words, tmask, frames, vmask, textual_attention, visual_attention,
                     word_w=None, frame_w=None):
  """S[a, b] by loops over texts and videos (inputs already normalised)."""
  bt, bv = len(sent), len(frames)
  out = np.zeros((bt, bv))
  for a in range(bt):
    for b in range(bv):
      fw = None if frame_w is None else frame_w[b]
      sim = _brute_interaction(sent[a][None], [min(tmask[a][0], 1)], frames[b], vmask[b],
                               visual_attention, None if word_w is None else [1.0], fw)
      if textual_attention:
        ww = None if word_w is None else word_w[a]
        sim = 0.5 * (sim + _brute_interaction(words[a], tmask[a], frames[b], vmask[b],
                                              visual_attention, ww, fw))
      out[a, b] = sim
  return out


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(seed, bt=5, bv=4, num_words=6, num_frames=4, dim=8):
  """Random features with the corner cases: SOT+EOT-only text, single-token text, all-padded text,
  keyword entries, single-frame video, all-padded video, full rows."""
  rng = np.random.default_rng(seed)
  sent = _unit(rng.normal(size=(bt, dim))).astype(np.float32)
  words = _unit(rng.normal(size=(bt, num_words, dim))).astype(np.float32)
  frames = _unit(rng.normal(size=(bv, num_frames, dim))).astype(np.float32)
  lengths = [num_words, 2, 1, 0] + list(rng.integers(1, num_words + 1, max(0, bt - 4)))
  tmask = (np.arange(num_words)[None] < np.array(lengths[:bt])[:, None]).astype(np.int32)
  tmask[0, 1:num_words - 1:2] = 2  # keywords inside the first text
  flen = [num_frames, 1, 0] + list(rng.integers(1, num_frames + 1, max(0, bv - 3)))
  vmask = (np.arange(num_frames)[None] < np.array(flen[:bv])[:, None]).astype(np.int32)
  return sent, words, tmask, frames, vmask


@pytest.mark.parametrize("textual_attention", [False, True])
@pytest.mark.parametrize("visual_attention", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(seed, textual_attention, visual_attention):
  sent, words, tmask, frames, vmask = make_inputs(seed)
  with jax.default_matmul_precision("highest"):
    got = _SIM(sent, words, tmask, frames, vmask, normalize=False,
                               textual_attention=textual_attention,
                               visual_attention=visual_attention)
  want = brute_similarity(sent, words, tmask, frames, vmask, textual_attention, visual_attention)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_single_token_and_single_frame_shapes():
  """L = 1 and N_v = 1 (one token per text, one frame per video)."""
  sent, words, tmask, frames, vmask = make_inputs(3, num_words=1, num_frames=1)
  tmask = np.maximum(tmask, 1)
  vmask = np.maximum(vmask, 1)
  with jax.default_matmul_precision("highest"):
    got = _SIM(sent, words, tmask, frames, vmask, normalize=False)
  want = brute_similarity(sent, words, tmask, frames, vmask, True, True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_token_weights_match_brute_force():
  sent, words, tmask, frames, vmask = make_inputs(4)
  tw_module = dmae.TokenWeights(words.shape[-1], rngs=nnx.Rngs(1))
  with jax.default_matmul_precision("highest"):
    ww, fw = tw_module(words, tmask, frames, vmask)
    got = _SIM(sent, words, tmask, frames, vmask, normalize=False,
                               word_weights=ww, frame_weights=fw)
  ww, fw = np.asarray(ww), np.asarray(fw)
  # Masked softmax: rows with real tokens sum to 1, padding gets 0, all-padded rows are all 0.
  np.testing.assert_allclose(ww.sum(-1), (tmask.sum(-1) > 0).astype(float), atol=1e-6)
  assert np.all(ww[tmask == 0] == 0) and np.all(fw[vmask == 0] == 0)
  want = brute_similarity(sent, words, tmask, frames, vmask, True, True, ww, fw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_keyword_weight_only_in_word_branch():
  sent, words, tmask, frames, vmask = make_inputs(5)
  kw = tmask.copy()
  kw[1, 1] = 2  # the SOT+EOT text: its EOT becomes a keyword
  with jax.default_matmul_precision("highest"):
    plain_ti = _SIM(sent, words, tmask, frames, vmask, textual_attention=False)
    kw_ti = _SIM(sent, words, kw, frames, vmask, textual_attention=False)
    plain = _SIM(sent, words, tmask, frames, vmask)
    kwd = _SIM(sent, words, kw, frames, vmask)
  np.testing.assert_array_equal(plain_ti, kw_ti)  # sentence branch ignores keyword weights
  assert np.any(np.abs(np.asarray(plain) - np.asarray(kwd))[1] > 1e-6)
  np.testing.assert_array_equal(np.asarray(plain)[2:], np.asarray(kwd)[2:])


def test_normalize_inside_and_gradient_through_values():
  """normalize=True equals normalising first; gradients are finite with padded rows present."""
  sent, words, tmask, frames, vmask = make_inputs(6)
  scale = np.random.default_rng(0).uniform(0.5, 3, size=(words.shape[0], words.shape[1], 1))
  with jax.default_matmul_precision("highest"):
    a = _SIM(3 * sent, words * scale, tmask, 2 * frames, vmask)
    b = _SIM(sent, words, tmask, frames, vmask, normalize=False)
    def total(s, w, f):
      return jnp.sum(dmae.dmae_similarity(s, w, tmask, f, vmask))
    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(sent, words, frames)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  for g in grads:
    assert np.all(np.isfinite(g))
  # Padded words never reach S (mask 0), so they get no gradient through it.
  assert np.all(np.asarray(grads[1])[tmask == 0] == 0)
  assert np.any(np.asarray(grads[2]) != 0)


def test_frame_neighbours_zero_diagonal_and_masked():
  _, _, _, frames, vmask = make_inputs(7)
  idx, w = dmae.frame_neighbours(frames, vmask)
  idx, w = np.asarray(idx), np.asarray(w)
  for b in range(len(frames)):
    real = np.flatnonzero(vmask[b])
    for v in range(frames.shape[1]):
      assert w[b, v] >= 0  # the zeroed diagonal (and masked frames) take part in the max
      if v not in real or idx[b, v] == v:
        assert w[b, v] == 0
      else:
        assert idx[b, v] in real
