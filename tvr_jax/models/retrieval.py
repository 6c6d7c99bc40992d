"""The retrieval model: CLIP towers + temporal header + DMAE head + TPM-CL (docs/method.md §1-§6).

    ids [B, L]            -> encode_text  -> (sentence [B, D], words [B, L, D], text mask [B, L])
    frames [B, F, H, W, 3] -> encode_video -> (visual tokens [B, F, D] after header, mask [B, F])
    similarity(text, video) -> S [Bt, Bv]     (the same S at train and test time)
    loss(batch) -> (NegNCE or InfoNCE + tpm_weight * L_TPM, {term: value})
                = loss_from_features(encode_for_loss(batch))   (towers | head, for gradient caching)

All features handed to the head are float32 and L2-normalised: the release normalises the text
features and the per-frame features, then applies the temporal header and does not normalise its
output (`renormalize_after_header` is CLIP4Clip's behaviour). The TPM-CL "full" video side uses the
tokens before the header and the masked side goes through the header (docs/method.md §5.3, §A.9
item 9).
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from flax import nnx
import jax
import jax.numpy as jnp

from tvr_jax import losses
from tvr_jax.models import dmae, tpmcl
from tvr_jax.models.clip import CLIP, CLIPConfig, load_clip
from tvr_jax.models.temporal import HEADERS, TemporalHeader

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTRASTIVE_LOSSES = ("negnce", "infonce")


def normalize_frames(frames: jax.Array) -> jax.Array:
  """uint8 RGB frames [..., 3] in 0..255 -> float32 CLIP-normalised ((x/255 - mean) / std).

  Meant to run on device inside the jitted step, so batches travel as uint8.
  """
  if frames.shape[-1] != 3:
    raise ValueError(f"expected RGB frames [..., 3], got shape {frames.shape}")
  x = frames.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  """What the retrieval head computes; defaults are the paper's full model (docs/method.md §2-§6).

  Attributes:
    header: temporal header, "meanP" (default) or "seqTransf".
    header_layers: seqTransf blocks (copied from CLIP text blocks 0..n-1 when the widths match).
    renormalize_after_header: CLIP4Clip's re-normalisation after seqTransf (release: off; needed
      for a seqTransf trained from scratch, see `tvr_jax.models.temporal`). No effect on meanP.
    pooled_video: CLIP4Clip's meanP baseline: a video is ONE token, the re-normalised mean of its
      real frames' tokens after the header. With textual and visual attention off the similarity
      is then exactly CLIP4Clip's sentence-video cosine (the ablation grid's baseline row).
    textual_attention: sentence + word branches ("att_ti"); off = sentence branch only.
    visual_attention: frame-to-frame term in the text-to-video maxima ("nfc").
    keyword_weighting: text mask 2 on keywords; needs `keyword_mask` in the batch, made by
      `tvr_jax.keywords.keyword_mask` (offline English POS tagger; training batches carry it when
      this is on). Off by default.
    token_weights: learned "wti" token weights (DRL style) instead of uniform averages.
    contrastive_loss: "negnce" (default) or "infonce" (both with fixed scale 100).
    partial_type: TPM-CL terms, 4 = T1+T2+T3, 2 = T1+T2, 3 = T3, 0 = off.
    tau: adaptive masking threshold; delta: triplet margin; tpm_weight: weight of L_TPM.
    max_words: L, tokens per text (with start/end); max_frames: F, frames per video. The TPM-CL
      predictors' shapes depend on both.
    train_t2v_predictor: NOT the release: let the sentence-to-video predictor train
      (straight-through gradient through its masking); the faithful default leaves it untrained.
    head_precision: matmul precision of everything after the towers (temporal header, DMAE
      head, NegNCE / InfoNCE, TPM-CL; the chunked scorer takes the same setting): "highest"
      (default: full float32, so TF32 on GPUs cannot flip argmax / hard-negative / masking
      decisions) or "default" (the backend chooses). The towers keep CLIPConfig.dtype.
  """
  header: str = "meanP"
  header_layers: int = 4
  renormalize_after_header: bool = False
  pooled_video: bool = False
  textual_attention: bool = True
  visual_attention: bool = True
  keyword_weighting: bool = False
  token_weights: bool = False
  contrastive_loss: str = "negnce"
  partial_type: int = 4
  tau: float = tpmcl.TAU
  delta: float = tpmcl.DELTA
  tpm_weight: float = 1.0
  max_words: int = 32
  max_frames: int = 12
  train_t2v_predictor: bool = False
  head_precision: str = "highest"

  def __post_init__(self):
    if self.header not in HEADERS:
      raise ValueError(f"header must be one of {HEADERS}, got {self.header!r}")
    if self.head_precision not in dmae.HEAD_PRECISIONS:
      raise ValueError(f"head_precision must be one of {dmae.HEAD_PRECISIONS}, got "
                       f"{self.head_precision!r}")
    if self.contrastive_loss not in CONTRASTIVE_LOSSES:
      raise ValueError(f"contrastive_loss must be one of {CONTRASTIVE_LOSSES}, got "
                       f"{self.contrastive_loss!r}")
    if self.partial_type not in tpmcl.PARTIAL_TERMS:
      raise ValueError(f"partial_type must be one of {sorted(tpmcl.PARTIAL_TERMS)}, got "
                       f"{self.partial_type}")
    if self.max_words < 2 or self.max_frames < 1:
      raise ValueError(f"max_words must be >= 2 and max_frames >= 1, got {self.max_words}, "
                       f"{self.max_frames}")

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def similarity_kwargs(self) -> Dict[str, Any]:
    """Keyword arguments of `dmae.dmae_similarity` this config implies (model and scorer alike)."""
    return dict(textual_attention=self.textual_attention,
                visual_attention=self.visual_attention, normalize=False)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RetrievalConfig":
    """Builds a config from a dict or ConfigDict; unknown keys are an error naming them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown RetrievalConfig field(s): {sorted(unknown)}")
    return cls(**dict(d))


TextFeatures = Tuple[jax.Array, jax.Array, jax.Array]
VideoFeatures = Tuple[jax.Array, jax.Array]


class RetrievalModel(nnx.Module):
  """CLIP + temporal header + DMAE similarity + TPM-CL, one nnx.Module."""

  def __init__(self, config: RetrievalConfig, clip: Optional[CLIP] = None,
               clip_config: Optional[CLIPConfig] = None, *, rngs: Optional[nnx.Rngs] = None):
    """Builds the model around a given CLIP (e.g. `load_clip(dir)`) or a fresh one from clip_config.

    New modules: seqTransf copies CLIP's text position table and text blocks; the TPM-CL
    predictors and wti weights take torch's default initialisation.
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if clip is None:
      if clip_config is None:
        raise ValueError("RetrievalModel needs either a CLIP or a CLIPConfig")
      clip = CLIP(clip_config, rngs=rngs)
    c = clip.config
    if config.max_words > c.context_length:
      raise ValueError(f"max_words {config.max_words} exceeds CLIP's context length "
                       f"{c.context_length}")
    self.config = config
    self.clip = clip
    dim = c.embed_dim
    self.header = TemporalHeader(config.header, dim, heads=c.text_heads,
                                 layers=config.header_layers, max_positions=c.context_length,
                                 renormalize=config.renormalize_after_header,
                                 dtype=c.compute_dtype, activation=c.activation, rngs=rngs)
    self.header.init_from_clip(clip)
    self.token_weights = dmae.TokenWeights(dim, rngs=rngs) if config.token_weights else None
    if config.partial_type:
      self.word_predictor = tpmcl.CrossModalWeightPredictor(config.max_frames, config.max_words,
                                                            dim, rngs=rngs)
      self.visual_predictor = tpmcl.CrossModalWeightPredictor(1, config.max_frames, dim,
                                                              rngs=rngs)
    else:
      self.word_predictor = self.visual_predictor = None

  def untrained_params(self) -> Tuple[str, ...]:
    """Regexes of parameter paths that get no gradient by design; the optimizer freezes them.

    The release's sentence-to-video predictor (`visual_predictor`) only chooses which visual
    tokens TPM-CL zeroes, by a stop-gradient selection, so its gradient is exactly zero unless
    `train_t2v_predictor` is on. Decoupled weight decay would still shrink it every step (~7%
    over an MSR-VTT run); `optimizer.build(..., frozen=...)` keeps it bit-identical instead.
    """
    if self.config.partial_type and not self.config.train_t2v_predictor:
      return (r"^visual_predictor/",)
    return ()

  @classmethod
  def from_pretrained(cls, config: RetrievalConfig, clip_dir: str,
                      rngs: Optional[nnx.Rngs] = None, **clip_overrides) -> "RetrievalModel":
    """Builds the model on a converted CLIP checkpoint directory (`python -m tvr_jax.convert`)."""
    return cls(config, clip=load_clip(clip_dir, **clip_overrides), rngs=rngs)

  # --------------------------------------------------------------------------------------------
  # Encoders
  # --------------------------------------------------------------------------------------------
  def encode_text(self, ids: jax.Array, keyword_mask: Optional[jax.Array] = None) -> TextFeatures:
    """ids int32 [B, L] -> (sentence [B, D], words [B, L, D], mask [B, L] int32).

    Features are float32, L2-normalised. The mask is 1 on SOT..EOT, 0 on padding, and 2 on
    keywords when `keyword_weighting` is on and `keyword_mask` ([B, L], nonzero = keyword) is given.
    """
    if ids.ndim != 2 or ids.shape[1] != self.config.max_words:
      raise ValueError(f"text ids must be [B, max_words={self.config.max_words}], got {ids.shape}")
    sent, words, mask = self.clip.encode_text_tokens(ids)
    if self.config.keyword_weighting:
      if keyword_mask is None:
        raise ValueError("keyword_weighting is on but no keyword_mask was given")
      mask = mask + ((keyword_mask != 0) & (mask > 0)).astype(mask.dtype)
    sent = dmae.l2_normalize(sent.astype(jnp.float32))
    words = dmae.l2_normalize(words.astype(jnp.float32))
    return sent, words, mask

  def frame_tokens(self, frames: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """Per-frame CLIP features, L2-normalised.

    Args:
      frames: [B, F, H, W, 3], uint8 (normalised here) or float already CLIP-normalised.
      frame_mask: [B, F], 0 = padded frame. Padded frames become exactly 0 after normalisation,
        as CLIP4Clip pads (batches pad with black uint8 frames, which normalise to -mean/std).
        Their tokens are masked out of S but reach the TPM-CL predictors, so their pixels must
        not matter.

    Returns:
      [B, F, D] float32.
    """
    if frames.ndim != 5:
      raise ValueError(f"frames must be [B, F, H, W, 3], got {frames.shape}")
    if frames.shape[1] != self.config.max_frames:
      raise ValueError(f"frames must have max_frames={self.config.max_frames} frames, got "
                       f"{frames.shape[1]}")
    if frame_mask.shape != frames.shape[:2]:
      raise ValueError(f"frame_mask must be [B, F] = {frames.shape[:2]}, got {frame_mask.shape}")
    if frames.dtype == jnp.uint8:
      frames = normalize_frames(frames)
    real = (frame_mask != 0)[:, :, None, None, None]
    frames = jnp.where(real, frames, jnp.zeros((), frames.dtype))
    b, f = frames.shape[:2]
    feats = self.clip.encode_image(frames.reshape(b * f, *frames.shape[2:]))
    return dmae.l2_normalize(feats.astype(jnp.float32).reshape(b, f, -1))

  def encode_video(self, frames: jax.Array, frame_mask: jax.Array) -> VideoFeatures:
    """frames [B, F, H, W, 3], frame_mask [B, F] -> (visual tokens [B, F, D] float32, mask).

    The tokens are what `similarity` and the chunked scorer consume: normalised per frame, then
    passed through the temporal header. Padded frames (mask 0) enter the image tower as all-zero
    normalised frames (`frame_tokens`).
    """
    tokens = self.frame_tokens(frames, frame_mask)
    with dmae.head_precision_scope(self.config.head_precision):
      return self._video_tokens(tokens, frame_mask)

  def _video_tokens(self, pre_header: jax.Array, frame_mask: jax.Array) -> VideoFeatures:
    """Per-frame tokens [B, F, D] -> header output, mean-pooled to [B, 1, D] with `pooled_video`."""
    tokens = self.header(pre_header, frame_mask).astype(jnp.float32)
    if not self.config.pooled_video:
      return tokens, frame_mask
    m = frame_mask.astype(jnp.float32)[..., None]
    mean = jnp.sum(tokens * m, axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(m, axis=1, keepdims=True), 1)
    return dmae.l2_normalize(mean), jnp.max(frame_mask, axis=1, keepdims=True)

  # --------------------------------------------------------------------------------------------
  # Similarity and loss
  # --------------------------------------------------------------------------------------------
  def similarity_kwargs(self) -> Dict[str, Any]:
    """Keyword arguments of `dmae.dmae_similarity` this model's config implies."""
    return self.config.similarity_kwargs()

  def similarity(self, text_feats: TextFeatures, video_feats: VideoFeatures) -> jax.Array:
    """DMAE similarity S [Bt, Bv] from `encode_text` and `encode_video` outputs."""
    sent, words, tmask = text_feats
    tokens, vmask = video_feats
    with dmae.head_precision_scope(self.config.head_precision):
      word_w = frame_w = None
      if self.token_weights is not None:
        word_w, frame_w = self.token_weights(words, tmask, tokens, vmask)
      return dmae.dmae_similarity(sent, words, tmask, tokens, vmask, word_weights=word_w,
                                  frame_weights=frame_w, **self.similarity_kwargs())

  def loss(self, batch: Mapping[str, jax.Array], *, health: bool = False,
           gather: Optional[Callable[[Any], Any]] = None
           ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Training loss on a batch of matched (text, video) pairs.

    Args:
      batch: `text_ids` int32 [B, L], `frames` [B, F, H, W, 3] (uint8 or CLIP-normalised float),
        `frame_mask` [B, F]; `keyword_mask` [B, L] when keyword weighting is on.
      health: also return the saturation indicator (the trainer's health guard reads it).
      gather: applied once to the per-sample features (text features, frame tokens before the
        header, frame mask) between the towers and the head. The sharded train step passes a
        constraint that replicates them, so the towers stay local to each batch shard and the
        similarity matrix and TPM-CL see the whole global batch after one gather per feature
        (docs/aot.md); None leaves the placement to the compiler.

    Returns:
      (total, terms): total = contrastive + tpm_weight * tpm; terms holds `negnce` or `infonce`,
      `tpm` and its parts `tpm/T1`, `tpm/T2`, `tpm/T3` (those the partial type uses); with
      `health`, also `losses.SATURATION_KEY` (`losses.saturated_fraction(S)`: not a loss, no part
      of total, no gradient).
    """
    features = self.encode_for_loss(batch)
    if gather is not None:
      features = gather(features)
    return self.loss_from_features(features, health=health)

  def encode_for_loss(self, batch: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    """The towers' part of `loss`: per-sample features, so a batch can be encoded in pieces.

    Row i of every output depends on row i of the batch only (gradient caching encodes
    micro-batches and concatenates the rows).

    Args:
      batch: as for `loss`.

    Returns:
      `sent` [B, D], `words` [B, L, D], `text_mask` [B, L] int32, `frames` [B, F, D] (per-frame
      features BEFORE the temporal header; TPM-CL reads them there) and `frame_mask` [B, F].
    """
    sent, words, text_mask = self.encode_text(batch["text_ids"], batch.get("keyword_mask"))
    frame_mask = batch["frame_mask"]
    return {"sent": sent, "words": words, "text_mask": text_mask,
            "frames": self.frame_tokens(batch["frames"], frame_mask), "frame_mask": frame_mask}

  def loss_from_features(self, features: Mapping[str, jax.Array], *, health: bool = False
                         ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The head's part of `loss` on the whole batch of `encode_for_loss` features.

    Temporal header, similarity matrix, NegNCE / InfoNCE and TPM-CL: every term that couples
    samples (negatives, hard-negative set) is here, at `head_precision`. Returns (total, terms)
    as `loss`.
    """
    text = (features["sent"], features["words"], features["text_mask"])
    return self.head_loss(text, features["frames"], features["frame_mask"], health=health)

  def head_loss(self, text_feats: TextFeatures, frame_tokens: jax.Array, frame_mask: jax.Array,
                *, health: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """`loss` from encoded features: header, S, contrastive loss and TPM-CL, at head_precision.

    Args:
      text_feats: `encode_text` output (sentence [B, D], words [B, L, D], mask [B, L]).
      frame_tokens: `frame_tokens` output [B, F, D] (before the temporal header).
      frame_mask: [B, F].
      health: also return the saturation indicator (see `loss`).

    Returns:
      As `loss`.
    """
    with dmae.head_precision_scope(self.config.head_precision):
      return self._head_loss(text_feats, frame_tokens, frame_mask, health)

  def _head_loss(self, text, pre_header, frame_mask, health):
    cfg = self.config
    sim = self.similarity(text, self._video_tokens(pre_header, frame_mask))
    if cfg.contrastive_loss == "negnce":
      contrastive = losses.negnce_symmetric(sim)
    else:
      contrastive = losses.infonce_symmetric(sim)
    terms = {cfg.contrastive_loss: contrastive}
    if health:
      terms[losses.SATURATION_KEY] = losses.saturated_fraction(sim)
    total = contrastive
    if cfg.partial_type:
      header = self.header if self.header.kind != "meanP" else None
      tpm, out = tpmcl.tpm_loss(text[0], text[1], pre_header, frame_mask, self.word_predictor,
                                self.visual_predictor, partial_type=cfg.partial_type,
                                tau=cfg.tau, delta=cfg.delta, header=header,
                                train_t2v_predictor=cfg.train_t2v_predictor)
      terms["tpm"] = tpm
      for name in tpmcl.PARTIAL_TERMS[cfg.partial_type]:
        terms[f"tpm/{name}"] = out[name]
      total = total + cfg.tpm_weight * tpm
    return total, terms
