"""Chunked, memory-bounded scoring equals the unchunked DMAE similarity and compiles once."""

import jax
import numpy as np
import pytest

from tvr_jax import scoring
from tvr_jax.models import dmae

NT, NV, L, T, D = 37, 11, 6, 4, 8


def _features(seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  sent, words = unit(rng.normal(size=(NT, D))), unit(rng.normal(size=(NT, L, D)))
  tmask = (np.arange(L)[None] < rng.integers(2, L + 1, NT)[:, None]).astype(np.int32)
  tmask[3, 2] = 2  # a keyword
  tokens = unit(rng.normal(size=(NV, T, D)))
  vmask = (np.arange(T)[None] < rng.integers(1, T + 1, NV)[:, None]).astype(np.int32)
  return (sent, words, tmask), (tokens, vmask)


def _full(text, video, **kw):
  with jax.default_matmul_precision("highest"):
    return np.asarray(dmae.dmae_similarity(*text, *video, normalize=False, **kw))


@pytest.mark.parametrize("budget", [3_000, 12_000, 40_000, 1 << 30])
def test_chunked_equals_unchunked(budget):
  text, video = _features()
  scorer = scoring.ChunkedScorer(budget, show_progress=False)
  with jax.default_matmul_precision("highest"):
    got = scorer(text, video)
  plan = scorer.plan
  assert plan.total_bytes <= budget
  if budget < (1 << 30):  # small budgets really chunk, with a ragged last block
    assert plan.text_chunk < NT
    assert NT % plan.text_chunk or NV % plan.video_chunk
  np.testing.assert_allclose(got, _full(text, video), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("textual_attention,visual_attention", [(False, True), (True, False)])
def test_switches_pass_through(textual_attention, visual_attention):
  text, video = _features(1)
  kw = dict(textual_attention=textual_attention, visual_attention=visual_attention)
  with jax.default_matmul_precision("highest"):
    got = scoring.score(text, video, budget_bytes=20_000, show_progress=False, **kw)
  np.testing.assert_allclose(got, _full(text, video, **kw), rtol=1e-6, atol=1e-6)


def test_token_weights_path():
  text, video = _features(2)
  rng = np.random.default_rng(0)
  ww = rng.dirichlet(np.ones(L), NT).astype(np.float32)
  fw = rng.dirichlet(np.ones(T), NV).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = scoring.score(text, video, budget_bytes=20_000, word_weights=ww, frame_weights=fw,
                        show_progress=False)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(dmae.dmae_similarity(*text, *video, normalize=False, word_weights=ww,
                                           frame_weights=fw))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="both"):
    scoring.score(text, video, word_weights=ww, show_progress=False)


def test_score_model_matches_model_similarity():
  """The model's switches and its learned "wti" token weights reach the chunked scorer."""
  from flax import nnx
  from tvr_jax.models.clip import CLIPConfig
  from tvr_jax.models.retrieval import RetrievalConfig, RetrievalModel
  model = RetrievalModel(
      RetrievalConfig(token_weights=True, partial_type=0, max_words=L, max_frames=T,
                      visual_attention=False),
      clip_config=CLIPConfig.preset("tiny", embed_dim=D), rngs=nnx.Rngs(0))
  text, video = _features(6)
  with jax.default_matmul_precision("highest"):
    got = scoring.score_model(model, text, video, budget_bytes=20_000, show_progress=False,
                              rows_per_call=16)
    want = np.asarray(model.similarity(text, video))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_compiles_once_for_fixed_shapes():
  text, video = _features(3)
  scorer = scoring.ChunkedScorer(40_000, show_progress=False)
  scorer(text, video)
  n = scorer.compilations
  text2, video2 = _features(4)
  with jax.log_compiles():  # no new compilation for the same shapes, every block reused
    scorer(text2, video2)
  assert scorer.compilations == n
  assert scorer._jitted._cache_size() == 0  # blocks run through the AOT-compiled executable


def test_bad_shapes_are_reported():
  text, video = _features(5)
  with pytest.raises(ValueError, match="inconsistent feature shapes"):
    scoring.score((text[0], text[1], text[2][:, :-1]), video, show_progress=False)
  with pytest.raises(ValueError, match="budget"):
    scoring.ChunkedScorer(0)
  assert scoring.score((text[0][:0], text[1][:0], text[2][:0]), video,
                       show_progress=False).shape == (0, NV)
