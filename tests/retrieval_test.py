"""The retrieval model on a tiny CLIP: loss terms, gradients, compile-once, initialisation."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvr_jax import losses
from tvr_jax.models import dmae
from tvr_jax.models.clip import CLIPConfig
from tvr_jax.models.retrieval import (CLIP_MEAN, CLIP_STD, RetrievalConfig, RetrievalModel,
                                      normalize_frames)

# Header width = CLIP text width (seqTransf copies text blocks), 4 text blocks to copy.
CLIP_CFG = CLIPConfig.preset("tiny", embed_dim=64, text_layers=4)
B, L, F = 4, 8, 3


def _batch(seed):
  rng = np.random.default_rng(seed)
  ids = np.zeros((B, L), np.int32)
  for i in range(B):
    n = 1 + i % (L - 2)
    ids[i, 0], ids[i, 1:1 + n], ids[i, 1 + n] = 49406, rng.integers(1, 49000, n), 49407
  frames = rng.integers(0, 256, (B, F, 32, 32, 3), dtype=np.uint8)
  frame_mask = (np.arange(F)[None] < np.array([F, 2, 1, F])[:, None]).astype(np.int32)
  return dict(text_ids=jnp.asarray(ids), frames=jnp.asarray(frames),
              frame_mask=jnp.asarray(frame_mask))


def _model(**kw):
  return RetrievalModel(RetrievalConfig(max_words=L, max_frames=F, **kw), clip_config=CLIP_CFG,
                        rngs=nnx.Rngs(0))


def _leaves(state, prefix):
  return [np.asarray(v[...]) for p, v in nnx.to_flat_state(state) if p[0] == prefix]


def test_loss_gradients_and_single_compilation():
  model = _model()
  graph, state = nnx.split(model)

  @jax.jit
  def step(state, batch):
    def loss_fn(state):
      return nnx.merge(graph, state).loss(batch)
    return jax.value_and_grad(loss_fn, has_aux=True)(state)

  (total, terms), grads = step(state, _batch(0))
  assert set(terms) == {"negnce", "tpm", "tpm/T1", "tpm/T2", "tpm/T3"}
  assert np.isfinite(float(total))
  np.testing.assert_allclose(total, terms["negnce"] + terms["tpm"], rtol=1e-6)
  np.testing.assert_allclose(terms["tpm"], terms["tpm/T1"] + terms["tpm/T2"] + terms["tpm/T3"],
                             rtol=1e-6)
  grads = nnx.State(grads) if not isinstance(grads, nnx.State) else grads
  assert all(np.all(g == 0) for g in _leaves(grads, "visual_predictor"))  # release behaviour
  assert any(np.any(g != 0) for g in _leaves(grads, "word_predictor"))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  clip_grads = nnx.to_flat_state(grads)
  for tower in ("visual", "transformer"):
    assert any(np.any(np.asarray(v[...]) != 0) for p, v in clip_grads
               if p[0] == "clip" and p[1] == tower)
  # New batch values, same shapes: no recompilation.
  step(state, _batch(1))
  step(state, _batch(2))
  assert step._cache_size() == 1


def test_forward_matches_pieces_and_compiles_once():
  model = _model()
  graph, state = nnx.split(model)

  @jax.jit
  def forward(state, batch):
    m = nnx.merge(graph, state)
    text = m.encode_text(batch["text_ids"])
    video = m.encode_video(batch["frames"], batch["frame_mask"])
    return m.similarity(text, video), text, video

  batch = _batch(3)
  sim, (sent, words, tmask), (tokens, vmask) = forward(state, batch)
  assert sim.shape == (B, B)
  np.testing.assert_allclose(np.linalg.norm(sent, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1, rtol=1e-5)  # meanP
  lengths = np.argmax(np.asarray(batch["text_ids"]), axis=-1) + 1
  np.testing.assert_array_equal(np.asarray(tmask).sum(-1), lengths)
  want = dmae.dmae_similarity(sent, words, tmask, tokens, vmask, normalize=False)
  np.testing.assert_allclose(sim, want, rtol=1e-5, atol=1e-6)
  forward(state, _batch(4))
  assert forward._cache_size() == 1


@pytest.fixture(scope="module")
def seq_model():
  """seqTransf + wti + InfoNCE + TPM type 2: one model for the tests that only read it."""
  return _model(header="seqTransf", contrastive_loss="infonce", partial_type=2,
                token_weights=True)


def test_seqtransf_model_initialised_from_text_blocks(seq_model):
  model = seq_model
  np.testing.assert_array_equal(model.header.frame_position_embeddings[...],
                                model.clip.positional_embedding[...])
  for i, block in enumerate(model.header.resblocks):
    src = dict(nnx.to_flat_state(nnx.state(model.clip.transformer.resblocks[i], nnx.Param)))
    for path, leaf in nnx.to_flat_state(nnx.state(block, nnx.Param)):
      np.testing.assert_array_equal(leaf[...], src[path][...])
  total, terms = jax.jit(lambda m, b: m.loss(b))(model, _batch(5))
  assert set(terms) == {"infonce", "tpm", "tpm/T1", "tpm/T2"}
  np.testing.assert_allclose(total, terms["infonce"] + terms["tpm"], rtol=1e-6)


def test_new_module_names_follow_the_weight_decay_rules(seq_model):
  """Norms, biases, embeddings of new modules are named so no decay applies (docs/method.md §6)."""
  from tvr_jax import optimizer, sharding
  mask = optimizer.decay_mask(nnx.state(seq_model, nnx.Param))
  decayed = {sharding.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]
             if not sharding.path_str(p).startswith("clip/")}
  assert not decayed["header/frame_position_embeddings"]
  for name in ("word_predictor", "visual_predictor"):
    assert not decayed[f"{name}/norm/scale"] and not decayed[f"{name}/norm/bias"]
    assert decayed[f"{name}/qk_proj"] and decayed[f"{name}/fc1/kernel"]
  assert not decayed["token_weights/text_fc/bias"] and decayed["token_weights/text_fc/kernel"]
  assert not decayed["header/resblocks/0/ln_1/scale"]
  assert decayed["header/resblocks/0/mlp/c_fc/kernel"]


def test_partial_off_has_no_predictors_and_plain_infonce():
  model = _model(contrastive_loss="infonce", partial_type=0, visual_attention=False)
  assert model.word_predictor is None and model.visual_predictor is None
  batch = _batch(6)

  @jax.jit
  def run(m, b):
    text = m.encode_text(b["text_ids"])
    sim = m.similarity(text, m.encode_video(b["frames"], b["frame_mask"]))
    return m.loss(b), losses.infonce_symmetric(sim)
  (total, terms), want = run(model, batch)
  assert set(terms) == {"infonce"}
  np.testing.assert_allclose(total, want, rtol=1e-6)


def test_normalize_frames():
  frames = np.array([[[0, 128, 255]]], np.uint8)
  got = np.asarray(normalize_frames(jnp.asarray(frames)))
  want = (np.array([0, 128, 255]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)
  with pytest.raises(ValueError, match="RGB"):
    normalize_frames(jnp.zeros((2, 4), jnp.uint8))


def test_keyword_mask_and_config_errors():
  model = _model(keyword_weighting=True, partial_type=0)
  ids = _batch(7)["text_ids"]
  kw = np.zeros((B, L), np.int32)
  kw[0, 1] = 1
  kw[0, L - 1] = 1  # beyond EOT: padding stays 0
  _, _, mask = model.encode_text(ids, jnp.asarray(kw))
  assert int(mask[0, 1]) == 2 and int(mask[0, L - 1]) == 0
  with pytest.raises(ValueError, match="keyword_mask"):
    model.encode_text(ids)
  with pytest.raises(ValueError, match="max_words"):
    model.encode_text(ids[:, :-1])
  with pytest.raises(ValueError, match="unknown RetrievalConfig"):
    RetrievalConfig.from_dict({"headers": "meanP"})
  with pytest.raises(ValueError, match="contrastive_loss"):
    RetrievalConfig(contrastive_loss="triplet")
  with pytest.raises(ValueError, match="partial_type"):
    RetrievalConfig(partial_type=1)
  assert RetrievalConfig.from_dict(RetrievalConfig().to_dict()) == RetrievalConfig()


def test_from_pretrained_uses_the_converted_clip(seq_model, tmp_path):
  """A converted checkpoint directory (clip_config.json + Orbax params) initialises the model."""
  import json
  from tvr_jax import checkpointing
  from tvr_jax.models import clip as clip_lib
  clip = seq_model.clip
  with open(tmp_path / clip_lib.CONFIG_FILE, "w") as f:
    json.dump(clip.config.to_dict(), f)
  checkpointing.save_pytree(str(tmp_path / clip_lib.PARAMS_DIR),
                            nnx.to_pure_dict(nnx.state(clip, nnx.Param)))
  model = RetrievalModel.from_pretrained(seq_model.config, str(tmp_path), rngs=nnx.Rngs(5))
  want = dict(nnx.to_flat_state(nnx.state(clip, nnx.Param)))
  got = nnx.to_flat_state(nnx.state(model.clip, nnx.Param))
  assert len(got) == len(want)
  for path, leaf in got:
    np.testing.assert_array_equal(leaf[...], want[path][...], err_msg=str(path))
  # seqTransf starts from the loaded CLIP's text blocks.
  np.testing.assert_array_equal(model.header.resblocks[3].mlp.c_fc.kernel[...],
                                clip.transformer.resblocks[3].mlp.c_fc.kernel[...])
