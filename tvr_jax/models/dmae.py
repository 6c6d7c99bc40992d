"""DMAE similarity (docs/method.md §3): token-wise interaction with dual-modal attention.

Everything here is a pure function of feature arrays, so training (one global batch) and evaluation
(cached embeddings scored block by block, `tvr_jax/scoring.py`) share the same code. The optional
learned token weights ("wti", DRL style) are the one module with parameters, `TokenWeights`.

Shapes: texts `Bt`, videos `Bv`, words per text `L` (with start/end tokens), visual tokens per video
`Nv`, feature width `D`.

Facts pinned down by the release and its golden data (docs/method.md §A.3, §A.9):
- masked similarity entries are exactly 0, not -inf, so a padded frame's 0 can win a max;
- keyword weights (text mask value 2) act only through the averaging weights alpha = m / sum(m);
  the scores use min(m, 1), and the sentence branch reads only the first column of the text mask;
- visual attention adds `0.5 * w(b, v*) * s[a, b, t, n(b, v*)]` to the text-to-video maxima only,
  with a frame-frame matrix whose diagonal and masked rows/columns are zero.
"""

import contextlib
from typing import ContextManager, Optional, Tuple

from flax import nnx
import jax
import jax.numpy as jnp

NORM_EPS = 1e-6
# Matmul precision of everything after the towers (header, DMAE head, losses, TPM-CL, scorer).
HEAD_PRECISIONS = ("highest", "default")


def head_precision_scope(setting: str) -> ContextManager:
  """Context in which the head's dots and einsums are traced at `setting`.

  "highest": full float32 products (`jax.default_matmul_precision("highest")`). On recent NVIDIA
  GPUs float32 dots otherwise run as TF32 (~1e-3 relative), enough to flip the argmax of visual
  attention, NegNCE's hard-negative set or TPM-CL's masking. "default": whatever JAX's default
  matmul precision is (the backend chooses). Applied while tracing, so jitted functions (and
  their gradients, whose dots inherit the forward's precision) carry it in their HLO.
  """
  if setting not in HEAD_PRECISIONS:
    raise ValueError(f"head precision must be one of {HEAD_PRECISIONS}, got {setting!r}")
  if setting == "highest":
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


def l2_normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """Returns x / max(||x||, eps) along the last axis (torch `F.normalize` semantics).

  The release divides without an epsilon (a zero vector gives NaN); the small epsilon keeps zero
  vectors (padding, zeroed tokens) at zero with a finite gradient.
  """
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den with 0 where den == 0 (an all-padded row has no tokens to average over)."""
  return num / jnp.where(den == 0, 1, den)


def frame_neighbours(frames: jax.Array, video_mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Frame-to-frame attention of each video: the most similar other frame and its similarity.

  Args:
    frames: [Bv, Nv, D] L2-normalised visual tokens.
    video_mask: [Bv, Nv] 1 = real token, 0 = padding.

  Returns:
    (index [Bv, Nv] int32, weight [Bv, Nv]): `A[v, v'] = <y_v, y_v'> mu_v mu_v'` with a zero
    diagonal; index = argmax_v' A[v, v'], weight = max_v' A[v, v'].
  """
  mv = video_mask.astype(frames.dtype)
  a = jnp.einsum("bvd,bwd->bvw", frames, frames) * mv[:, :, None] * mv[:, None, :]
  nv = frames.shape[1]
  a = jnp.where(jnp.eye(nv, dtype=bool)[None], jnp.zeros((), a.dtype), a)
  return jnp.argmax(a, axis=-1).astype(jnp.int32), jnp.max(a, axis=-1)


def token_interaction(text: jax.Array, text_mask: jax.Array, video: jax.Array,
                      video_mask: jax.Array, *, visual_attention: bool = True,
                      neighbours: Optional[Tuple[jax.Array, jax.Array]] = None,
                      text_weights: Optional[jax.Array] = None,
                      video_weights: Optional[jax.Array] = None) -> jax.Array:
  """Token-wise interaction `sim(X_a, Y_b)` of every text token set with every video token set.

  Args:
    text: [Bt, T, D] L2-normalised text tokens.
    text_mask: [Bt, T] 0 = padding, 1 = token, 2 = keyword (counts double in the average).
    video: [Bv, Nv, D] L2-normalised visual tokens.
    video_mask: [Bv, Nv] 0/1.
    visual_attention: add the frame-to-frame term to the text-to-video maxima.
    neighbours: precomputed `frame_neighbours(video, video_mask)` (computed here when None).
    text_weights, video_weights: optional learned token weights [Bt, T] / [Bv, Nv] (each row sums
      to 1 over real tokens), the "wti" variant; they replace the uniform averages.

  Returns:
    [Bt, Bv] similarity `0.5 * (sum_t alpha t2v + sum_v beta v2t)`.
  """
  dtype = text.dtype
  m = text_mask.astype(dtype)
  mv = video_mask.astype(dtype)
  m01 = jnp.clip(m, 0, 1)
  s = jnp.einsum("atd,bvd->abtv", text, video)
  s = s * m01[:, None, :, None] * mv[None, :, None, :]
  t2v = jnp.max(s, axis=-1)  # [Bt, Bv, T]
  v2t = jnp.max(s, axis=-2)  # [Bt, Bv, Nv]
  if visual_attention:
    n_idx, n_w = neighbours if neighbours is not None else frame_neighbours(video, video_mask)
    best = jnp.argmax(s, axis=-1)[..., None]  # v*(a, b, t): [Bt, Bv, T, 1]
    # Indices carry no gradient; gradients flow through the gathered w and s values.
    second = jnp.take_along_axis(n_idx[None, :, None, :], best, axis=-1)  # n(b, v*)
    w_best = jnp.take_along_axis(n_w[None, :, None, :], best, axis=-1)[..., 0]
    s_second = jnp.take_along_axis(s, second, axis=-1)[..., 0]
    t2v = t2v + 0.5 * w_best * s_second
  if text_weights is None:
    t_part = jnp.einsum("abt,at->ab", t2v, _safe_div(m, jnp.sum(m, -1, keepdims=True)))
  else:
    t_part = jnp.einsum("abt,at->ab", t2v, m * text_weights)
  if video_weights is None:
    v_part = jnp.einsum("abv,bv->ab", v2t, _safe_div(mv, jnp.sum(mv, -1, keepdims=True)))
  else:
    v_part = jnp.einsum("abv,bv->ab", v2t, mv * video_weights)
  return 0.5 * (t_part + v_part)


def dmae_similarity(sent: jax.Array, words: jax.Array, text_mask: jax.Array, frames: jax.Array,
                    video_mask: jax.Array, *, textual_attention: bool = True,
                    visual_attention: bool = True, normalize: bool = True,
                    word_weights: Optional[jax.Array] = None,
                    frame_weights: Optional[jax.Array] = None) -> jax.Array:
  """The DMAE similarity matrix S (docs/method.md §3), rows = texts, columns = videos.

  Args:
    sent: [Bt, D] sentence features.
    words: [Bt, L, D] word (token) features; ignored when `textual_attention` is False.
    text_mask: [Bt, L] 0/1/2 (2 = keyword). The sentence branch uses only column 0 (clamped to 1).
    frames: [Bv, Nv, D] visual tokens (after the temporal header).
    video_mask: [Bv, Nv] 0/1.
    textual_attention: average the sentence branch with the word branch (release "att_ti").
    visual_attention: frame-to-frame term (release "nfc"), in both branches.
    normalize: L2-normalise all features first (with a small epsilon). Pass False when the caller
      has normalised already (the release normalises before the temporal header and not after it).
    word_weights, frame_weights: optional "wti" token weights ([Bt, L], [Bv, Nv]); the sentence
      branch then weights its single token by 1.

  Returns:
    S [Bt, Bv].
  """
  if normalize:
    sent, words, frames = l2_normalize(sent), l2_normalize(words), l2_normalize(frames)
  neighbours = frame_neighbours(frames, video_mask) if visual_attention else None
  sent_mask = jnp.clip(text_mask[:, :1], 0, 1)
  sent_w = None if word_weights is None else jnp.ones_like(sent_mask, dtype=sent.dtype)
  sim = token_interaction(sent[:, None, :], sent_mask, frames, video_mask,
                          visual_attention=visual_attention, neighbours=neighbours,
                          text_weights=sent_w, video_weights=frame_weights)
  if textual_attention:
    sim_w = token_interaction(words, text_mask, frames, video_mask,
                              visual_attention=visual_attention, neighbours=neighbours,
                              text_weights=word_weights, video_weights=frame_weights)
    sim = 0.5 * (sim + sim_w)
  return sim


def torch_linear_init(fan_in: int):
  """Initializer U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default for Linear weights and biases.

  The release's new modules (token weights, TPM-CL predictors) start from it.
  """
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to mask > 0; an all-masked row gives zeros."""
  valid = mask > 0
  logits = jnp.where(valid, logits, -jnp.inf)
  mx = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.where(valid, jnp.exp(logits - jnp.where(jnp.isfinite(mx), mx, 0)), 0)
  return _safe_div(e, jnp.sum(e, axis=-1, keepdims=True))


class TokenWeights(nnx.Module):
  """Learned token weights of the "wti" interaction (DRL style): Linear(D, 1) + masked softmax.

  One linear layer scores text tokens, another visual tokens (release `text_weight_fc`,
  `video_weight_fc`, `l3_wti_arch = 1`). Torch's default Linear initialisation.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    init = torch_linear_init(dim)
    self.text_fc = nnx.Linear(dim, 1, kernel_init=init, bias_init=init, rngs=rngs)
    self.video_fc = nnx.Linear(dim, 1, kernel_init=init, bias_init=init, rngs=rngs)

  def __call__(self, words: jax.Array, text_mask: jax.Array, frames: jax.Array,
               video_mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Returns (word weights [Bt, L], frame weights [Bv, Nv]); rows sum to 1 over real tokens."""
    tw = masked_softmax(self.text_fc(words)[..., 0], text_mask)
    vw = masked_softmax(self.video_fc(frames)[..., 0], video_mask)
    return tw, vw
