"""TPM-CL (docs/method.md §5): cross-modal token-weight predictors, adaptive masking, margins.

Training only. Computed on the matched pairs (i, i) alone, which is exact and O(B) (the release
scores every pair block by block and reads the diagonal; with more than 8 samples per device its
bookkeeping pairs the wrong items, docs/method.md §9).

Faithful to the release (docs/method.md §A.5, §A.9):
- the predictor ignores padding (padded words and frames get weight, can be zeroed, shape t_g);
- adaptive masking zeroes the highest-weight tokens whose cumulative weight stays below tau, by a
  stop-gradient selection; zeroed tokens keep their mask bit;
- t_g is normalised, t_g^p is neither normalised nor re-weighted;
- the visual-token weights b only choose which tokens are zeroed, so the sentence-to-video
  predictor gets no gradient (`train_t2v_predictor=True` is a labelled non-release option that
  passes a straight-through gradient to b).
"""

from typing import Callable, Dict, Optional, Tuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from tvr_jax.models.dmae import l2_normalize, torch_linear_init

TAU = 0.6
DELTA = 0.6
LN_EPS = 1e-5


class SlabLayerNorm(nnx.Module):
  """LayerNorm over a whole [N, C] slab per sample (one mean, one biased variance), eps 1e-5,
  with elementwise affine parameters of shape [N, C] (release `attn_proj.0`).

  A module of its own so that its leaves read `.../norm/scale` and `.../norm/bias`, the names the
  optimizer's no-weight-decay rules recognise.
  """

  def __init__(self, num: int, channels: int):
    self.scale = nnx.Param(jnp.ones((num, channels), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num, channels), jnp.float32))

  def __call__(self, h: jax.Array) -> jax.Array:
    """h [B, N, C] -> [B, N, C]."""
    mean = jnp.mean(h, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=(1, 2), keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + LN_EPS) * self.scale[...] + self.bias[...]


class CrossModalWeightPredictor(nnx.Module):
  """XWP(Q, K): weights of the N_k key tokens given N_q query tokens of the other modality.

      Q~ = M Q                      M: [N_k, N_q], no bias
      H  = LayerNorm([Q~ ; K])      one mean/variance over the whole [N_k, 2D] slab, eps 1e-5,
                                    affine scale and bias of shape [N_k, 2D]
      u  = sigmoid(w2 . GELU(W1 H_n))   W1: 2D -> D/2, w2: D/2 -> 1, no biases, exact GELU
      a  = u / sum(u)               sum-normalised (not softmax); padding not masked

  Release `LinearXWeightPredictor`; initialisation as torch's defaults (Linear U(+-1/sqrt(fan_in)),
  LayerNorm 1/0).
  """

  def __init__(self, num_queries: int, num_keys: int, dim: int, *, rngs: nnx.Rngs):
    if dim % 2:
      raise ValueError(f"feature width must be even (hidden width D/2), got {dim}")
    self.num_queries, self.num_keys, self.dim = num_queries, num_keys, dim
    self.qk_proj = nnx.Param(torch_linear_init(num_queries)(rngs.params(), (num_keys, num_queries)))
    self.norm = SlabLayerNorm(num_keys, 2 * dim)
    self.fc1 = nnx.Linear(2 * dim, dim // 2, use_bias=False,
                          kernel_init=torch_linear_init(2 * dim), rngs=rngs)
    self.fc2 = nnx.Linear(dim // 2, 1, use_bias=False, kernel_init=torch_linear_init(dim // 2),
                          rngs=rngs)

  def __call__(self, queries: jax.Array, keys: jax.Array) -> jax.Array:
    """Args: queries [B, N_q, D], keys [B, N_k, D]. Returns weights [B, N_k], rows summing to 1."""
    if queries.shape[1:] != (self.num_queries, self.dim) or keys.shape[1:] != (self.num_keys,
                                                                              self.dim):
      raise ValueError(
          f"weight predictor built for queries [*, {self.num_queries}, {self.dim}] and keys "
          f"[*, {self.num_keys}, {self.dim}], got {queries.shape} and {keys.shape}")
    mixed = jnp.einsum("kq,bqd->bkd", self.qk_proj[...], queries)
    h = self.norm(jnp.concatenate([mixed, keys], axis=-1))  # [B, N_k, 2D]
    u = jax.nn.sigmoid(self.fc2(jax.nn.gelu(self.fc1(h), approximate=False))[..., 0])
    return u / jnp.sum(u, axis=-1, keepdims=True)


# Torch parameter names of the release's LinearXWeightPredictor -> (attribute path, transpose?).
# `q_proj` / `k_proj` exist there but are bypassed (query and key widths equal D).
_TORCH_NAMES = {
    "qk_proj.weight": (("qk_proj",), False),
    "attn_proj.0.weight": (("norm", "scale"), False),
    "attn_proj.0.bias": (("norm", "bias"), False),
    "attn_proj.1.weight": (("fc1", "kernel"), True),
    "attn_proj.3.weight": (("fc2", "kernel"), True),
}
UNUSED_TORCH_NAMES = ("q_proj.weight", "k_proj.weight")


def load_torch_xwp(module: CrossModalWeightPredictor, params: Dict[str, np.ndarray]) -> None:
  """Copies release `LinearXWeightPredictor` weights (torch names) into `module`, in place.

  Every known name must be present, shapes must match, unknown names are an error; the bypassed
  `q_proj.weight` / `k_proj.weight` are accepted and ignored.
  """
  unknown = set(params) - set(_TORCH_NAMES) - set(UNUSED_TORCH_NAMES)
  if unknown:
    raise KeyError(f"unknown weight-predictor parameter(s): {sorted(unknown)}")
  for name, (path, transpose) in _TORCH_NAMES.items():
    if name not in params:
      raise KeyError(f"weight-predictor parameter {name!r} missing")
    value = np.asarray(params[name], np.float32)
    value = value.T if transpose else value
    target = module
    for p in path:
      target = getattr(target, p)
    if target.get_value().shape != value.shape:
      raise ValueError(f"weight-predictor parameter {name!r}: shape {params[name].shape} does not "
                       f"fit the module ({target.get_value().shape}, transpose={transpose})")
    target.set_value(jnp.asarray(value))


def xwp_state_to_torch(state: nnx.State) -> Dict[str, np.ndarray]:
  """Maps an `nnx.State` of a CrossModalWeightPredictor (params or gradients) to torch names."""
  flat = {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}
  out = {}
  for name, (path, transpose) in _TORCH_NAMES.items():
    leaf = flat[path]
    value = np.asarray(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)
    out[name] = value.T if transpose else value
  return out


def adaptive_keep(weights: jax.Array, tau: float = TAU) -> jax.Array:
  """Adaptive masking: 1 = keep, 0 = zero the token.

  Sort each row descending and take the cumulative sum c_r; the token of rank r is zeroed iff
  c_r < tau ([0.5, 0.3, 0.2] zeroes only the first; [0.7, 0.3] zeroes none). Stop-gradient.

  Args:
    weights: [B, N], rows summing to 1.

  Returns:
    [B, N] in the weights' dtype.
  """
  w = jax.lax.stop_gradient(weights)
  order = jnp.argsort(-w, axis=-1, stable=True)
  csum = jnp.cumsum(jnp.take_along_axis(w, order, axis=-1), axis=-1)
  zero_sorted = csum < tau
  ranks = jnp.argsort(order, axis=-1)
  zero = jnp.take_along_axis(zero_sorted, ranks, axis=-1)
  return jnp.where(zero, 0, 1).astype(weights.dtype)


def sigma(x: jax.Array, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
  """Row similarity of TPM-CL: 0.5 * [max_v c_v + sum_v c_v / sum_v mu_v], c_v = <x, y_v> mu_v.

  Raw cosines (no scale), no visual attention, x used as given. Zeroed tokens keep their mask bit
  (their 0 counts in the sum of mu and takes part in the max).

  Args:
    x: [B, D]; tokens: [B, Nv, D]; token_mask: [B, Nv]. Returns [B].
  """
  mv = token_mask.astype(x.dtype)
  c = jnp.einsum("bd,bvd->bv", x, tokens) * mv
  den = jnp.sum(mv, axis=-1)
  return 0.5 * (jnp.max(c, axis=-1) + c.sum(-1) / jnp.where(den == 0, 1, den))


def margin_ranking(x1: jax.Array, x2: jax.Array, delta: float = DELTA) -> jax.Array:
  """MR(x1, x2) = mean_i max(0, delta - (x1 - x2)) (torch MarginRankingLoss, target +1)."""
  return jnp.mean(jax.nn.relu(delta - (x1 - x2)))


PARTIAL_TERMS = {2: ("T1", "T2"), 3: ("T3",), 4: ("T1", "T2", "T3"), 0: ()}


def tpm_loss(sent: jax.Array, words: jax.Array, frames: jax.Array, video_mask: jax.Array,
             word_predictor: CrossModalWeightPredictor,
             visual_predictor: CrossModalWeightPredictor, *, partial_type: int = 4,
             tau: float = TAU, delta: float = DELTA,
             header: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
             train_t2v_predictor: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """L_TPM on the matched pairs, with every intermediate for inspection.

  Args:
    sent: [B, D] normalised sentence features s_i.
    words: [B, L, D] normalised word features W_i (padding included, as the release).
    frames: [B, Nv, D] normalised visual tokens F_i before the temporal header.
    video_mask: [B, Nv].
    word_predictor: XWP with (N_q, N_k) = (Nv, L): a_i = XWP(F_i, W_i) (release `v2t_linear_xwp`).
    visual_predictor: XWP with (N_q, N_k) = (1, Nv): b_i = XWP(s_i, F_i) (release `t2v_linear_xwp`).
    partial_type: 4 = T1+T2+T3 (default), 2 = T1+T2, 3 = T3, 0 = off.
    tau: masking threshold; delta: hinge margin.
    header: temporal header for the masked visual tokens, `header(tokens, mask)`; None = meanP.
    train_t2v_predictor: NOT the release: pass a straight-through gradient from F^p to b.

  The text mask is not read: the release's TPM-CL reads only its first column (always 1), and
  padded words take part in the word weights, t_g and t_g^p as they do there.

  Returns:
    (loss, dict with a, b, word_keep, vis_keep, tg, tgp, T1_x1 ... T3_x2, T1/T2/T3 hinge means).
  """
  if partial_type not in PARTIAL_TERMS:
    raise ValueError(f"partial_type must be one of {sorted(PARTIAL_TERMS)}, got {partial_type}")
  a = word_predictor(frames, words)  # [B, L]
  b = visual_predictor(sent[:, None, :], frames)  # [B, Nv]
  word_keep = adaptive_keep(a, tau)
  vis_keep = adaptive_keep(b, tau)
  tg = l2_normalize(jnp.einsum("bl,bld->bd", a, words), eps=1e-12)
  tgp = jnp.einsum("bl,bld->bd", a * word_keep, words)
  vis_scale = vis_keep
  if train_t2v_predictor:
    vis_scale = vis_keep + b - jax.lax.stop_gradient(b)  # forward value unchanged
  f_partial = frames * vis_scale[..., None]
  if header is not None:
    f_partial = header(f_partial, video_mask)
  out = {"a": a, "b": b, "word_keep": word_keep, "vis_keep": vis_keep, "tg": tg, "tgp": tgp}
  terms = PARTIAL_TERMS[partial_type]
  loss = jnp.zeros((), sent.dtype)
  if not terms:
    return loss, out
  full_tg = sigma(tg, frames, video_mask)
  pairs = {
      "T1": (lambda: sigma(sent, frames, video_mask), lambda: sigma(sent, f_partial, video_mask)),
      "T2": (lambda: full_tg, lambda: sigma(tg, f_partial, video_mask)),
      "T3": (lambda: full_tg, lambda: sigma(tgp, frames, video_mask)),
  }
  for name in terms:
    x1, x2 = pairs[name][0](), pairs[name][1]()
    out[f"{name}_x1"], out[f"{name}_x2"] = x1, x2
    out[name] = margin_ranking(x1, x2, delta)
    loss = loss + out[name]
  return loss, out
