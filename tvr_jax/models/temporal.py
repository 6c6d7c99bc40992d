"""Temporal header over per-frame features (docs/method.md §2).

`meanP` is parameter-free: the tokens pass unchanged (DMAE's token-wise interaction replaces
CLIP4Clip's mean pooling). `seqTransf` (CLIP4Clip): add learned frame position embeddings, run 4
residual attention blocks with padded frames masked as keys, add the input back. Its parameters are
initialised from CLIP's text tower where the shapes allow it: position embeddings from
`positional_embedding`, blocks from text blocks 0..layers-1 (`init_from_clip`). When the header
width differs from CLIP's text width (the tiny presets: embed 32, text 64) or the text tower has
fewer blocks than the header, the header keeps its from-scratch initialisation and the log says so.

The release applies the header to L2-normalised tokens and does not normalise its output;
CLIP4Clip's re-normalisation is the `renormalize` flag (default off, seqTransf only: meanP's tokens
are unit vectors already). Off is faithful for pretrained runs, whose copied text blocks keep the
output near the input. A from-scratch header without it lets the residual output grow, the scale-100
softmax saturates (every probability clipped, no gradient) and training stays at chance; the log
warns about that combination. The blocks use the CLIP's MLP activation (QuickGELU for OpenAI
weights, GELU for a CLIP converted with `--activation gelu`), since they start as copies of its text
blocks; their own LayerNorms use the release's epsilon 1e-12 (BERT style), not CLIP's 1e-5.
"""

from typing import Optional

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp

from tvr_jax.models.clip import CLIP, ResidualAttentionBlock
from tvr_jax.models.dmae import l2_normalize

HEADERS = ("meanP", "seqTransf")
# The release's seqTransf LayerNorms are BERT-style, eps 1e-12 (the CLIP towers keep 1e-5).
HEADER_LN_EPS = 1e-12


class TemporalHeader(nnx.Module):
  """meanP (identity) or seqTransf over visual tokens [B, F, D]."""

  def __init__(self, kind: str, dim: int, *, heads: int = 8, layers: int = 4,
               max_positions: int = 77, renormalize: bool = False, dtype=jnp.float32,
               activation: str = "quick_gelu", rngs: nnx.Rngs):
    """Builds the header.

    Args:
      kind: "meanP" or "seqTransf".
      dim: token width D (must equal CLIP's text width to copy text blocks).
      heads, layers: seqTransf attention heads and blocks (CLIP4Clip: text heads, 4 blocks).
      max_positions: rows of the frame position table (CLIP's context length, 77).
      renormalize: L2-normalise the seqTransf output (CLIP4Clip); off = release behaviour. Ignored
        for meanP, whose tokens are unit vectors already.
      dtype: compute dtype of the blocks.
      activation: MLP activation of the blocks; pass the CLIP's (`CLIPConfig.activation`), whose
        text blocks the header copies (`init_from_clip` checks they agree).
      rngs: random streams for a from-scratch initialisation.
    """
    if kind not in HEADERS:
      raise ValueError(f"unknown temporal header {kind!r}; expected one of {HEADERS}")
    self.kind, self.dim = kind, dim
    self.renormalize = renormalize and kind == "seqTransf"
    self.max_positions = max_positions
    self.init_source = "none" if kind == "meanP" else "scratch"   # set by init_from_clip
    if kind == "seqTransf":
      self.frame_position_embeddings = nnx.Param(
          0.01 * jax.random.normal(rngs.params(), (max_positions, dim)))
      self.resblocks = nnx.List([
          ResidualAttentionBlock(dim, heads, layers, dtype=dtype, activation=activation,
                                 ln_eps=HEADER_LN_EPS, rngs=rngs) for _ in range(layers)])

  def init_from_clip(self, clip: CLIP) -> str:
    """Copies CLIP's text `positional_embedding` and text blocks 0..layers-1 into seqTransf.

    Where the shapes do not allow the copy (header width != text width, or fewer text blocks than
    header blocks) the header keeps its from-scratch initialisation; the log says which. No-op for
    meanP. The copies are independent arrays (training the header leaves CLIP alone).

    Returns:
      "clip" (copied), "scratch" (kept its own initialisation) or "none" (meanP); also stored in
      `self.init_source`.
    """
    if self.kind != "seqTransf":
      return self.init_source
    pos = clip.positional_embedding[...]
    why = None
    if pos.shape != (self.max_positions, self.dim):
      why = (f"its {self.max_positions} positions x width {self.dim} do not match CLIP's text "
             f"positional_embedding {tuple(pos.shape)}")
    elif len(clip.transformer.resblocks) < len(self.resblocks):
      why = (f"it has {len(self.resblocks)} blocks and CLIP's text tower only "
             f"{len(clip.transformer.resblocks)}")
    if why is not None:
      self.init_source = "scratch"
      logging.warning("seqTransf header initialised from scratch: %s", why)
      if not self.renormalize:
        logging.warning("seqTransf from scratch without renormalize_after_header: its output norm "
                        "is free to grow and the scale-100 softmax can saturate (loss stuck, zero "
                        "gradient); set --config.model.renormalize_after_header=True")
      return self.init_source
    if clip.config.activation != self.resblocks[0].mlp.activation:
      raise ValueError(f"seqTransf blocks use {self.resblocks[0].mlp.activation!r} but the CLIP "
                       f"whose text blocks they copy uses {clip.config.activation!r}; build the "
                       "header with activation=clip.config.activation")
    self.init_source = "clip"
    logging.info("seqTransf header initialised from CLIP's text tower (positions and blocks 0-%d)",
                 len(self.resblocks) - 1)
    self.frame_position_embeddings.set_value(jnp.array(pos, copy=True))
    for i, block in enumerate(self.resblocks):
      src = nnx.state(clip.transformer.resblocks[i], nnx.Param)
      nnx.update(block, jax.tree.map(lambda x: jnp.array(x, copy=True), src))
    return self.init_source

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """tokens [B, F, D], mask [B, F] (1 = real frame) -> [B, F, D] in tokens' dtype."""
    if self.kind == "seqTransf":
      num = tokens.shape[1]
      if num > self.max_positions:
        raise ValueError(f"seqTransf has {self.max_positions} frame positions, got {num} frames")
      x = tokens + self.frame_position_embeddings[:num].astype(tokens.dtype)[None]
      for block in self.resblocks:
        x = block(x, key_padding_mask=mask)
      tokens = x.astype(tokens.dtype) + tokens
    if self.renormalize:
      tokens = l2_normalize(tokens)
    return tokens


def apply_header(header: Optional[TemporalHeader], tokens: jax.Array,
                 mask: jax.Array) -> jax.Array:
  """`header(tokens, mask)`, or the tokens unchanged when there is no header."""
  return tokens if header is None else header(tokens, mask)
