"""Building the retrieval model a run config describes.

One place turns a run config into a model, so the trainer, the evaluator, the video search and the
benchmarks build exactly the same thing:

    model = build_model(config)                       # CLIP weights from config.init_from
    model = build_model(config, load_weights=False)   # same structure, random weights (shapes)

`model_meta(config)` is what a training checkpoint must agree on with the run restoring it (every
RetrievalConfig field and the CLIP sizes, recorded in each checkpoint's meta).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from flax import nnx

from tvr_jax.models import clip as clip_lib
from tvr_jax.models import retrieval

# CLIPConfig fields that say how to compute, not what the weights are: free to change on resume.
COMPUTE_FIELDS = ("dtype", "remat", "attention_impl")


def clip_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """CLIPConfig fields the run config controls (compute dtype, remat, attention kernel)."""
  return dict(dtype=config.dtype, remat=bool(config.remat),
              attention_impl=(config.attention_impl or None))


def retrieval_config(config: ml_collections.ConfigDict) -> retrieval.RetrievalConfig:
  """The RetrievalConfig of `config.model`, with `max_words` / `max_frames` from the data keys.

  Raises ValueError naming the field for unknown fields or unsupported values, so a bad
  `--config.model...` fails before the run writes anything.
  """
  return retrieval.RetrievalConfig.from_dict(
      {**config.model.to_dict(), "max_words": config.max_words, "max_frames": config.num_frames})


def clip_config(config: ml_collections.ConfigDict) -> clip_lib.CLIPConfig:
  """The CLIPConfig of the run: read from `config.init_from`, or the preset `config.clip_preset`."""
  if config.init_from:
    path = os.path.join(config.init_from, clip_lib.CONFIG_FILE)
    with open(path) as f:
      return clip_lib.CLIPConfig.from_dict({**json.load(f), **clip_overrides(config)})
  return clip_lib.CLIPConfig.preset(config.clip_preset, image_size=config.image_size,
                                    **clip_overrides(config))


def build_model(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> nnx.Module:
  """The retrieval model of `config`, with CLIP weights from `config.init_from` when given.

  `load_weights=False` builds the same structure with random weights (for shapes, or training
  from scratch when `config.init_from` is empty).
  """
  if config.init_from and load_weights:
    clip = clip_lib.load_clip(config.init_from, **clip_overrides(config))
  else:
    clip = clip_lib.CLIP(clip_config(config), rngs=nnx.Rngs(config.seed))
  if clip.config.image_size != config.image_size:
    raise ValueError(f"CLIP input size {clip.config.image_size} px != config.image_size="
                     f"{config.image_size}; build the dataset with "
                     f"--resolution={clip.config.image_size}")
  return retrieval.RetrievalModel(retrieval_config(config), clip, rngs=nnx.Rngs(config.seed + 1))


# RetrievalConfig fields that only shape the training loss: evaluating a checkpoint with other
# values computes the same similarities, so only a resumed training run must match them.
LOSS_ONLY_FIELDS = ("contrastive_loss", "partial_type", "tau", "delta", "tpm_weight",
                    "train_t2v_predictor")
# RetrievalConfig fields that the run config sets under another name.
_FIELD_CONFIG_KEYS = {"max_words": "max_words", "max_frames": "num_frames"}


def model_meta(config: ml_collections.ConfigDict, model: nnx.Module | None = None
               ) -> dict[str, Any]:
  """What a checkpoint must agree on with this run (checked on restore, beyond shapes).

  Flat, JSON-able, keyed by the config key that sets each value: every RetrievalConfig field
  (`model.header`, `model.textual_attention`, ..., `max_words`, `num_frames`) and the CLIP sizes
  (`clip.vision_width`, ...; compute fields such as dtype excluded). The CLIP config is read from
  `model` when given, else from `config` (`clip_config`: init_from's JSON or the preset), so the
  meta is known before any model is built.
  """
  clip_cfg = getattr(getattr(model, "clip", None), "config", None) if model is not None else None
  if clip_cfg is None:
    clip_cfg = clip_config(config)
  meta = {f"clip.{k}": v for k, v in sorted(clip_cfg.to_dict().items()) if k not in COMPUTE_FIELDS}
  for field, value in retrieval_config(config).to_dict().items():
    meta[_FIELD_CONFIG_KEYS.get(field, f"model.{field}")] = value
  return meta


def eval_meta_keys(meta: dict[str, Any]) -> list[str]:
  """The keys of `model_meta` an evaluation must match (all but the loss-only fields)."""
  loss_only = {f"model.{f}" for f in LOSS_ONLY_FIELDS}
  return [k for k in meta if k not in loss_only]
