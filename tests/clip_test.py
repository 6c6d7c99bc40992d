"""The Flax CLIP module: shapes, sliced-context text encoding vs open_clip, bf16, remat, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import import_open_clip, make_ids
from flax import nnx

from tvr_jax import convert, torch_io
from tvr_jax.models import clip as clip_lib
from tvr_jax.models.clip import CLIP, CLIPConfig, ResidualAttentionBlock




def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def tiny_pair():
  """A tiny random open_clip CLIP (QuickGELU, 2 heads per tower) and the same weights in Flax."""
  import torch
  import_open_clip()
  from open_clip.model import CLIP as TorchCLIP
  torch.manual_seed(0)
  model = TorchCLIP(embed_dim=32, quick_gelu=True,
                    vision_cfg=dict(layers=2, width=64, patch_size=8, image_size=32, head_width=32),
                    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
  model.eval()
  with torch.no_grad():  # non-trivial LayerNorm parameters
    for name, p in model.named_parameters():
      if "ln" in name:
        p.add_(0.1 * torch.randn_like(p))
  ck = torch_io.Checkpoint("<tiny open_clip>", "memory",
                           {k: v.numpy().copy() for k, v in model.state_dict().items()})
  conv = convert.map_checkpoint(ck, vision_heads=2, text_heads=2)
  assert conv.config == CLIPConfig.preset("tiny")
  return model, conv


def test_tiny_preset_shapes():
  config = CLIPConfig.preset("tiny")
  model = CLIP(config, rngs=nnx.Rngs(0))
  images = jnp.zeros((3, 32, 32, 3))
  ids = make_ids(2, 20, seed=0)
  image_features, (sent, tokens, mask), (logits_img, logits_txt) = nnx.jit(
      lambda m: (m.encode_image(images), m.encode_text_tokens(ids), m(images, ids)))(model)
  assert image_features.shape == (3, 32)
  assert sent.shape == (2, 32) and tokens.shape == (2, 20, 32) and mask.shape == (2, 20)
  assert mask.dtype == jnp.int32
  np.testing.assert_array_equal(mask, np.arange(20)[None] <= ids.argmax(-1)[:, None])
  np.testing.assert_array_equal(sent, tokens[np.arange(2), ids.argmax(-1)])
  assert logits_img.shape == (3, 2) and logits_txt.shape == (2, 3)
  assert model.logit_scale[...].shape == () and np.isclose(model.logit_scale[...], np.log(1 / 0.07))
  # Parameters float32, the tree mirrors OpenAI's names.
  flat = clip_lib.flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert {v.dtype for v in flat.values()} == {jnp.dtype("float32")}
  assert flat["visual/conv1/kernel"].shape == (8, 8, 3, 64)
  assert "transformer/resblocks/1/attn/q_proj/kernel" in flat
  with pytest.raises(ValueError, match="NHWC"):
    model.encode_image(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="L <= 77"):
    model.encode_text(jnp.zeros((1, 78), jnp.int32))


def test_config_round_trip_and_presets():
  config = CLIPConfig.preset("ViT-L/14", dtype="bfloat16", remat=True)
  assert (config.vision_width, config.vision_layers, config.patch_size) == (1024, 24, 14)
  assert CLIPConfig.from_dict({**config.to_dict(), "source": "x.pt"}) == config
  assert CLIPConfig.preset("ViT-B/16").grid_size == 14
  with pytest.raises(ValueError, match="unknown CLIP preset"):
    CLIPConfig.preset("RN50")
  with pytest.raises(ValueError, match="dtype"):
    CLIPConfig(dtype="float16")
  with pytest.raises(ValueError, match="cudnn"):
    CLIPConfig(attention_impl="cudnn")
  assert CLIPConfig(attention_impl="cudnn", dtype="bfloat16").attention_impl == "cudnn"


def test_short_context_matches_open_clip(tiny_pair):
  """encode_text on L=32 ids = open_clip's computation with positions/mask sliced to 32."""
  import torch
  model, conv = tiny_pair
  flax_model = clip_lib.clip_from_flat_params(conv.config, conv.params)
  ids = make_ids(4, 32, seed=1)
  with torch.no_grad():
    t = torch.from_numpy(ids.astype(np.int64))
    x = model.token_embedding(t) + model.positional_embedding[:32]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:32, :32]))
    ref_tokens = (x @ model.text_projection).numpy()
  ref_sent = ref_tokens[np.arange(4), ids.argmax(-1)]
  with jax.default_matmul_precision("highest"):
    sent, tokens, sent2, full = nnx.jit(lambda m: (
        *m.encode_text_tokens(ids)[:2], m.encode_text(ids),
        m.encode_text_tokens(np.pad(ids, ((0, 0), (0, 45))))[1]))(flax_model)
  assert rel_err(tokens, ref_tokens) <= 1e-5
  assert rel_err(sent, ref_sent) <= 1e-5
  assert rel_err(sent2, ref_sent) <= 1e-5
  # Causal attention: the first 32 positions of a 77-long input are the same computation.
  assert rel_err(full[:, :32], tokens) <= 1e-5


def test_bfloat16_close_to_float32(tiny_pair):
  _, conv = tiny_pair
  f32 = clip_lib.clip_from_flat_params(conv.config, conv.params)
  bf16 = clip_lib.clip_from_flat_params(conv.config.replace(dtype="bfloat16"), conv.params)
  flat = clip_lib.flatten_params(nnx.to_pure_dict(nnx.state(bf16, nnx.Param)))
  assert {v.dtype for v in flat.values()} == {jnp.dtype("float32")}  # parameters stay float32
  images = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids = make_ids(3, 32, seed=2)
  run = nnx.jit(lambda m: (m.encode_image(images), m.encode_text(ids), m(images, ids)[0]))
  img16, txt16, logits16 = run(bf16)
  img32, txt32, logits32 = run(f32)
  assert img16.dtype == jnp.bfloat16 and txt16.dtype == jnp.bfloat16
  assert rel_err(img16, img32) < 0.05
  assert rel_err(txt16, txt32) < 0.05
  assert rel_err(logits16, logits32) < 0.05


def test_remat_same_outputs_and_gradients(tiny_pair):
  _, conv = tiny_pair
  plain = clip_lib.clip_from_flat_params(conv.config, conv.params)
  remat = clip_lib.clip_from_flat_params(conv.config.replace(remat=True), conv.params)
  images = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids = make_ids(2, 16, seed=3)

  def loss(m):
    logits, _ = m(images, ids)
    return jax.nn.log_softmax(logits).trace() + m.encode_text_tokens(ids)[1].sum()

  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  lp, gp = value_and_grad(plain)
  lr, gr = value_and_grad(remat)
  np.testing.assert_allclose(lr, lp, rtol=1e-6)
  gp = clip_lib.flatten_params(nnx.to_pure_dict(gp))
  gr = clip_lib.flatten_params(nnx.to_pure_dict(gr))
  assert gp.keys() == gr.keys()
  for k in gp:
    np.testing.assert_allclose(gr[k], gp[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert any(np.abs(v).max() > 0 for v in gp.values())


def test_block_masks_match_torch(tiny_pair):
  """A text block with a key padding mask / explicit masks = torch's block with an additive mask."""
  import torch
  model, conv = tiny_pair
  flax_model = clip_lib.clip_from_flat_params(conv.config, conv.params)
  block = flax_model.transformer.resblocks[1]
  assert isinstance(block, ResidualAttentionBlock)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 6, 64)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.int32)
  additive = np.repeat(((1 - valid[:, None, :]) * -1e6).repeat(6, axis=1), 2, axis=0)  # [B*h,T,T]
  causal_add = np.triu(np.full((6, 6), -np.inf, np.float32), 1)
  with torch.no_grad():
    tblock = model.transformer.resblocks[1]
    ref_pad = tblock(torch.from_numpy(x), attn_mask=torch.from_numpy(additive.astype(np.float32)))
    ref_causal = tblock(torch.from_numpy(x), attn_mask=torch.from_numpy(causal_add))
  with jax.default_matmul_precision("highest"):
    got_pad = block(x, key_padding_mask=valid)
    got_pad_explicit = block(x, attn_mask=np.broadcast_to(valid[:, None, :] > 0, (3, 6, 6)))
    got_causal = block(x, causal=True)
    got_causal_explicit = block(x, attn_mask=np.tril(np.ones((6, 6), bool)))
  assert rel_err(got_pad, ref_pad.numpy()) <= 1e-5
  assert rel_err(got_pad_explicit, ref_pad.numpy()) <= 1e-5
  assert rel_err(got_causal, ref_causal.numpy()) <= 1e-5
  assert rel_err(got_causal_explicit, ref_causal.numpy()) <= 1e-5
  # The padding actually matters.
  assert rel_err(block(x), ref_pad.numpy()) > 1e-3


def test_first_token_only_block_equals_full_block_at_position_0(tiny_pair):
  """The vision tower's last-block shortcut: same class-token output, with and without masks."""
  _, conv = tiny_pair
  block = clip_lib.clip_from_flat_params(conv.config, conv.params).visual.transformer.resblocks[1]
  rng = np.random.default_rng(5)
  x = rng.standard_normal((3, 6, 64)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.int32)
  with jax.default_matmul_precision("highest"):
    for kwargs in ({}, {"key_padding_mask": valid},
                   {"attn_mask": (rng.random((3, 6, 6)) > 0.3) | np.eye(6, dtype=bool)}):
      full = block(x, **kwargs)
      first = block(x, first_token_only=True, **kwargs)
      assert first.shape == (3, 1, 64)
      np.testing.assert_allclose(first[:, 0], full[:, 0], rtol=1e-5, atol=1e-6)
  # Position 0 does depend on the other positions (they are its keys and values).
  x2 = x.copy()
  x2[:, 3] += rng.standard_normal((3, 64)).astype(np.float32)  # not a constant: LN removes that
  assert np.abs(np.asarray(block(x2, first_token_only=True) - block(x, first_token_only=True))
                ).max() > 1e-3
  with pytest.raises(ValueError, match="causal"):
    block(x, causal=True, first_token_only=True)


def test_patch_matmul_equals_conv1(tiny_pair):
  """`_embed_patches` (flattened patches @ kernel) = the VALID stride-p convolution it replaces."""
  _, conv = tiny_pair
  visual = clip_lib.clip_from_flat_params(conv.config, conv.params).visual
  images = np.random.default_rng(6).standard_normal((2, 32, 32, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(visual.conv1(images)).reshape(2, -1, 64)
    got = np.asarray(visual._embed_patches(jnp.asarray(images)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
