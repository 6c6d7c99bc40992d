"""The encoders a video search uses, and loading them from a checkpoint.

`SearchModel` is the small interface the index builder and the retriever need:

    frame_options                       data_prep.frames.FrameOptions (fps, F, R) of the model
    model_id                            str identifying the model (config + parameters hash)
    description                         str for messages (checkpoint path, sizes)
    encode_videos(frames, mask)         uint8 [B, F, R, R, 3], int32 [B, F]
                                          -> tokens float32 [B, F, D]
    encode_texts(texts)                 list[str] -> (sentence [N, D], words [N, L, D], mask [N, L])
    similarity_kwargs                   textual_attention / visual_attention of the DMAE head
    token_weights(words, wmask, tokens, vmask)   "wti" weights or None

`RetrievalSearchModel` wraps a `tvr_jax.models.retrieval.RetrievalModel` with jitted encoders of
fixed shapes (one compilation each); tests inject their own object with planted features.
`load_retrieval_model(path)` reads a training work directory / step directory (see `tvr_jax.train`)
or a converted CLIP directory (zero-shot: meanP header, no trained head).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import nnx

from data_prep.frames import FrameOptions
from tvr_jax import checkpointing
from tvr_jax.models import build as build_lib
from tvr_jax.models import clip as clip_lib
from tvr_jax.models import retrieval
from tvr_jax.tree_paths import fill_params, flatten_params

TextFeatures = Tuple[np.ndarray, np.ndarray, np.ndarray]


class ModelLoadError(ValueError):
  """A checkpoint path that does not hold a usable retrieval model (the message says why)."""


def params_digest(params: Any, identity: dict) -> str:
  """sha256 over the identity dict (canonical JSON) and every parameter leaf (path, shape, bytes).

  Two models with the same sizes but other weights get different ids, so an index built with one
  is refused by the other.
  """
  h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())   # this spelling keeps existing index ids valid
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(arr.tobytes())
  return "sha256:" + h.hexdigest()


class RetrievalSearchModel:
  """A `RetrievalModel` behind the `SearchModel` interface, with jitted fixed-shape encoders."""

  def __init__(self, model: nnx.Module, frame_options: FrameOptions, *, description: str = "",
               video_batch: int = 8, identity_extra: Optional[dict] = None):
    """Splits the model once and jits its encoders.

    Args:
      model: a `tvr_jax.models.retrieval.RetrievalModel`.
      frame_options: how frames are extracted for it (F must equal the model's max_frames).
      description: shown in messages (e.g. the checkpoint path).
      video_batch: videos per encoder call (the last batch is padded, so one compilation).
      identity_extra: extra JSON-able fields folded into `model_id`.
    """
    cfg = model.config
    if frame_options.num_frames != cfg.max_frames:
      raise ValueError(f"frame_options.num_frames={frame_options.num_frames} != model max_frames="
                       f"{cfg.max_frames}")
    clip_cfg = model.clip.config
    if frame_options.resolution != clip_cfg.image_size:
      raise ValueError(f"frame_options.resolution={frame_options.resolution} != CLIP image_size="
                       f"{clip_cfg.image_size}")
    self.model = model
    self.frame_options = frame_options
    self.description = description
    self.video_batch = int(video_batch)
    self.max_words = cfg.max_words
    self.similarity_kwargs = dict(textual_attention=cfg.textual_attention,
                                  visual_attention=cfg.visual_attention)
    graphdef, state = nnx.split(model)
    self._state = state
    sizes = {k: v for k, v in clip_cfg.to_dict().items() if k not in build_lib.COMPUTE_FIELDS}
    identity = {"retrieval": cfg.to_dict(), "clip": sizes,
                "frames": dataclasses.asdict(frame_options), **(identity_extra or {})}
    self.model_id = params_digest(nnx.to_pure_dict(nnx.state(model, nnx.Param)), identity)
    self.video_calls = 0

    def video_fn(state, frames, mask):
      return nnx.merge(graphdef, state).encode_video(frames, mask)[0]

    def text_fn(state, ids):
      return nnx.merge(graphdef, state).encode_text(ids)

    self._video_fn = jax.jit(video_fn)
    self._text_fn = jax.jit(text_fn)
    self._weights_fn = None
    if model.token_weights is not None:
      def weights_fn(state, words, wmask, tokens, vmask):
        return nnx.merge(graphdef, state).token_weights(words, wmask, tokens, vmask)
      self._weights_fn = jax.jit(weights_fn)

  def encode_videos(self, frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 frames [B, F, R, R, 3], mask [B, F] -> visual tokens float32 [B, F, D]."""
    b = frames.shape[0]
    out = []
    for i in range(0, b, self.video_batch):
      f, m = frames[i:i + self.video_batch], mask[i:i + self.video_batch]
      n = f.shape[0]
      if n < self.video_batch:   # pad: one compiled shape
        f = np.concatenate([f, np.zeros((self.video_batch - n,) + f.shape[1:], f.dtype)])
        m = np.concatenate([m, np.zeros((self.video_batch - n,) + m.shape[1:], m.dtype)])
      out.append(np.asarray(self._video_fn(self._state, f, m.astype(np.int32)))[:n])
      self.video_calls += 1
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def encode_texts(self, texts: Sequence[str]) -> TextFeatures:
    """Texts -> (sentence [N, D], words [N, L, D], mask [N, L] int32), normalised float32."""
    from tvr_jax.tokenizer import tokenize
    ids = tokenize(list(texts), context_length=self.max_words)
    sent, words, mask = self._text_fn(self._state, ids)
    return np.asarray(sent), np.asarray(words), np.asarray(mask)

  def token_weights(self, words, wmask, tokens, vmask):
    """("wti" word weights [Nt, L], frame weights [Nv, F]) or None when the model has none."""
    if self._weights_fn is None:
      return None
    w, f = self._weights_fn(self._state, words, wmask, tokens, vmask)
    return np.asarray(w), np.asarray(f)


def _find_step_dir(path: str) -> Tuple[str, str]:
  """(work directory, step directory) of a training work dir or one of its step dirs."""
  path = os.path.abspath(path)
  if checkpointing.is_step_dir(path):
    return os.path.dirname(os.path.dirname(path)), path
  ckpt_root = os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpt_root):
    raise ModelLoadError(
        f"{path} is neither a training work directory (with checkpoints/), a step directory "
        "(checkpoints/<step>/state) nor a converted CLIP directory (clip_config.json)")
  step_dir = checkpointing.latest_step_dir(ckpt_root)
  if step_dir is None:
    raise ModelLoadError(f"{ckpt_root} holds no finished checkpoint (no <step>/state directory)")
  return path, step_dir


def _load_run_config(workdir: str):
  import ml_collections
  for name in ("config_train.json", "config_eval.json"):
    p = os.path.join(workdir, name)
    if os.path.isfile(p):
      with open(p) as f:
        d = json.load(f)
      return ml_collections.ConfigDict(d), p
  raise ModelLoadError(f"{workdir} has no config_train.json / config_eval.json (written by "
                       "`python -m tvr_jax.main`); cannot tell which model the checkpoint holds")


def load_retrieval_model(checkpoint: str, *, video_batch: int = 8) -> RetrievalSearchModel:
  """Loads a retrieval model for search from a checkpoint path.

  Accepted layouts:
  - a training work directory `WORKDIR` (`config_train.json`, `checkpoints/<step>/state`): the
    newest finished step is used;
  - a step directory `WORKDIR/checkpoints/<step>`;
  - a converted CLIP directory (`clip_config.json`, `params/`): zero-shot search with the meanP
    header (no trained parameters besides CLIP's), 12 frames at 1 fps.

  Frames are extracted as in training: 1 fps, F = config.num_frames, R = config.image_size.

  Raises:
    ModelLoadError: the path holds none of these, or the parameters do not fit the config.
  """
  path = os.path.abspath(os.fspath(checkpoint))
  if not os.path.exists(path):
    raise ModelLoadError(f"checkpoint {path} does not exist")
  if os.path.isfile(os.path.join(path, clip_lib.CONFIG_FILE)):
    clip = clip_lib.load_clip(path)
    cfg = retrieval.RetrievalConfig(partial_type=0, max_frames=12, max_words=32)
    model = retrieval.RetrievalModel(cfg, clip, rngs=nnx.Rngs(0))
    options = FrameOptions(fps=1.0, num_frames=12, resolution=clip.config.image_size)
    return RetrievalSearchModel(model, options, description=f"zero-shot CLIP {path}",
                                video_batch=video_batch, identity_extra={"zero_shot": True})
  workdir, step_dir = _find_step_dir(path)
  config, config_path = _load_run_config(workdir)
  try:
    model = build_lib.build_model(config, load_weights=False)
  except (FileNotFoundError, OSError) as e:
    raise ModelLoadError(f"cannot rebuild the model of {config_path}: {e} (the converted CLIP "
                         f"named by init_from={config.init_from!r} gives its sizes)") from e
  try:
    saved = checkpointing.restore_train_params(step_dir)
  except checkpointing.CheckpointError as e:
    raise ModelLoadError(str(e)) from e
  state = nnx.state(model, nnx.Param)
  try:
    values = fill_params(nnx.to_pure_dict(state), flatten_params(saved),
                         f"checkpoint {step_dir} vs the model of {config_path}")
  except ValueError as e:
    raise ModelLoadError(str(e)) from e
  nnx.replace_by_pure_dict(state, values)
  nnx.update(model, state)
  options = FrameOptions(fps=1.0, num_frames=int(config.num_frames),
                         resolution=int(config.image_size))
  return RetrievalSearchModel(model, options, description=f"{step_dir}", video_batch=video_batch)
