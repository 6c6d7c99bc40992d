"""Temporal header over per-frame features (docs/method.md §2).

`meanP` is parameter-free: the tokens pass unchanged (DMAE's token-wise interaction replaces
CLIP4Clip's mean pooling). `seqTransf` (CLIP4Clip): add learned frame position embeddings, run 4
residual attention blocks with padded frames masked as keys, add the input back. Its parameters are
initialised from CLIP's text tower: position embeddings from `positional_embedding`, blocks from
text blocks 0-3 (`init_from_clip`). The blocks use the CLIP's MLP activation (QuickGELU for OpenAI
weights, GELU for a CLIP converted with `--activation gelu`), since they start as copies of its text
blocks; their own LayerNorms use the release's epsilon 1e-12 (BERT style), not CLIP's 1e-5. The
release applies the header to L2-normalised tokens and does
not normalise its output; CLIP4Clip's re-normalisation is the `renormalize` flag (default off).
"""

from typing import Optional

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
      renormalize: L2-normalise the header output (CLIP4Clip); off = release behaviour.
      dtype: compute dtype of the blocks.
      activation: MLP activation of the blocks; pass the CLIP's (`CLIPConfig.activation`), whose
        text blocks the header copies (`init_from_clip` checks they agree).
      rngs: random streams for a from-scratch initialisation.
    """
    if kind not in HEADERS:
      raise ValueError(f"unknown temporal header {kind!r}; expected one of {HEADERS}")
    self.kind, self.dim, self.renormalize = kind, dim, renormalize
    self.max_positions = max_positions
    if kind == "seqTransf":
      self.frame_position_embeddings = nnx.Param(
          0.01 * jax.random.normal(rngs.params(), (max_positions, dim)))
      self.resblocks = nnx.List([
          ResidualAttentionBlock(dim, heads, layers, dtype=dtype, activation=activation,
                                 ln_eps=HEADER_LN_EPS, rngs=rngs) for _ in range(layers)])

  def init_from_clip(self, clip: CLIP) -> None:
    """Copies CLIP's text `positional_embedding` and text blocks 0..layers-1 into seqTransf.

    No-op for meanP. The copies are independent arrays (training the header leaves CLIP alone).
    """
    if self.kind != "seqTransf":
      return
    pos = clip.positional_embedding[...]
    if pos.shape != (self.max_positions, self.dim):
      raise ValueError(f"seqTransf with {self.max_positions} positions x width {self.dim} cannot "
                       f"take CLIP's text positional_embedding of shape {pos.shape} (the header "
                       "width must equal CLIP's text width)")
    if clip.config.activation != self.resblocks[0].mlp.activation:
      raise ValueError(f"seqTransf blocks use {self.resblocks[0].mlp.activation!r} but the CLIP "
                       f"whose text blocks they copy uses {clip.config.activation!r}; build the "
                       "header with activation=clip.config.activation")
    if len(clip.transformer.resblocks) < len(self.resblocks):
      raise ValueError(f"CLIP text tower has {len(clip.transformer.resblocks)} blocks, seqTransf "
                       f"needs {len(self.resblocks)}")
    self.frame_position_embeddings.set_value(jnp.array(pos, copy=True))
    for i, block in enumerate(self.resblocks):
      src = nnx.state(clip.transformer.resblocks[i], nnx.Param)
      nnx.update(block, jax.tree.map(lambda x: jnp.array(x, copy=True), src))

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
