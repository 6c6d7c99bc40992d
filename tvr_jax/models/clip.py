"""OpenAI CLIP text and vision towers in Flax NNX (docs/method.md §1), and `load_clip`.

The module tree mirrors OpenAI's PyTorch names (`visual.transformer.resblocks[i].attn`, `ln_pre`,
`token_embedding`, `text_projection`, ...), so weight conversion (`tvr_jax.convert`) is a readable
table. Differences from PyTorch, all layout only: linear kernels are `[in, out]`; the fused
`in_proj` is split into `q_proj`/`k_proj`/`v_proj`; the patch convolution kernel is HWIO; images
are NHWC.

Parameters are always float32; `CLIPConfig.dtype` is the compute dtype (LayerNorm and softmax
statistics stay float32, as OpenAI's fp16-safe `LayerNorm` does). No torch import here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# flatten_params / unflatten_params are re-exported: converters and tests address CLIP weights
# by them.
from tvr_jax.tree_paths import fill_params, flatten_params, unflatten_params  # noqa: F401

# LayerNorm epsilon of PyTorch / OpenAI CLIP (Flax's default is 1e-6).
LN_EPS = 1e-5
# MLP activations: OpenAI's QuickGELU, or the exact erf GELU of torch `nn.GELU()` (open_clip's
# default configs and the LAION / DataComp weights trained with them).
ACTIVATIONS = ("quick_gelu", "gelu")
CONFIG_FILE = "clip_config.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Sizes and numerics of a CLIP model.

  Attributes:
    embed_dim: joint embedding width D.
    image_size: input resolution (square) of the vision tower.
    patch_size: ViT patch size.
    vision_width, vision_layers, vision_heads: vision transformer sizes.
    context_length: text positions available (77 for OpenAI CLIP).
    vocab_size: BPE vocabulary size (49408 for OpenAI CLIP).
    text_width, text_layers, text_heads: text transformer sizes.
    dtype: compute dtype, "float32" or "bfloat16" (parameters are float32 regardless).
    attention_impl: `implementation` argument of `jax.nn.dot_product_attention`: None (let JAX
      pick), "xla", or "cudnn" (GPU only; cuDNN flash attention needs bfloat16 compute).
    remat: rematerialise each residual block (`nnx.remat`) to save activation memory.
    activation: MLP activation of every block of both towers, "quick_gelu" (OpenAI) or "gelu"
      (exact erf GELU). A state dict does not record it; `clip_config.json` does (a file without
      the field reads as "quick_gelu").
  """
  embed_dim: int = 512
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  dtype: str = "float32"
  attention_impl: str | None = None
  remat: bool = False
  activation: str = "quick_gelu"

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"CLIPConfig.activation must be one of {ACTIVATIONS}, got "
                       f"{self.activation!r}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"CLIPConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"CLIPConfig.attention_impl must be None, 'xla' or 'cudnn', got "
                       f"{self.attention_impl!r}")
    if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
      raise ValueError("attention_impl='cudnn' (GPU flash attention) needs dtype='bfloat16'; "
                       "cuDNN rejects float32 queries")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    for width, heads, name in ((self.vision_width, self.vision_heads, "vision"),
                               (self.text_width, self.text_heads, "text")):
      if width % heads:
        raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")

  @property
  def grid_size(self) -> int:
    """Patches per image side."""
    return self.image_size // self.patch_size

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "CLIPConfig":
    """Returns a copy with `changes` applied (e.g. `dtype="bfloat16"`, `remat=True`)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict of every field."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    """Builds a config from `to_dict` output, ignoring non-field keys (e.g. `source`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @classmethod
  def preset(cls, name: str, **overrides) -> "CLIPConfig":
    """Named sizes: "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px", and two small ones:
    "tiny" (tests, 32 px) and "tiny-64" (the embedded synthetic default, 64 px frames)."""
    presets = {
        "ViT-B/32": dict(),
        "ViT-B/16": dict(patch_size=16),
        "ViT-L/14": dict(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24,
                         vision_heads=16, text_width=768, text_heads=12),
        "ViT-L/14@336px": dict(embed_dim=768, image_size=336, patch_size=14, vision_width=1024,
                               vision_layers=24, vision_heads=16, text_width=768, text_heads=12),
        # Small widths for tests; the real vocabulary so the real tokenizer's ids are valid.
        "tiny": dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                     vision_heads=2, text_width=64, text_layers=2, text_heads=2),
        # The synthetic set's model: tiny widths on 64 px frames cut into 16 px patches.
        "tiny-64": dict(embed_dim=32, image_size=64, patch_size=16, vision_width=64,
                        vision_layers=2, vision_heads=2, text_width=64, text_layers=2,
                        text_heads=2),
    }
    if name not in presets:
      raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(presets)}")
    return cls(**{**presets[name], **overrides})


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU x * Phi(x) with the erf form (torch `nn.GELU()`, open_clip's default)."""
  return jax.nn.gelu(x, approximate=False)


def activation_fn(name: str):
  """The MLP activation called `name` ("quick_gelu" or "gelu")."""
  fns = {"quick_gelu": quick_gelu, "gelu": gelu}
  if name not in fns:
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
  return fns[name]


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 and cast back to the input dtype, as OpenAI's.

  eps: 1e-5 (PyTorch / OpenAI CLIP) unless a caller that follows another model says otherwise.
  """

  def __init__(self, width: int, *, eps: float = LN_EPS, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


def _rows(layer: nnx.Linear, x: jax.Array) -> jax.Array:
  """Applies `layer` to x [..., W] as one [rows, W] matmul.

  Why 2-D: with [B, T, W] operands, XLA:CPU (jax 0.10) lays out the weight-gradient dots so that
  they read transposed copies of the residual stream's cotangent, and fuses the elementwise
  cotangent chain of every later block into each copy; a ViT-B/32 backward pass took ~1.6x as
  long (docs/performance.md). On 2-D operands the dots read the cotangent as it lies. Same
  numbers on every backend.
  """
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def _linear(din: int, dout: int, std: float, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=jnp.float32, precision=None,
                    kernel_init=nnx.initializers.normal(std),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class MultiHeadAttention(nnx.Module):
  """Self-attention with separate q/k/v projections (PyTorch's fused in_proj, split)."""

  def __init__(self, width: int, heads: int, *, attn_std: float, proj_std: float, dtype,
               attention_impl: str | None, rngs: nnx.Rngs):
    self.heads = heads
    self.attention_impl = attention_impl
    self.q_proj = _linear(width, width, attn_std, dtype, rngs)
    self.k_proj = _linear(width, width, attn_std, dtype, rngs)
    self.v_proj = _linear(width, width, attn_std, dtype, rngs)
    self.out_proj = _linear(width, width, proj_std, dtype, rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False,
               queries: jax.Array | None = None) -> jax.Array:
    """Self-attention of x [B, T, W] -> [B, Q, W].

    mask: bool broadcastable to [B, heads, Q, T] (True = may attend). queries: [B, Q, W], the
    positions whose outputs are wanted (default x itself, Q = T); keys and values are always x.
    """
    b, t, w = x.shape
    queries = x if queries is None else queries
    split = lambda y: y.reshape(b, -1, self.heads, w // self.heads)
    out = jax.nn.dot_product_attention(
        split(_rows(self.q_proj, queries)), split(_rows(self.k_proj, x)),
        split(_rows(self.v_proj, x)), mask=mask, is_causal=is_causal,
        implementation=self.attention_impl)
    return _rows(self.out_proj, out.reshape(b, -1, w))


class MLP(nnx.Module):
  """c_fc -> activation (QuickGELU or GELU) -> c_proj (OpenAI's `mlp` Sequential)."""

  def __init__(self, width: int, *, fc_std: float, proj_std: float, dtype,
               activation: str = "quick_gelu", rngs: nnx.Rngs):
    activation_fn(activation)  # fail at construction on an unknown name
    self.activation = activation
    self.c_fc = _linear(width, 4 * width, fc_std, dtype, rngs)
    self.c_proj = _linear(4 * width, width, proj_std, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return _rows(self.c_proj, activation_fn(self.activation)(_rows(self.c_fc, x)))


class ResidualAttentionBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

  Reusable outside CLIP (the seqTransf temporal header copies text blocks 0-3): the call takes an
  optional attention mask, key padding mask and causal flag; `activation` and `ln_eps` let such a
  copy follow its own model (the header keeps CLIP's activation and uses its own LN epsilon).
  """

  def __init__(self, width: int, heads: int, layers: int = 12, *, dtype=jnp.float32,
               attention_impl: str | None = None, activation: str = "quick_gelu",
               ln_eps: float = LN_EPS, rngs: nnx.Rngs):
    # OpenAI CLIP's initialisation (model.py `initialize_parameters`).
    attn_std = width ** -0.5
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    self.ln_1 = LayerNorm(width, eps=ln_eps, rngs=rngs)
    self.attn = MultiHeadAttention(width, heads, attn_std=attn_std, proj_std=proj_std,
                                   dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.ln_2 = LayerNorm(width, eps=ln_eps, rngs=rngs)
    self.mlp = MLP(width, fc_std=fc_std, proj_std=proj_std, dtype=dtype, activation=activation,
                   rngs=rngs)

  def __call__(self, x: jax.Array, attn_mask: jax.Array | None = None,
               key_padding_mask: jax.Array | None = None, *, causal: bool = False,
               first_token_only: bool = False) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, T, W].
      attn_mask: optional bool [T, T] or [B, T, T] (True = query may attend to key).
      key_padding_mask: optional [B, T], nonzero = real token; padded keys are not attended.
      causal: add a causal (lower-triangular) mask.
      first_token_only: compute only position 0's output (every position still serves as key
        and value). The vision tower's last block needs no more: only the class token is read.

    Returns:
      [B, T, W] in x's dtype ([B, 1, W] with `first_token_only`).
    """
    mask = _combine_masks(attn_mask, key_padding_mask)
    h = self.ln_1(x)
    if first_token_only:
      if causal:
        raise ValueError("first_token_only is for bidirectional attention (causal=False)")
      x, queries = x[:, :1], h[:, :1]
      if mask is not None and mask.shape[-2] != 1:
        mask = mask[..., :1, :]
    else:
      queries = None
    x = x + self.attn(h, mask=mask, is_causal=causal, queries=queries)
    return x + self.mlp(self.ln_2(x))


def _combine_masks(attn_mask, key_padding_mask):
  """Bool mask broadcastable to [B, heads, T, S] from the two optional masks, or None."""
  mask = None
  if attn_mask is not None:
    attn_mask = jnp.asarray(attn_mask).astype(bool)
    mask = attn_mask[None, None] if attn_mask.ndim == 2 else attn_mask[:, None]
  if key_padding_mask is not None:
    kpm = (jnp.asarray(key_padding_mask) != 0)[:, None, None, :]
    mask = kpm if mask is None else mask & kpm
  return mask


class Transformer(nnx.Module):
  """A stack of `ResidualAttentionBlock`s (`resblocks[i]`), optionally rematerialised."""

  def __init__(self, width: int, layers: int, heads: int, *, dtype, attention_impl,
               remat: bool, activation: str = "quick_gelu", rngs: nnx.Rngs):
    self.remat = remat
    self.resblocks = nnx.List([
        ResidualAttentionBlock(width, heads, layers, dtype=dtype, attention_impl=attention_impl,
                               activation=activation, rngs=rngs) for _ in range(layers)])

  def __call__(self, x: jax.Array, attn_mask=None, key_padding_mask=None, *,
               causal: bool = False, first_token_only: bool = False) -> jax.Array:
    """x [B, T, W] -> [B, T, W] ([B, 1, W] with `first_token_only`, applied to the last block).

    Masks as in `ResidualAttentionBlock.__call__`.
    """
    def apply(block, y, m, k, first):
      return block(y, m, k, causal=causal, first_token_only=first)
    if self.remat:
      apply = nnx.remat(apply, static_argnums=(4,))
    last = len(self.resblocks) - 1
    for i, block in enumerate(self.resblocks):
      x = apply(block, x, attn_mask, key_padding_mask, first_token_only and i == last)
    return x


class VisionTransformer(nnx.Module):
  """CLIP's ViT image tower: patch conv, class token, positions, ln_pre, blocks, ln_post, proj."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    c = config
    dtype = c.compute_dtype
    scale = c.vision_width ** -0.5
    self.config = c
    self.conv1 = nnx.Conv(3, c.vision_width, kernel_size=(c.patch_size, c.patch_size),
                          strides=(c.patch_size, c.patch_size), padding="VALID", use_bias=False,
                          dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (c.vision_width,)))
    self.positional_embedding = nnx.Param(
        scale * jax.random.normal(rngs.params(), (c.grid_size ** 2 + 1, c.vision_width)))
    self.ln_pre = LayerNorm(c.vision_width, rngs=rngs)
    self.transformer = Transformer(c.vision_width, c.vision_layers, c.vision_heads, dtype=dtype,
                                   attention_impl=c.attention_impl, remat=c.remat,
                                   activation=c.activation, rngs=rngs)
    self.ln_post = LayerNorm(c.vision_width, rngs=rngs)
    self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (c.vision_width, c.embed_dim)))

  def __call__(self, images: jax.Array) -> jax.Array:
    """images float [N, H, W, 3] (NHWC, CLIP-normalised) -> projected class token [N, D]."""
    c = self.config
    if images.ndim != 4 or images.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"expected images [N, {c.image_size}, {c.image_size}, 3] (NHWC), got "
                       f"{images.shape}")
    dtype = c.compute_dtype
    x = self._embed_patches(images.astype(dtype))              # [N, g*g, W], row-major patches
    n = x.shape[0]
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (n, 1, c.vision_width))
    x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(dtype)
    x = self.ln_pre(x)
    x = self.transformer(x, first_token_only=True)   # [N, 1, W]: only the class token is read
    x = self.ln_post(x[:, 0])
    return x @ self.proj[...].astype(dtype)


  def _embed_patches(self, images: jax.Array) -> jax.Array:
    """The stride-p, p x p `conv1` as one matmul of flattened patches [N * g * g, p * p * 3].

    Same numbers as `self.conv1(images)`; on the CPU its backward pass took half the time.
    """
    c = self.config
    n, g, p = images.shape[0], c.grid_size, c.patch_size
    patches = images[:, :g * p, :g * p].reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    kernel = self.conv1.kernel[...].astype(images.dtype).reshape(p * p * 3, c.vision_width)
    return (patches.reshape(n * g * g, p * p * 3) @ kernel).reshape(n, g * g, c.vision_width)


class CLIP(nnx.Module):
  """OpenAI CLIP: `visual` tower plus the text tower's parts at top level (OpenAI's layout).

  Text parts: `token_embedding`, `positional_embedding`, `transformer`, `ln_final`,
  `text_projection`; and `logit_scale` (log of the contrastive temperature's inverse).
  """

  def __init__(self, config: CLIPConfig, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    c = config
    dtype = c.compute_dtype
    self.config = c
    self.visual = VisionTransformer(c, rngs=rngs)
    self.token_embedding = nnx.Embed(c.vocab_size, c.text_width, dtype=dtype,
                                     param_dtype=jnp.float32,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.positional_embedding = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), (c.context_length, c.text_width)))
    self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, dtype=dtype,
                                   attention_impl=c.attention_impl, remat=c.remat,
                                   activation=c.activation, rngs=rngs)
    self.ln_final = LayerNorm(c.text_width, rngs=rngs)
    self.text_projection = nnx.Param(
        c.text_width ** -0.5 * jax.random.normal(rngs.params(), (c.text_width, c.embed_dim)))
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32))

  def encode_image(self, images: jax.Array) -> jax.Array:
    """images float [N, H, W, 3] NHWC, CLIP-normalised -> [N, D] (not L2-normalised)."""
    return self.visual(images)

  def _text_states(self, ids: jax.Array) -> jax.Array:
    """ids int [N, L] -> final-LN states [N, L, text_width]."""
    c = self.config
    if ids.ndim != 2 or ids.shape[1] > c.context_length:
      raise ValueError(f"expected ids [N, L] with L <= {c.context_length}, got {ids.shape}")
    length = ids.shape[1]
    x = self.token_embedding(ids)
    x = x + self.positional_embedding[:length].astype(x.dtype)
    x = self.transformer(x, causal=True)
    return self.ln_final(x)

  def encode_text_tokens(self, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sentence and per-token text features.

    Args:
      ids: int32 [N, L], `[SOT] + bpe + [EOT]` zero-padded, L <= context_length.

    Returns:
      sentence [N, D] (projected state at the EOT position = argmax of ids),
      tokens [N, L, D] (every projected state), mask int32 [N, L] (1 on positions 0..EOT).
    """
    ids = jnp.asarray(ids)
    tokens = self._text_states(ids) @ self.text_projection[...].astype(self.config.compute_dtype)
    eot = jnp.argmax(ids, axis=-1)
    sentence = jnp.take_along_axis(tokens, eot[:, None, None], axis=1)[:, 0]
    mask = (jnp.arange(ids.shape[1])[None, :] <= eot[:, None]).astype(jnp.int32)
    return sentence, tokens, mask

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """ids int32 [N, L] -> [N, D], projected state at the EOT position (not L2-normalised)."""
    return self.encode_text_tokens(ids)[0]

  def __call__(self, images: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CLIP logits (image->text [N_img, N_txt], text->image [N_txt, N_img]), as OpenAI's."""
    img = self.encode_image(images).astype(jnp.float32)
    txt = self.encode_text(ids).astype(jnp.float32)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    logits = jnp.exp(self.logit_scale[...]) * img @ txt.T
    return logits, logits.T


# ----------------------------------------------------------------------------------------------
# Parameter shapes and filling (flat dicts: "visual/transformer/resblocks/0/attn/q_proj/kernel").
# ----------------------------------------------------------------------------------------------

def param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """Flat parameter name -> shape of a CLIP with `config`, without allocating weights."""
  return dict(_param_shapes(config))


@functools.lru_cache(maxsize=8)
def _param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
  abstract = nnx.eval_shape(lambda: CLIP(config, nnx.Rngs(0)))
  return {k: tuple(v.shape) for k, v in
          flatten_params(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))).items()}


def clip_from_flat_params(config: CLIPConfig, flat: dict[str, Any], what: str = "params") -> CLIP:
  """Builds a CLIP and fills every parameter from `flat` (exact key set and shapes required)."""
  model = nnx.eval_shape(lambda: CLIP(config, nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  pure = fill_params(nnx.to_pure_dict(state), flat, f"{what} (CLIPConfig {config})")
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def load_clip(directory: str | os.PathLike, **config_overrides) -> CLIP:
  """Loads a CLIP written by `python -m tvr_jax.convert` (`clip_config.json` + `params/`).

  Args:
    directory: the converted checkpoint directory.
    **config_overrides: CLIPConfig fields to change, e.g. `dtype="bfloat16"`, `remat=True`,
      `attention_impl="cudnn"` (sizes must match the checkpoint).

  Returns:
    The CLIP module with float32 parameters from the checkpoint.
  """
  from tvr_jax import checkpointing  # Orbax only when loading.
  directory = os.fspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory} is not a converted CLIP checkpoint: no {CONFIG_FILE} "
                            f"(make one with `python -m tvr_jax.convert --src ... --out DIR`)")
  with open(config_path) as f:
    config = CLIPConfig.from_dict({**json.load(f), **config_overrides})
  shapes = param_shapes(config)
  abstract = unflatten_params({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
  params = checkpointing.restore_pytree(os.path.join(directory, PARAMS_DIR), abstract)
  return clip_from_flat_params(config, flatten_params(params), what=directory)
