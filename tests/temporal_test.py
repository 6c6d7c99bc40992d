"""Temporal header: meanP identity, seqTransf initialisation from CLIP and a PyTorch reference."""

from flax import nnx
import jax
import numpy as np
import pytest
import torch

from tvr_jax.models.clip import CLIP, CLIPConfig
from tvr_jax.models.temporal import TemporalHeader

CFG = CLIPConfig.preset("tiny", embed_dim=64, text_layers=5)


@pytest.fixture(scope="module")
def clip():
  return CLIP(CFG, rngs=nnx.Rngs(0))


def _inputs(b=3, f=5, d=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, f, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  mask = (np.arange(f)[None] < np.array([f, 2, 1])[:, None]).astype(np.int32)
  return x, mask


def test_meanp_is_identity():
  header = TemporalHeader("meanP", 64, rngs=nnx.Rngs(0))
  x, mask = _inputs()
  np.testing.assert_array_equal(header(x, mask), x)
  assert not jax.tree.leaves(nnx.state(header, nnx.Param))


def test_seqtransf_copies_clip_text_blocks(clip):
  header = TemporalHeader("seqTransf", 64, heads=CFG.text_heads, rngs=nnx.Rngs(1))
  header.init_from_clip(clip)
  np.testing.assert_array_equal(header.frame_position_embeddings[...],
                                clip.positional_embedding[...])
  assert len(header.resblocks) == 4
  for i, block in enumerate(header.resblocks):
    mine = nnx.to_flat_state(nnx.state(block, nnx.Param))
    theirs = dict(nnx.to_flat_state(nnx.state(clip.transformer.resblocks[i], nnx.Param)))
    assert len(mine) == len(theirs) > 0
    for path, leaf in mine:
      np.testing.assert_array_equal(leaf[...], theirs[path][...], err_msg=f"block {i} {path}")
  # Independent copies: changing the header leaves CLIP alone.
  before = np.asarray(clip.transformer.resblocks[0].ln_1.scale[...]).copy()
  header.resblocks[0].ln_1.scale.set_value(header.resblocks[0].ln_1.scale[...] + 1)
  np.testing.assert_array_equal(clip.transformer.resblocks[0].ln_1.scale[...], before)


def _torch_reference(header, x, mask, *, eps=1e-12, gelu=False, heads=CFG.text_heads):
  """CLIP4Clip's seqTransf in PyTorch (nn.MultiheadAttention, additive -1e6 key mask).

  Its LayerNorms are BERT-style (eps 1e-12); the MLP activation is QuickGELU or, with `gelu`,
  torch's exact `nn.GELU()`.
  """
  d = x.shape[-1]
  out = torch.tensor(x) + torch.tensor(np.asarray(header.frame_position_embeddings[...]))[
      :x.shape[1]][None]
  ext = (1.0 - torch.tensor(mask, dtype=torch.float32))[:, None, :] * -1000000.0
  ext = ext.expand(-1, x.shape[1], -1).repeat_interleave(heads, dim=0)
  t = lambda a: torch.tensor(np.asarray(a))
  h = out.permute(1, 0, 2)
  for block in header.resblocks:
    mha = torch.nn.MultiheadAttention(d, heads)
    a = block.attn
    with torch.no_grad():
      mha.in_proj_weight.copy_(torch.cat([t(a.q_proj.kernel[...]).T, t(a.k_proj.kernel[...]).T,
                                          t(a.v_proj.kernel[...]).T]))
      mha.in_proj_bias.copy_(torch.cat([t(a.q_proj.bias[...]), t(a.k_proj.bias[...]),
                                        t(a.v_proj.bias[...])]))
      mha.out_proj.weight.copy_(t(a.out_proj.kernel[...]).T)
      mha.out_proj.bias.copy_(t(a.out_proj.bias[...]))
    ln = lambda y, m: torch.nn.functional.layer_norm(y, (d,), t(m.scale[...]), t(m.bias[...]),
                                                     eps)
    lin = lambda y, m: y @ t(m.kernel[...]) + t(m.bias[...])
    with torch.no_grad():
      h = h + mha(ln(h, block.ln_1), ln(h, block.ln_1), ln(h, block.ln_1), need_weights=False,
                  attn_mask=ext)[0]
      z = lin(ln(h, block.ln_2), block.mlp.c_fc)
      act = torch.nn.GELU()(z) if gelu else z * torch.sigmoid(1.702 * z)
      h = h + lin(act, block.mlp.c_proj)
  return (h.permute(1, 0, 2) + torch.tensor(x)).numpy()


def test_seqtransf_matches_torch_reference(clip):
  header = TemporalHeader("seqTransf", 64, heads=CFG.text_heads, rngs=nnx.Rngs(2))
  header.init_from_clip(clip)
  x, mask = _inputs()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(header(x, mask))
  np.testing.assert_allclose(got, _torch_reference(header, x, mask), rtol=1e-4, atol=1e-5)
  # Padded frames are masked as keys: changing them does not move the real frames' outputs.
  x2 = x.copy()
  x2[mask == 0] = 5.0
  with jax.default_matmul_precision("highest"):
    got2 = np.asarray(header(x2, mask))
  np.testing.assert_allclose(got2[mask == 1], got[mask == 1], rtol=1e-5, atol=1e-6)


def test_renormalize_flag_and_errors(clip):
  header = TemporalHeader("seqTransf", 64, heads=CFG.text_heads, renormalize=True,
                          rngs=nnx.Rngs(3))
  x, mask = _inputs()
  np.testing.assert_allclose(np.linalg.norm(header(x, mask), axis=-1), 1, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown temporal header"):
    TemporalHeader("seqLSTM", 64, rngs=nnx.Rngs(0))
  # Shapes that cannot take CLIP's text tower keep their own initialisation (no error).
  for header in (TemporalHeader("seqTransf", 32, heads=2, rngs=nnx.Rngs(0)),
                 TemporalHeader("seqTransf", 64, heads=2, layers=6, rngs=nnx.Rngs(0))):
    before = np.asarray(header.frame_position_embeddings[...]).copy()
    assert header.init_from_clip(clip) == "scratch"
    np.testing.assert_array_equal(np.asarray(header.frame_position_embeddings[...]), before)


def test_seqtransf_layernorm_epsilon_is_the_releases(clip):
  """The header's own LayerNorms use eps 1e-12 (release), CLIP's keep 1e-5.

  Small inputs make the epsilon matter: tokens of norm 1e-3 plus CLIP's 0.01-scale position table
  give a LayerNorm variance near 1e-4, where eps 1e-5 moves the output by several percent.
  """
  header = TemporalHeader("seqTransf", 64, heads=CFG.text_heads, rngs=nnx.Rngs(4))
  header.init_from_clip(clip)
  x, mask = _inputs(seed=5)
  x = 1e-3 * x
  with jax.default_matmul_precision("highest"):
    got = np.asarray(header(x, mask))
  want = _torch_reference(header, x, mask, eps=1e-12)
  clip_eps = _torch_reference(header, x, mask, eps=1e-5)
  err = np.abs(got - want).max() / np.abs(want).max()
  clip_eps_err = np.abs(clip_eps - want).max() / np.abs(want).max()
  assert err < 1e-5 and clip_eps_err > 1e-2, (err, clip_eps_err)  # eps 1e-5 would fail
  assert all(b.ln_1.eps == b.ln_2.eps == 1e-12 for b in header.resblocks)
  assert all(b.ln_1.eps == b.ln_2.eps == 1e-5 for b in clip.transformer.resblocks)
  assert clip.ln_final.eps == clip.visual.ln_post.eps == 1e-5


def test_seqtransf_uses_the_clips_activation():
  """A GELU CLIP gives a GELU header (checked against torch's nn.GELU); a mismatch is refused."""
  from tvr_jax.models.retrieval import RetrievalConfig, RetrievalModel
  gelu_clip = CLIP(CFG.replace(activation="gelu"), rngs=nnx.Rngs(6))
  header = TemporalHeader("seqTransf", 64, heads=CFG.text_heads, activation="gelu",
                          rngs=nnx.Rngs(7))
  header.init_from_clip(gelu_clip)
  x, mask = _inputs(seed=8)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(header(x, mask))
  np.testing.assert_allclose(got, _torch_reference(header, x, mask, gelu=True), rtol=1e-4,
                             atol=1e-5)
  quick = _torch_reference(header, x, mask, gelu=False)
  assert np.abs(quick - got).max() > 1e-3
  with pytest.raises(ValueError, match="activation"):
    TemporalHeader("seqTransf", 64, heads=CFG.text_heads, rngs=nnx.Rngs(0)).init_from_clip(
        gelu_clip)
  model = RetrievalModel(RetrievalConfig(header="seqTransf", max_words=8, max_frames=5),
                         clip=gelu_clip, rngs=nnx.Rngs(0))
  assert {b.mlp.activation for b in model.header.resblocks} == {"gelu"}
