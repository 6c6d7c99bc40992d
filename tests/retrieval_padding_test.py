"""Padded frames (frame_mask 0) enter the image tower as exact zeros after normalisation.

Batches pad short videos with black uint8 frames, which normalise to -mean/std; CLIP4Clip pads
with zeros after normalisation. The padded tokens are masked out of S but reach the TPM-CL
predictors, so their pixel content must change nothing the loss reads.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvr_jax.models import dmae, tpmcl
from tvr_jax.models.clip import CLIPConfig
from tvr_jax.models.retrieval import RetrievalConfig, RetrievalModel, normalize_frames

CLIP_CFG = CLIPConfig.preset("tiny", embed_dim=64, text_layers=4)
B, L, F = 3, 8, 4
MASK = (np.arange(F)[None] < np.array([F, 2, 1])[:, None]).astype(np.int32)


def _batch(pad_fill):
  """Random real frames; padded frames filled by `pad_fill(rng, shape)` (uint8)."""
  rng = np.random.default_rng(0)
  ids = np.zeros((B, L), np.int32)
  for i in range(B):
    n = 2 + i
    ids[i, 0], ids[i, 1:1 + n], ids[i, 1 + n] = 49406, rng.integers(1, 49000, n), 49407
  frames = rng.integers(0, 256, (B, F, 32, 32, 3), dtype=np.uint8)
  pad = MASK == 0
  frames[pad] = pad_fill(np.random.default_rng(1), frames[pad].shape)
  return dict(text_ids=jnp.asarray(ids), frames=jnp.asarray(frames), frame_mask=jnp.asarray(MASK))


FILLS = {
    "black": lambda rng, shape: np.zeros(shape, np.uint8),  # what the input pipeline writes
    "white": lambda rng, shape: np.full(shape, 255, np.uint8),
    "noise": lambda rng, shape: rng.integers(0, 256, shape, dtype=np.uint8),
}


def _features(model, batch):
  """The loss and every feature it reads, including the TPM-CL intermediates."""
  total, terms = model.loss(batch)
  text = model.encode_text(batch["text_ids"])
  pre = model.frame_tokens(batch["frames"], batch["frame_mask"])
  tokens, _ = model.encode_video(batch["frames"], batch["frame_mask"])
  _, tpm = tpmcl.tpm_loss(text[0], text[1], pre, batch["frame_mask"], model.word_predictor,
                          model.visual_predictor)
  return {"total": total, **terms, "pre_header": pre, "tokens": tokens,
          **{f"tpm:{k}": v for k, v in tpm.items()}}


def test_padded_frame_pixels_change_nothing_the_loss_reads():
  # Zeroing happens before the image tower, so the header kind does not matter; seqTransf also
  # runs the header on TPM-CL's masked tokens.
  model = RetrievalModel(RetrievalConfig(header="seqTransf", max_words=L, max_frames=F),
                         clip_config=CLIP_CFG, rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)

  @jax.jit  # compiled once, run on every fill
  def run(state, batch):
    grads = jax.grad(lambda s: nnx.merge(graph, s).loss(batch)[0])(state)
    return _features(nnx.merge(graph, state), batch), grads

  out = {name: run(state, _batch(fill)) for name, fill in FILLS.items()}
  results = {name: r[0] for name, r in out.items()}
  for name in ("white", "noise"):
    for key, value in results["black"].items():
      np.testing.assert_array_equal(results[name][key], value, err_msg=f"{name}: {key}")
    jax.tree.map(np.testing.assert_array_equal, out[name][1], out["black"][1])

  # The padded frames' tokens are CLIP's encoding of an all-zero normalised frame.
  with jax.default_matmul_precision("highest"):
    zero = np.asarray(dmae.l2_normalize(model.clip.encode_image(jnp.zeros((1, 32, 32, 3)))))
    black = np.asarray(dmae.l2_normalize(model.clip.encode_image(
        normalize_frames(jnp.zeros((1, 32, 32, 3), jnp.uint8)))))
  pre = np.asarray(results["black"]["pre_header"])
  np.testing.assert_allclose(pre[MASK == 0], np.repeat(zero, (MASK == 0).sum(), 0), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(zero - black).max() > 1e-2  # a black uint8 frame is not a zero frame
  # Real frames are untouched: float input already normalised gives the same tokens.
  b = _batch(FILLS["noise"])
  as_float = model.frame_tokens(normalize_frames(b["frames"]), b["frame_mask"])
  np.testing.assert_allclose(as_float, pre, rtol=1e-5, atol=1e-6)


def test_frame_mask_shape_is_checked():
  model = RetrievalModel(RetrievalConfig(max_words=L, max_frames=F), clip_config=CLIP_CFG,
                         rngs=nnx.Rngs(0))
  b = _batch(FILLS["black"])
  with pytest.raises(ValueError, match="frame_mask"):
    model.frame_tokens(b["frames"], b["frame_mask"][:, :2])
