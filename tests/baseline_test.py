"""The CLIP4Clip meanP baseline as a model option (`RetrievalConfig.pooled_video`)."""

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from tvr_jax import losses
from tvr_jax.models.clip import CLIPConfig
from tvr_jax.models.retrieval import RetrievalConfig, RetrievalModel

CLIP_CFG = CLIPConfig.preset("tiny")
B, L, F = 3, 8, 5
BASELINE = dict(pooled_video=True, textual_attention=False, visual_attention=False,
                contrastive_loss="infonce", partial_type=0)


def _model(**kw):
  return RetrievalModel(RetrievalConfig(max_words=L, max_frames=F, **kw), clip_config=CLIP_CFG,
                        rngs=nnx.Rngs(0))


def test_pooled_similarity_is_cosine_of_sentence_and_mean_frame():
  rng = np.random.default_rng(0)
  sent = rng.standard_normal((B, 32)).astype(np.float32)
  sent /= np.linalg.norm(sent, axis=-1, keepdims=True)
  tok = rng.standard_normal((4, F, 32)).astype(np.float32)
  tok /= np.linalg.norm(tok, axis=-1, keepdims=True)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], np.int32)
  model = _model(**BASELINE)
  video = model._video_tokens(jnp.asarray(tok), jnp.asarray(mask))
  assert video[0].shape == (4, 1, 32) and video[1].shape == (4, 1)
  words = jnp.zeros((B, L, 32))
  tmask = jnp.ones((B, L), jnp.int32)
  got = np.asarray(model.similarity((jnp.asarray(sent), words, tmask), video))
  want = np.zeros((B, 4))
  for i in range(B):
    for j in range(4):
      v = tok[j][mask[j] > 0].mean(0)
      want[i, j] = sent[i] @ v / np.linalg.norm(v)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Without pooling the same switches give DMAE's sentence branch, a different score.
  unpooled = _model(**dict(BASELINE, pooled_video=False))
  other = np.asarray(unpooled.similarity((jnp.asarray(sent), words, tmask),
                                         (jnp.asarray(tok), jnp.asarray(mask))))
  assert np.abs(other - want).max() > 1e-2


def test_baseline_loss_is_infonce_of_the_pooled_cosine():
  rng = np.random.default_rng(1)
  ids = np.zeros((B, L), np.int32)
  ids[:, 0], ids[:, 1:4], ids[:, 4] = 49406, rng.integers(1, 999, (B, 3)), 49407
  batch = dict(text_ids=jnp.asarray(ids),
               frames=jnp.asarray(rng.integers(0, 256, (B, F, 32, 32, 3), dtype=np.uint8)),
               frame_mask=jnp.ones((B, F), jnp.int32))
  model = _model(**BASELINE)
  total, terms = model.loss(batch)
  assert set(terms) == {"infonce"}
  text = model.encode_text(batch["text_ids"])
  sim = model.similarity(text, model.encode_video(batch["frames"], batch["frame_mask"]))
  assert sim.shape == (B, B)
  assert float(total) == pytest.approx(float(losses.infonce_symmetric(sim)), rel=1e-5)
