"""Shared helpers of the video-search tests: rendered test videos, a planted-feature encoder, and a
tiny real retrieval model saved in the training checkpoint layout."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from data_prep.frames import FrameOptions
from data_prep.synthetic import generate, render

# The planted encoder's feature axes: every object colour and background of the renderer.
PALETTE = {**render.COLOURS, **render.BACKGROUNDS}
NAMES = list(PALETTE)
RGB = np.asarray([PALETTE[n] for n in NAMES], np.float32)   # [D, 3]

# (file name, shape, colour, background, direction) of the standard test folder.
CLIPS = (
    ("red_circle.mp4", "circle", "red", "gray", "left"),
    ("green_square.mp4", "square", "green", "black", "right"),
    ("blue_triangle.mp4", "triangle", "blue", "teal", "up"),
    ("yellow_diamond.mp4", "diamond", "yellow", "brown", "down"),
)


def write_clip(path: str, shape: str, colour: str, background: str, direction: str = "left",
               start=(0.3, 0.4), seconds: int = 3, fps: int = 4, resolution: int = 64,
               size: str = "large") -> str:
  """Renders one synthetic clip (data_prep.synthetic) to an mp4 at `path`."""
  spec = render.ClipSpec(shape, colour, size, background, direction, tuple(start),
                         0.0 if direction == "still" else 0.4)
  generate.encode_mp4(render.render_clip(spec, seconds * fps, resolution), path, fps)
  return path


def make_video_folder(directory: str, clips: Sequence[tuple] = CLIPS, **kwargs) -> list[str]:
  """Writes the test clips into `directory`; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  return [write_clip(os.path.join(directory, name), *rest, **kwargs) for name, *rest in clips]


class ColourModel:
  """Planted SearchModel: a frame's feature is its pixel histogram over the renderer's palette.

  Text: each palette word of the query is a one-hot word token; the sentence is their normalised
  sum. So "red" matches exactly the clips with red pixels, and a red-circle-on-gray clip is most
  like another red-circle-on-gray clip. Counts encoder calls and encoded videos.
  """

  def __init__(self, model_id: str = "planted-colour-v1", num_frames: int = 4,
               resolution: int = 32, max_words: int = 8):
    self.model_id = model_id
    self.description = "planted colour histogram"
    self.frame_options = FrameOptions(fps=1.0, num_frames=num_frames, resolution=resolution)
    self.similarity_kwargs = dict(textual_attention=True, visual_attention=False)
    self.max_words = max_words
    self.video_calls = 0
    self.videos_encoded = 0
    self.token_weights = None

  def encode_videos(self, frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 [B, F, R, R, 3], [B, F] -> normalised histograms [B, F, D] (0 on padding)."""
    self.video_calls += 1
    self.videos_encoded += len(frames)
    px = frames.reshape(frames.shape[0], frames.shape[1], -1, 3).astype(np.float32)
    nearest = np.argmin(((px[..., None, :] - RGB) ** 2).sum(-1), axis=-1)   # [B, F, P]
    hist = (nearest[..., None] == np.arange(len(NAMES))).mean(2).astype(np.float32)
    hist /= np.maximum(np.linalg.norm(hist, axis=-1, keepdims=True), 1e-6)
    return hist * (mask[..., None] > 0)

  def encode_texts(self, texts: Sequence[str]):
    """Texts -> (sentence [N, D], words [N, L, D], mask [N, L])."""
    n, d = len(texts), len(NAMES)
    sent = np.zeros((n, d), np.float32)
    words = np.zeros((n, self.max_words, d), np.float32)
    mask = np.zeros((n, self.max_words), np.int32)
    for i, text in enumerate(texts):
      hits = [NAMES.index(w) for w in text.lower().split() if w in NAMES][:self.max_words]
      for j, c in enumerate(hits):
        words[i, j, c] = 1.0
        mask[i, j] = 1
        sent[i, c] += 1.0
      sent[i] /= max(np.linalg.norm(sent[i]), 1e-6)
    return sent, words, mask


def save_tiny_training_checkpoint(workdir: str, seed: int = 0) -> str:
  """Builds the synthetic config's tiny retrieval model (random init, `seed`) and saves it as a
  training run does: `config_train.json` + `checkpoints/<step>/state` with a `params` entry."""
  from flax import nnx
  from configs import synthetic
  from tvr_jax import checkpointing
  from tvr_jax.models import build as build_lib
  cfg = synthetic.get_config("smoke")
  cfg.seed = seed
  model = build_lib.build_model(cfg, load_weights=False)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config_train.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  mgr = checkpointing.TrainCheckpointManager(os.path.join(workdir, "checkpoints"),
                                             async_save=False)
  mgr.save(1, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
               "step": np.int32(1)}, meta=build_lib.model_meta(cfg, model))
  mgr.close()
  return workdir
