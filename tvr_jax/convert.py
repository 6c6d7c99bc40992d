"""Converts PyTorch / Hugging Face CLIP checkpoints into a `load_clip` directory (Orbax).

    python -m tvr_jax.convert --src ViT-B-32.pt --out checkpoints/clip_vit_b32

Inputs (format detected from content, see `tvr_jax.torch_io`): OpenAI naming (`visual.conv1.weight`,
`visual.transformer.resblocks.N.attn.in_proj_weight`, ...) as OpenAI's TorchScript archives, plain
`torch.save` state dicts (.pt/.bin, also open_clip's) or .safetensors; Hugging Face `CLIPModel`
naming (`vision_model.encoder.layers.N.self_attn.q_proj.weight`, ...) as a model directory or a bare
.safetensors / .bin file. Sizes are inferred from tensor shapes as OpenAI's `build_model` does
(heads = width // 64 unless a Hugging Face config.json or --vision-heads/--text-heads say
otherwise).

Activation: a state dict does not say whether its MLPs used OpenAI's QuickGELU or the exact GELU
(open_clip's default configs, LAION / DataComp weights). Where the source says, it is read: a
Hugging Face config.json's `hidden_act`, OpenAI's TorchScript archives (QuickGELU). Elsewhere
(plain state dicts, open_clip checkpoints) QuickGELU is assumed and the summary says so and how to
choose GELU (`--activation gelu`); an `--activation` that contradicts the source is an error.

Layout changes: linear weights transpose to `[in, out]`, the fused `in_proj` splits into q/k/v,
conv OIHW becomes HWIO, LayerNorm weight becomes `scale`. Every source key must be consumed and
every target parameter filled exactly once, with the right shape; anything else is an error naming
the key. The output (`DIR/clip_config.json`, `DIR/params/`) is written to a temporary sibling and
renamed into place, so a failure leaves no partial `DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from typing import Any

import numpy as np

from tvr_jax import torch_io
from tvr_jax.models.clip import (ACTIVATIONS, CONFIG_FILE, PARAMS_DIR, CLIPConfig, param_shapes,
                                 unflatten_params)

# OpenAI's TorchScript archives carry these non-weight entries in their state dict.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
DEFAULT_ACTIVATION = "quick_gelu"


class ConversionError(ValueError):
  """The source does not map one-to-one onto the Flax CLIP (message names the key)."""


@dataclasses.dataclass
class Conversion:
  """Result of mapping a source state dict onto the Flax CLIP.

  Attributes:
    config: inferred CLIPConfig.
    params: flat Flax parameter name ("visual/conv1/kernel") -> float32 numpy array.
    provenance: Flax name -> (source key, row slice of the source or None).
    metadata: non-weight source entries consumed as metadata, key -> value.
    naming: "openai" or "hf".
    source: the checkpoint read.
    activation_source: where `config.activation` came from, e.g. "config.json hidden_act",
      "--activation", or "assumed" (the source does not say and no flag was given).
  """
  config: CLIPConfig
  params: dict[str, np.ndarray]
  provenance: dict[str, tuple[str, tuple[int, int] | None]]
  metadata: dict[str, Any]
  naming: str
  source: torch_io.Checkpoint
  activation_source: str = "assumed"


class _Mapper:
  """Moves source tensors to Flax names, tracking that each is used exactly once."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str):
    self.tensors = tensors
    self.source = source
    self.consumed: set[str] = set()
    self.params: dict[str, np.ndarray] = {}
    self.provenance: dict[str, tuple[str, tuple[int, int] | None]] = {}

  def get(self, key: str) -> np.ndarray:
    if key not in self.tensors:
      raise ConversionError(f"{self.source}: missing key {key!r}")
    return self.tensors[key]

  def consume(self, key: str) -> np.ndarray:
    value = self.get(key)
    if key in self.consumed:
      raise ConversionError(f"{self.source}: key {key!r} used twice")
    self.consumed.add(key)
    return value

  def put(self, target: str, value: np.ndarray, source_key: str, rows=None):
    if target in self.params:
      raise ConversionError(f"{self.source}: target {target} filled twice (from {source_key!r})")
    self.params[target] = np.array(value, np.float32, order="C")  # always a fresh copy
    self.provenance[target] = (source_key, rows)

  def copy(self, key: str, target: str, transform=lambda x: x):
    self.put(target, transform(self.consume(key)), key)

  def linear(self, weight_key: str, bias_key: str | None, target: str):
    """PyTorch Linear weight [out, in] -> kernel [in, out]."""
    self.copy(weight_key, f"{target}/kernel", lambda w: w.T)
    if bias_key is not None:
      self.copy(bias_key, f"{target}/bias")

  def layer_norm(self, prefix: str, target: str):
    self.copy(f"{prefix}.weight", f"{target}/scale")
    self.copy(f"{prefix}.bias", f"{target}/bias")

  def check_all_consumed(self, metadata_keys=()):
    left = sorted(set(self.tensors) - self.consumed - set(metadata_keys))
    if left:
      raise ConversionError(f"{self.source}: unexpected key {left[0]!r} ({len(left)} key(s) not "
                            f"used by the CLIP mapping: {left[:5]})")


def _count_layers(tensors, pattern: str) -> int:
  rx = re.compile(pattern)
  idx = {int(m.group(1)) for k in tensors if (m := rx.match(k))}
  if idx and idx != set(range(max(idx) + 1)):
    raise ConversionError(f"layer indices {sorted(idx)} are not contiguous for {pattern}")
  return len(idx)


def _shape(tensors, key, source, ndim) -> tuple[int, ...]:
  if key not in tensors:
    raise ConversionError(f"{source}: missing key {key!r}")
  shape = tuple(tensors[key].shape)
  if len(shape) != ndim:
    raise ConversionError(f"{source}: {key!r} has shape {shape}, expected {ndim} dimensions")
  return shape


def _heads(width: int, override: int | None) -> int:
  return override if override else max(1, width // 64)


def detect_naming(tensors: dict[str, np.ndarray], source: str) -> str:
  """"openai" (visual.conv1.weight, ...) or "hf" (vision_model.*); error otherwise."""
  if "visual.conv1.weight" in tensors or any(k.startswith("visual.transformer.") for k in tensors):
    return "openai"
  if any(k.startswith(("vision_model.", "text_model.")) for k in tensors):
    return "hf"
  if any(k.startswith("visual.layer1.") for k in tensors):
    raise ConversionError(f"{source}: ResNet CLIP checkpoints are not supported (ViT only)")
  raise ConversionError(f"{source}: not a CLIP state dict (no 'visual.conv1.weight' or "
                        f"'vision_model.*' keys; first keys: {sorted(tensors)[:5]})")


# ----------------------------------------------------------------------------------------------
# OpenAI naming (OpenAI archives, open_clip).
# ----------------------------------------------------------------------------------------------

def infer_openai_config(tensors, source: str, vision_heads=None, text_heads=None) -> CLIPConfig:
  """Sizes from shapes, as OpenAI's `build_model` infers them."""
  vision_width, _, patch, _ = _shape(tensors, "visual.conv1.weight", source, 4)
  grid = round((_shape(tensors, "visual.positional_embedding", source, 2)[0] - 1) ** 0.5)
  text_width = _shape(tensors, "ln_final.weight", source, 1)[0]
  return CLIPConfig(
      embed_dim=_shape(tensors, "text_projection", source, 2)[1],
      image_size=patch * grid, patch_size=patch, vision_width=vision_width,
      vision_layers=_count_layers(
          tensors, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$"),
      vision_heads=_heads(vision_width, vision_heads),
      context_length=_shape(tensors, "positional_embedding", source, 2)[0],
      vocab_size=_shape(tensors, "token_embedding.weight", source, 2)[0],
      text_width=text_width,
      text_layers=_count_layers(tensors, r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$"),
      text_heads=_heads(text_width, text_heads))


def _openai_block(m: _Mapper, src: str, dst: str, width: int):
  w = m.consume(f"{src}.attn.in_proj_weight")
  b = m.consume(f"{src}.attn.in_proj_bias")
  if w.shape != (3 * width, width) or b.shape != (3 * width,):
    raise ConversionError(f"{m.source}: {src}.attn.in_proj_weight/bias have shapes {w.shape}, "
                          f"{b.shape}; expected ({3 * width}, {width}), ({3 * width},)")
  for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
    rows = (i * width, (i + 1) * width)
    m.put(f"{dst}/attn/{name}/kernel", w[rows[0]:rows[1]].T, f"{src}.attn.in_proj_weight", rows)
    m.put(f"{dst}/attn/{name}/bias", b[rows[0]:rows[1]], f"{src}.attn.in_proj_bias", rows)
  m.linear(f"{src}.attn.out_proj.weight", f"{src}.attn.out_proj.bias", f"{dst}/attn/out_proj")
  m.layer_norm(f"{src}.ln_1", f"{dst}/ln_1")
  m.layer_norm(f"{src}.ln_2", f"{dst}/ln_2")
  m.linear(f"{src}.mlp.c_fc.weight", f"{src}.mlp.c_fc.bias", f"{dst}/mlp/c_fc")
  m.linear(f"{src}.mlp.c_proj.weight", f"{src}.mlp.c_proj.bias", f"{dst}/mlp/c_proj")


def _openai_metadata(tensors, config: CLIPConfig, source: str) -> dict[str, Any]:
  """Checks and returns OpenAI's non-weight entries (input_resolution, ..., a causal attn_mask)."""
  meta = {}
  expected = {"input_resolution": config.image_size, "context_length": config.context_length,
              "vocab_size": config.vocab_size}
  for key in OPENAI_METADATA_KEYS:
    if key in tensors:
      value = tensors[key]
      if value.size != 1 or int(value.reshape(())) != expected[key]:
        raise ConversionError(f"{source}: metadata {key!r} = {value.tolist()} disagrees with the "
                              f"weights' {key} {expected[key]}")
      meta[key] = int(value.reshape(()))
  if "attn_mask" in tensors:  # open_clip's causal-mask buffer, when saved as a buffer
    mask = np.asarray(tensors["attn_mask"], np.float32)
    n = config.context_length
    causal = np.triu(np.full((n, n), -np.inf, np.float32), 1)
    if mask.shape != (n, n) or not np.array_equal(mask, causal):
      raise ConversionError(f"{source}: 'attn_mask' is not the causal mask of length {n}")
    meta["attn_mask"] = "causal"
  return meta


def map_openai(ck: torch_io.Checkpoint, vision_heads=None, text_heads=None) -> Conversion:
  """OpenAI-named state dict -> Flax parameters."""
  t = ck.tensors
  config = infer_openai_config(t, ck.path, vision_heads, text_heads)
  metadata = _openai_metadata(t, config, ck.path)
  m = _Mapper(t, ck.path)
  m.copy("visual.conv1.weight", "visual/conv1/kernel", lambda w: w.transpose(2, 3, 1, 0))
  m.copy("visual.class_embedding", "visual/class_embedding")
  m.copy("visual.positional_embedding", "visual/positional_embedding")
  m.layer_norm("visual.ln_pre", "visual/ln_pre")
  for i in range(config.vision_layers):
    _openai_block(m, f"visual.transformer.resblocks.{i}", f"visual/transformer/resblocks/{i}",
                  config.vision_width)
  m.layer_norm("visual.ln_post", "visual/ln_post")
  m.copy("visual.proj", "visual/proj")
  m.copy("token_embedding.weight", "token_embedding/embedding")
  m.copy("positional_embedding", "positional_embedding")
  for i in range(config.text_layers):
    _openai_block(m, f"transformer.resblocks.{i}", f"transformer/resblocks/{i}", config.text_width)
  m.layer_norm("ln_final", "ln_final")
  m.copy("text_projection", "text_projection")
  m.copy("logit_scale", "logit_scale", lambda x: np.reshape(x, ()))
  m.check_all_consumed(metadata)
  return Conversion(config, m.params, m.provenance, metadata, "openai", ck)


# ----------------------------------------------------------------------------------------------
# Hugging Face CLIPModel naming.
# ----------------------------------------------------------------------------------------------

def infer_hf_config(tensors, hf_config: dict | None, source: str, vision_heads=None,
                    text_heads=None) -> CLIPConfig:
  """Sizes from shapes; heads from config.json (else overrides, else width // 64)."""
  hf_config = hf_config or {}
  # Very old config.json files used *_config_dict; missing fields take the HF class defaults.
  vcfg = hf_config.get("vision_config") or hf_config.get("vision_config_dict") or {}
  tcfg = hf_config.get("text_config") or hf_config.get("text_config_dict") or {}
  for name, cfg in (("vision_config", vcfg), ("text_config", tcfg)):
    eps = cfg.get("layer_norm_eps", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
      raise ConversionError(f"{source}: {name}.layer_norm_eps is {eps}; only 1e-5 is implemented")
  eos = tcfg.get("eos_token_id", 2)
  if eos not in (2, 49407):
    raise ConversionError(f"{source}: text_config.eos_token_id {eos} is not OpenAI's EOT 49407 "
                          f"(the Flax CLIP pools at argmax(ids))")
  vision_width, _, patch, _ = _shape(tensors, "vision_model.embeddings.patch_embedding.weight",
                                     source, 4)
  positions = _shape(tensors, "vision_model.embeddings.position_embedding.weight", source, 2)[0]
  grid = round((positions - 1) ** 0.5)
  text_width = _shape(tensors, "text_model.final_layer_norm.weight", source, 1)[0]
  config = CLIPConfig(
      embed_dim=_shape(tensors, "text_projection.weight", source, 2)[0],
      image_size=patch * grid, patch_size=patch, vision_width=vision_width,
      vision_layers=_count_layers(
          tensors, r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight$"),
      vision_heads=vision_heads or vcfg.get("num_attention_heads") or
      (12 if hf_config else _heads(vision_width, None)),
      context_length=_shape(tensors, "text_model.embeddings.position_embedding.weight", source,
                            2)[0],
      vocab_size=_shape(tensors, "text_model.embeddings.token_embedding.weight", source, 2)[0],
      text_width=text_width,
      text_layers=_count_layers(
          tensors, r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight$"),
      text_heads=text_heads or tcfg.get("num_attention_heads") or
      (8 if hf_config else _heads(text_width, None)))
  checks = {("vision_config", "hidden_size"): config.vision_width,
            ("vision_config", "num_hidden_layers"): config.vision_layers,
            ("vision_config", "image_size"): config.image_size,
            ("vision_config", "patch_size"): config.patch_size,
            ("text_config", "hidden_size"): config.text_width,
            ("text_config", "num_hidden_layers"): config.text_layers,
            ("text_config", "max_position_embeddings"): config.context_length,
            ("text_config", "vocab_size"): config.vocab_size}
  for (section, field), value in checks.items():
    given = (vcfg if section == "vision_config" else tcfg).get(field)
    if given is not None and given != value:
      raise ConversionError(f"{source}: config.json {section}.{field} = {given} disagrees with the "
                            f"weights ({value})")
  return config


def hf_activation(hf_config: dict, source: str) -> str:
  """The activation a Hugging Face config.json declares (`hidden_act` of both towers).

  A missing field means the transformers default, quick_gelu. Raises ConversionError for an
  activation neither path implements, or towers that disagree (one CLIPConfig.activation).
  """
  acts = {}
  for name in ("vision_config", "text_config"):
    cfg = hf_config.get(name) or hf_config.get(f"{name}_dict") or {}
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
      raise ConversionError(f"{source}: {name}.hidden_act is {act!r}; only "
                            f"{' and '.join(ACTIVATIONS)} (exact erf GELU) are implemented")
    acts[name] = act
  if len(set(acts.values())) > 1:
    raise ConversionError(f"{source}: vision_config.hidden_act {acts['vision_config']!r} and "
                          f"text_config.hidden_act {acts['text_config']!r} differ; the Flax CLIP "
                          f"has one activation for both towers")
  return acts["vision_config"]


def declared_activation(ck: torch_io.Checkpoint, naming: str) -> tuple[str | None, str]:
  """(activation, where it is said) when the source says, else (None, why it cannot say)."""
  if naming == "hf" and ck.hf_config is not None:
    return hf_activation(ck.hf_config, ck.path), "config.json hidden_act"
  if ck.format == "torchscript":
    return "quick_gelu", "OpenAI TorchScript archive"
  return None, "a plain state dict does not record it"


def choose_activation(ck: torch_io.Checkpoint, naming: str, requested: str | None
                      ) -> tuple[str, str]:
  """(activation, source) from what the checkpoint says and the `--activation` flag.

  Raises ConversionError when the flag contradicts the source or names an unknown activation.
  """
  if requested is not None and requested not in ACTIVATIONS:
    raise ConversionError(f"--activation {requested!r}: expected one of {ACTIVATIONS}")
  declared, where = declared_activation(ck, naming)
  if declared is not None:
    if requested is not None and requested != declared:
      raise ConversionError(f"{ck.path}: --activation {requested} contradicts the source "
                            f"({where}: {declared}); drop the flag or use --activation {declared}")
    return declared, where
  if requested is not None:
    return requested, "--activation"
  return DEFAULT_ACTIVATION, "assumed"


def _hf_block(m: _Mapper, src: str, dst: str):
  for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
    m.linear(f"{src}.self_attn.{name}.weight", f"{src}.self_attn.{name}.bias",
             f"{dst}/attn/{name}")
  m.layer_norm(f"{src}.layer_norm1", f"{dst}/ln_1")
  m.layer_norm(f"{src}.layer_norm2", f"{dst}/ln_2")
  m.linear(f"{src}.mlp.fc1.weight", f"{src}.mlp.fc1.bias", f"{dst}/mlp/c_fc")
  m.linear(f"{src}.mlp.fc2.weight", f"{src}.mlp.fc2.bias", f"{dst}/mlp/c_proj")


def map_hf(ck: torch_io.Checkpoint, vision_heads=None, text_heads=None) -> Conversion:
  """Hugging Face `CLIPModel`-named state dict -> Flax parameters."""
  t = ck.tensors
  config = infer_hf_config(t, ck.hf_config, ck.path, vision_heads, text_heads)
  metadata = {}
  for tower in ("vision_model", "text_model"):  # older transformers saved position_ids buffers
    key = f"{tower}.embeddings.position_ids"
    if key in t:
      ids = np.asarray(t[key]).reshape(-1)
      if not np.array_equal(ids, np.arange(ids.size)):
        raise ConversionError(f"{ck.path}: {key!r} is not 0..N-1")
      metadata[key] = int(ids.size)
  m = _Mapper(t, ck.path)
  v = "vision_model"
  m.copy(f"{v}.embeddings.patch_embedding.weight", "visual/conv1/kernel",
         lambda w: w.transpose(2, 3, 1, 0))
  m.copy(f"{v}.embeddings.class_embedding", "visual/class_embedding")
  m.copy(f"{v}.embeddings.position_embedding.weight", "visual/positional_embedding")
  m.layer_norm(f"{v}.pre_layrnorm", "visual/ln_pre")  # (sic) HF's spelling
  for i in range(config.vision_layers):
    _hf_block(m, f"{v}.encoder.layers.{i}", f"visual/transformer/resblocks/{i}")
  m.layer_norm(f"{v}.post_layernorm", "visual/ln_post")
  m.copy("visual_projection.weight", "visual/proj", lambda w: w.T)
  m.copy("text_model.embeddings.token_embedding.weight", "token_embedding/embedding")
  m.copy("text_model.embeddings.position_embedding.weight", "positional_embedding")
  for i in range(config.text_layers):
    _hf_block(m, f"text_model.encoder.layers.{i}", f"transformer/resblocks/{i}")
  m.layer_norm("text_model.final_layer_norm", "ln_final")
  m.copy("text_projection.weight", "text_projection", lambda w: w.T)
  m.copy("logit_scale", "logit_scale", lambda x: np.reshape(x, ()))
  m.check_all_consumed(metadata)
  return Conversion(config, m.params, m.provenance, metadata, "hf", ck)


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------

def map_checkpoint(ck: torch_io.Checkpoint, vision_heads: int | None = None,
                   text_heads: int | None = None, activation: str | None = None) -> Conversion:
  """Maps a read checkpoint onto the Flax CLIP and checks the result against the model's shapes.

  activation: "quick_gelu" / "gelu" as `--activation`; None = what the source says, else
  quick_gelu (recorded as assumed in `Conversion.activation_source`).
  """
  naming = detect_naming(ck.tensors, ck.path)
  act, act_source = choose_activation(ck, naming, activation)
  conv = (map_openai if naming == "openai" else map_hf)(ck, vision_heads, text_heads)
  conv.config = conv.config.replace(activation=act)
  conv.activation_source = act_source
  expected = param_shapes(conv.config)
  missing = sorted(set(expected) - set(conv.params))
  extra = sorted(set(conv.params) - set(expected))
  if missing or extra:  # a mapping-table bug, not bad input; still say exactly what
    raise ConversionError(f"{ck.path}: Flax parameters not filled {missing[:5]}, unknown targets "
                          f"{extra[:5]}")
  for name, shape in expected.items():
    if conv.params[name].shape != shape:
      src, rows = conv.provenance[name]
      raise ConversionError(f"{ck.path}: key {src!r}{'' if rows is None else f' rows {rows}'} "
                            f"gives {name} shape {conv.params[name].shape}, expected {shape}")
  return conv


def write_converted(conv: Conversion, out: str, overwrite: bool = False) -> str:
  """Writes `clip_config.json` + `params/` to `out` atomically (temporary sibling, then rename)."""
  from tvr_jax import checkpointing
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
  tmp = checkpointing.temporary_sibling(out, "converting")
  trash = None
  try:
    os.makedirs(tmp)
    checkpointing.save_pytree(os.path.join(tmp, PARAMS_DIR), unflatten_params(conv.params))
    info = {**conv.config.to_dict(), "source": os.path.abspath(conv.source.path),
            "source_format": conv.source.format, "source_naming": conv.naming,
            "source_metadata": conv.metadata, "activation_source": conv.activation_source}
    if conv.source.weights_format:
      info["source_weights_format"] = conv.source.weights_format
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(info, f, indent=2)
    if os.path.exists(out):
      trash = checkpointing.temporary_sibling(out, "replaced")
      os.rename(out, trash)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if trash and not os.path.exists(out):
      os.rename(trash, out)  # put the previous version back
    raise
  if trash:
    shutil.rmtree(trash, ignore_errors=True)
  return out


def activation_note(conv: Conversion) -> str:
  """The summary's activation line; for an assumed one, how to choose the other."""
  act = conv.config.activation
  if conv.activation_source != "assumed":
    return f"{act} ({conv.activation_source})"
  other = next(a for a in ACTIVATIONS if a != act)
  return (f"{act} ASSUMED: the source does not say which activation it was trained with. "
          f"OpenAI weights use quick_gelu; open_clip models without '-quickgelu' in their name "
          f"(LAION, DataComp weights) use gelu. If this one does, convert again with "
          f"--activation {other} (or pass --activation {act} to confirm)")


def convert(src: str, out: str, *, overwrite: bool = False, vision_heads: int | None = None,
            text_heads: int | None = None, activation: str | None = None,
            log=print) -> Conversion:
  """Reads `src`, maps it onto the Flax CLIP, writes `out`; returns the `Conversion`.

  activation: as `--activation` (None: what the source says, else quick_gelu, with a note).
  """
  start = time.perf_counter()
  if os.path.exists(out) and not overwrite:  # fail before the (slow) read
    raise FileExistsError(f"{os.path.abspath(out)} already exists (pass --overwrite to replace it)")
  ck = torch_io.read_checkpoint(src)
  dtypes = sorted({str(v.dtype) for v in ck.tensors.values()})
  conv = map_checkpoint(ck, vision_heads, text_heads, activation)
  write_converted(conv, out, overwrite)
  c = conv.config
  n_params = sum(int(v.size) for v in conv.params.values())
  fmt = ck.format + (f" ({ck.weights_format})" if ck.weights_format else "")
  log(f"source      {os.path.abspath(src)}\n"
      f"format      {fmt}, {conv.naming} naming, {len(ck.tensors)} tensors ({', '.join(dtypes)})"
      + (f", metadata {conv.metadata}" if conv.metadata else "") + "\n"
      f"vision      ViT {c.image_size}px patch {c.patch_size}, width {c.vision_width}, "
      f"{c.vision_layers} layers, {c.vision_heads} heads\n"
      f"text        context {c.context_length}, vocab {c.vocab_size}, width {c.text_width}, "
      f"{c.text_layers} layers, {c.text_heads} heads\n"
      f"embed_dim   {c.embed_dim}\n"
      f"activation  {activation_note(conv)}\n"
      f"wrote       {os.path.abspath(out)}: {len(conv.params)} arrays, {n_params:,} float32 "
      f"parameters in {time.perf_counter() - start:.1f} s")
  return conv


def main(argv: list[str] | None = None) -> int:
  """Command-line entry: `python -m tvr_jax.convert --src PATH --out DIR [--overwrite]`."""
  parser = argparse.ArgumentParser(prog="python -m tvr_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True,
                      help="checkpoint file (.pt/.bin/.pth/.safetensors) or Hugging Face directory")
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  parser.add_argument("--vision-heads", type=int, default=None,
                      help="override the inferred vision head count (default width // 64)")
  parser.add_argument("--text-heads", type=int, default=None,
                      help="override the inferred text head count (default width // 64)")
  parser.add_argument("--activation", choices=ACTIVATIONS, default=None,
                      help="MLP activation the weights were trained with: quick_gelu (OpenAI) or "
                      "gelu (open_clip default configs, LAION / DataComp). Default: what the "
                      "source says (Hugging Face hidden_act, OpenAI TorchScript), else quick_gelu "
                      "with a note; contradicting the source is an error")
  args = parser.parse_args(argv)
  try:
    convert(args.src, args.out, overwrite=args.overwrite, vision_heads=args.vision_heads,
            text_heads=args.text_heads, activation=args.activation)
  except (torch_io.CheckpointError, ConversionError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
